"""Maps at scale: fit a sample, place the rest in parallel batches; checked against a plain fit of the sample and
against the clusters the data was drawn from (slow: UMAP fits)."""

from __future__ import annotations

import numpy as np
import pytest

from lol_engine.maps import fit_faceted, fit_map


def _clusters(n: int, k: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows around ``k`` well-separated centres, and each row's centre."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 4
    labels = rng.integers(0, k, size=n)
    return centres[labels] + rng.normal(size=(n, dim)), labels


@pytest.mark.slow
def test_a_sample_is_fitted_and_the_rest_placed_next_to_their_cluster() -> None:
    x, labels = _clusters(600, 5, 16, seed=0)
    calls: list[tuple[int, int]] = []
    fitted = fit_map(x, seed=3, sample=300, batch=64, workers=2, on_progress=lambda d, t: calls.append((d, t)))
    chosen = fitted.fitted_rows
    assert chosen is not None and len(chosen) == len(np.unique(chosen)) == 300
    assert fitted.params["fitted"] == 300 and fitted.params["placed"] == 300
    plain = fit_map(x[chosen], seed=3)  # the sampled rows sit exactly where a plain fit of the sample puts them
    assert plain.params["placed"] == 0 and plain.fitted_rows is None
    np.testing.assert_allclose(fitted.coords[chosen], plain.coords)
    rest = np.setdiff1d(np.arange(len(x)), chosen)
    # each placed row lands among its own cluster: the cluster of its nearest fitted point (2-D) is its true one
    d = ((fitted.coords[rest, None, :] - fitted.coords[None, chosen, :]) ** 2).sum(-1)  # (placed, fitted)
    agree = (labels[chosen][d.argmin(1)] == labels[rest]).mean()
    assert agree >= 0.95, agree
    # the placed rows are the reducer's transform of those rows, whatever the number of threads
    np.testing.assert_allclose(fitted.place(x[rest], batch=64, workers=1), fitted.coords[rest])
    assert [t for _, t in calls] == [300] * 5 and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert calls[-1] == (300, 300)


@pytest.mark.slow
def test_a_faceted_map_samples_each_large_tile() -> None:
    x, _ = _clusters(260, 3, 8, seed=1)
    groups = ["big"] * 200 + ["small"] * 60
    calls: list[tuple[int, int]] = []
    faceted = fit_faceted(x, groups, sample=120, workers=2, on_progress=lambda d, t: calls.append((d, t)))
    big, small = faceted.tiles["big"][0], faceted.tiles["small"][0]
    assert (big.params["fitted"], big.params["placed"]) == (120, 80)
    assert (small.params["fitted"], small.params["placed"]) == (60, 0)
    assert calls[-1] == (80, 80)
    fitted, origin, scale, offset = faceted.tiles["big"]
    np.testing.assert_allclose(faceted.coords[:200], (fitted.coords - origin) * scale + offset)


@pytest.mark.slow
def test_the_scale_benchmark_runs_quick() -> None:
    """``benchmarks/bench_maps_scale.py --quick`` runs and fills every row (no timing is asserted)."""
    import runpy
    from pathlib import Path

    module = runpy.run_path(str(Path(__file__).parent.parent / "benchmarks" / "bench_maps_scale.py"))
    rows = module["main"](["--quick"])
    assert [r[0] for r in rows] == ["map page", "map page", "map fit", "map quality", "map memory", "map place"]
    assert all(len(r) == 6 and all(r) for r in rows)
    assert "10,000 points shipped + density" in rows[1][5]  # 30k LoRAs beyond a 10k cap: sampled


@pytest.mark.slow
def test_placing_on_a_search_index_is_reproducible_and_lands_in_the_right_cluster() -> None:
    """From 4,096 fitted rows UMAP searches neighbours with pynndescent, whose index keeps per-query scratch arrays
    (a shared result heap: two thirds of the rows moved when threads shared it). One thread: the fit's placement
    again, bit for bit. Threads (each with its own scratch): not bit-identical, but each row in its own cluster."""
    x, labels = _clusters(4096 + 6000, 6, 8, seed=2)
    fitted = fit_map(x, seed=0, sample=4096, batch=500)
    assert fitted.params["fitted"] == 4096 and fitted._reducer._knn_search_index is not None
    chosen = fitted.fitted_rows
    rest = np.setdiff1d(np.arange(len(x)), chosen)
    np.testing.assert_array_equal(fitted.place(x[rest], batch=500), fitted.coords[rest])
    for coords in (fitted.coords[rest], fitted.place(x[rest], batch=500, workers=4)):
        d = ((coords[:, None, :] - fitted.coords[None, chosen, :]) ** 2).sum(-1)  # (placed, fitted)
        assert (labels[chosen][d.argmin(1)] == labels[rest]).mean() >= 0.95
