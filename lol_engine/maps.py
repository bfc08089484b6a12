"""2-D maps of LoRA embeddings: UMAP (the only module that imports umap), with a PCA fallback for tiny collections.

Rules: rows are L2-normalised (Euclidean distance then orders like cosine distance); n < 4 → PCA
(UMAP fails for n = 2, 3); 4 ≤ n < 30 → UMAP with ``init="pca"`` and ``n_neighbors = min(15, n − 1)``; otherwise
UMAP defaults. A fitted map places new points with ``transform`` without moving the old ones. UMAP's first fit in a
process pays ~20 s of JIT compilation: :func:`warm_up` pays it in a background thread, off the request path.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["TILE_STEP", "EmbeddingMap", "FacetedMap", "fit_faceted", "fit_map", "warm_up"]

_MIN_UMAP = 4
TILE_STEP = 1.25  # a faceted map's tiles are unit squares this far apart


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


@dataclass
class EmbeddingMap:
    """A fitted 2-D layout: ``coords`` of the fitted points, and ``place`` for new ones."""

    method: str  # "umap" | "pca"
    coords: np.ndarray  # (n, 2)
    params: dict[str, Any] = field(default_factory=dict)
    _reducer: Any = None
    _mean: np.ndarray | None = None
    _components: np.ndarray | None = None

    def place(self, x: np.ndarray) -> np.ndarray:
        """Coordinates of new points in this map (the fitted points do not move)."""
        z = _normalise(np.atleast_2d(x))
        if self.method == "umap":
            return np.asarray(self._reducer.transform(z), dtype=float)
        assert self._mean is not None and self._components is not None
        return (z - self._mean) @ self._components.T


def _pca(z: np.ndarray) -> EmbeddingMap:
    mean = z.mean(axis=0)
    centred = z - mean
    if len(z) > 1 and np.abs(centred).max() > 0:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
    else:
        vt = np.zeros((0, z.shape[1]), dtype=z.dtype)
    components = np.zeros((2, z.shape[1]), dtype=z.dtype)
    components[: min(2, len(vt))] = vt[:2]
    return EmbeddingMap("pca", centred @ components.T, {}, None, mean, components)


def fit_map(x: np.ndarray, *, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1) -> EmbeddingMap:
    """Fit a 2-D map of the rows of ``x`` (seeded: the same input gives the same map in one environment)."""
    z = _normalise(np.atleast_2d(x)) if len(x) else np.zeros((0, 2), dtype=np.float32)
    if len(z) < _MIN_UMAP:
        return _pca(z) if len(z) else EmbeddingMap("pca", np.zeros((0, 2)))
    import umap

    params: dict[str, Any] = {"n_neighbors": min(n_neighbors, len(z) - 1), "min_dist": min_dist, "random_state": seed}
    if len(z) < 30:
        params["init"] = "pca"
    reducer = umap.UMAP(n_components=2, metric="euclidean", n_jobs=1, **params)
    coords = reducer.fit_transform(z)
    return EmbeddingMap("umap", np.asarray(coords, dtype=float), params, reducer)


@dataclass
class FacetedMap:
    """One 2-D layout per group (a base family), each scaled into a unit tile, tiles side by side on a grid.

    Used where rows of different groups must not be compared (fingerprints of LoRAs of different bases): positions
    and distances mean something within a tile only. ``coords`` are the fitted rows' coordinates (input order);
    ``place(x, group)`` puts new rows into their group's tile, or returns None for a group without one.
    """

    coords: np.ndarray  # (n, 2)
    tiles: dict[str, tuple[EmbeddingMap, np.ndarray, float, np.ndarray]]  # group -> (map, origin, scale, offset)

    def place(self, x: np.ndarray, group: str) -> np.ndarray | None:
        """Coordinates of new rows of ``group`` (None when the group has no tile: refit to give it one)."""
        if group not in self.tiles:
            return None
        fitted, origin, scale, offset = self.tiles[group]
        return (fitted.place(x) - origin) * scale + offset

    def tile_of(self, group: str) -> tuple[float, float, float, float] | None:
        """``(x0, y0, x1, y1)`` of a group's tile."""
        if group not in self.tiles:
            return None
        offset = self.tiles[group][3]
        return float(offset[0]), float(offset[1]), float(offset[0] + 1.0), float(offset[1] + 1.0)


def tile_offset(index: int, n_tiles: int) -> np.ndarray:
    """Lower-left corner of tile ``index`` of ``n_tiles`` on a near-square grid, row by row from the top."""
    columns = max(1, math.ceil(math.sqrt(n_tiles)))
    row, column = divmod(index, columns)
    return np.array([column * TILE_STEP, -row * TILE_STEP], dtype=float)


def fit_faceted(x: np.ndarray, groups: Sequence[str], *, seed: int = 0) -> FacetedMap:
    """Fit one :func:`fit_map` per group (largest first, ties by name) and tile them (see :class:`FacetedMap`)."""
    if len(groups) != len(x):
        raise ValueError(f"{len(x)} rows but {len(groups)} groups")
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    order = sorted(members, key=lambda g: (-len(members[g]), g))
    coords = np.zeros((len(x), 2), dtype=float)
    tiles = {}
    for index, group in enumerate(order):
        rows = members[group]
        fitted = fit_map(np.asarray(x)[rows], seed=seed)
        low, high = fitted.coords.min(axis=0), fitted.coords.max(axis=0)
        scale = 1.0 / max(float((high - low).max()), 1e-9)
        offset = tile_offset(index, len(order))
        coords[rows] = (fitted.coords - low) * scale + offset
        tiles[group] = (fitted, low, scale, offset)
    return FacetedMap(coords, tiles)


def warm_up(dim: int = 16) -> threading.Thread:
    """Compile UMAP's JIT code in a daemon thread (fit 50 random points, then transform); returns the thread."""

    def run() -> None:
        rng = np.random.default_rng(0)
        fitted = fit_map(rng.normal(size=(50, dim)))
        fitted.place(rng.normal(size=(3, dim)))

    thread = threading.Thread(target=run, name="umap-warm-up", daemon=True)
    thread.start()
    return thread
