"""Maps at scale: fit a sample, place the rest by the weighted mean of their nearest sampled rows; checked against a
plain fit of the sample, a slow float64 reference of the placement, and the clusters the data was drawn from."""

from __future__ import annotations

import numpy as np
import pytest

from lol_engine import maps
from lol_engine.maps import fit_faceted, fit_map, weighted_placement


def _reference_placement(fitted: np.ndarray, coords: np.ndarray, row: np.ndarray, k: int) -> np.ndarray:
    """One row, float64, full sort: the rule written out plainly."""
    f = fitted / np.linalg.norm(fitted, axis=1, keepdims=True)
    sims = f @ (row / np.linalg.norm(row))
    top = np.argsort(-sims, kind="stable")[:k]
    weights = np.clip(sims[top], 0.0, None) + 1e-9
    return (coords[top] * weights[:, None]).sum(0) / weights.sum()


def test_weighted_placement_equals_the_plain_rule_chunk_by_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    fitted, coords, rows = rng.normal(size=(300, 12)), rng.normal(size=(300, 2)), rng.normal(size=(97, 12))
    calls: list[tuple[int, int]] = []
    got = weighted_placement(fitted, coords, rows, k=7, batch=40, on_progress=lambda d, t: calls.append((d, t)))
    want = np.array([_reference_placement(fitted, coords, r, 7) for r in rows])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert calls == [(40, 97), (80, 97), (97, 97)]
    monkeypatch.setattr(maps, "PLACE_BLOCK_BYTES", 12 * 300 * 25)  # blocks of 25 rows: the memory cap binds first
    calls.clear()
    capped = weighted_placement(fitted, coords, rows, k=7, batch=40, on_progress=lambda d, t: calls.append((d, t)))
    np.testing.assert_allclose(capped, got, rtol=1e-6, atol=1e-7)
    assert calls == [(25, 97), (50, 97), (75, 97), (97, 97)]
    # k larger than the fitted set: every fitted row counts; a far-away scale of a row does not move it (cosine)
    np.testing.assert_allclose(
        weighted_placement(fitted[:3], coords[:3], rows[:2], k=50),
        weighted_placement(fitted[:3], coords[:3], 9 * rows[:2], k=3),
        rtol=1e-5,
    )


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
    fitted = fit_map(x, seed=3, sample=300, batch=64, on_progress=lambda d, t: calls.append((d, t)))
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
    # the placed rows are the weighted means of their nearest sampled rows' coordinates
    want = np.array([_reference_placement(x[chosen], fitted.coords[chosen], row, 10) for row in x[rest]])
    np.testing.assert_allclose(fitted.coords[rest], want, rtol=1e-4, atol=1e-5)
    assert [t for _, t in calls] == [300] * 5 and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert calls[-1] == (300, 300)


@pytest.mark.slow
def test_a_faceted_map_samples_each_large_tile() -> None:
    x, _ = _clusters(260, 3, 8, seed=1)
    groups = ["big"] * 200 + ["small"] * 60
    calls: list[tuple[int, int]] = []
    faceted = fit_faceted(x, groups, sample=120, on_progress=lambda d, t: calls.append((d, t)))
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
