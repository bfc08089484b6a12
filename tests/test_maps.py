"""Maps: tiny collections never fail; UMAP places new points without moving old ones (slow: JIT)."""

from __future__ import annotations

import numpy as np
import pytest

from lol_engine.maps import TILE_STEP, fit_faceted, fit_map


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


def test_a_faceted_map_lays_each_group_out_in_its_own_tile() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(40, 8)), rng.normal(size=(3, 8)) + 5.0, rng.normal(size=(1, 8))])
    groups = ["big"] * 40 + ["small"] * 3 + ["single"]
    faceted = fit_faceted(x, groups)
    assert faceted.coords.shape == (44, 2)
    tiles = {g: faceted.tile_of(g) for g in ("big", "small", "single")}
    assert tiles["big"] == (0.0, 0.0, 1.0, 1.0)  # the largest group first, top left; 3 groups → 2 columns
    assert tiles["small"] == (TILE_STEP, 0.0, TILE_STEP + 1.0, 1.0) and tiles["single"][:2] == (0.0, -TILE_STEP)
    for group, (x0, y0, x1, y1) in tiles.items():  # every point inside its own tile, each tile spanning [0, 1]
        xy = faceted.coords[[i for i, g in enumerate(groups) if g == group]]
        assert ((xy >= [x0 - 1e-9, y0 - 1e-9]) & (xy <= [x1 + 1e-9, y1 + 1e-9])).all(), group
    big = faceted.coords[:40]
    assert max(np.ptp(big[:, 0]), np.ptp(big[:, 1])) == pytest.approx(1.0)  # scaled to the tile, aspect kept
    fitted, origin, scale, offset = faceted.tiles["small"]
    np.testing.assert_allclose(faceted.coords[40:43], (fitted.coords - origin) * scale + offset)
    placed = faceted.place(x[40:42], "small")  # new rows go through the same affine map into the same tile
    np.testing.assert_allclose(placed, (fitted.place(x[40:42]) - origin) * scale + offset)
    np.testing.assert_allclose(placed, faceted.coords[40:42], atol=1e-6)  # PCA tile: a fitted row lands on itself
    assert faceted.place(x[:1], "new family") is None
    with pytest.raises(ValueError, match="44 rows but 3 groups"):
        fit_faceted(x, groups[:3])
