"""Maps: tiny collections never fail; UMAP places new points without moving old ones (slow: JIT)."""

from __future__ import annotations

import numpy as np
import pytest

from lol_engine.maps import fit_map


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_tiny_collections_use_pca(n: int) -> None:
    x = np.random.default_rng(n).normal(size=(n, 8))
    fitted = fit_map(x)
    assert fitted.coords.shape == (n, 2) and np.isfinite(fitted.coords).all()
    if n:
        assert fitted.method == "pca"
        assert fitted.place(x[:1]).shape == (1, 2)


def test_identical_points_do_not_fail() -> None:
    fitted = fit_map(np.ones((3, 5)))
    assert np.allclose(fitted.coords, 0.0, atol=1e-6)


@pytest.mark.slow
def test_umap_fit_transform_and_determinism() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5
    x = np.concatenate([c + rng.normal(size=(20, 16)) for c in centres])
    first = fit_map(x, seed=1)
    assert first.method == "umap" and first.coords.shape == (60, 2)
    again = fit_map(x, seed=1)
    np.testing.assert_allclose(again.coords, first.coords)  # seeded fits are reproducible in one environment
    before = first.coords.copy()
    placed = first.place(centres[0] + rng.normal(size=(2, 16)))
    assert placed.shape == (2, 2)
    np.testing.assert_array_equal(first.coords, before)  # old points do not move
    small = fit_map(x[:10], seed=1)  # 4 <= n < 30: pca init, fewer neighbours
    assert small.params["init"] == "pca" and small.params["n_neighbors"] == 9
