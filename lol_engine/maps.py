"""2-D maps of LoRA embeddings: UMAP (the only module that imports umap), with a PCA fallback for tiny collections.

Rules: rows are L2-normalised (Euclidean distance then orders like cosine distance); n < 4 → PCA
(UMAP fails for n = 2, 3); 4 ≤ n < 30 → UMAP with ``init="pca"`` and ``n_neighbors = min(15, n − 1)``; otherwise
UMAP defaults. A fitted map places new points with ``transform`` without moving the old ones. UMAP's first fit in a
process pays ~20 s of JIT compilation: :func:`warm_up` pays it in a background thread, off the request path.

At scale (more than ``sample`` rows, :data:`SAMPLE` by default) the layout is fitted on a seeded uniform sample and
every other row is placed at the similarity-weighted mean of the 2-D coordinates of its :data:`PLACE_K` nearest
sampled rows (cosine on the normalised rows; exact, by chunked matrix products of at most :data:`BATCH` rows and
:data:`PLACE_BLOCK_BYTES`, with progress).
Measured here (2 cores, 20k 64-d rows in 30 clusters, 5k fitted): UMAP's own ``transform`` placed the 15k others in
7.2 s with 97.7 % of them next to their own cluster; the weighted mean in 0.8 s with 100 %. ``transform`` costs about
what a fit costs a row (≈ 0.9 ms), so sampling only paid once placement stopped using it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "BATCH",
    "SAMPLE",
    "TILE_STEP",
    "EmbeddingMap",
    "FacetedMap",
    "PlaceProgress",
    "fit_faceted",
    "fit_map",
    "warm_up",
    "weighted_placement",
]

_MIN_UMAP = 4
TILE_STEP = 1.25  # a faceted map's tiles are unit squares this far apart
SAMPLE = 50_000  # more rows than this: fit on a sample of this many, place the rest by weighted_placement
BATCH = 4_096  # rows per chunk when placing many rows, at most (a 4,096 × sample similarity block at a time)
PLACE_BLOCK_BYTES = 2**28  # and fewer when the block's similarities and their argpartition would pass 256 MiB
PLACE_K = 10  # sampled neighbours whose coordinates place a row beyond the sample
PlaceProgress = Callable[[int, int], None]  # (rows placed so far, rows to place)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


@dataclass
class EmbeddingMap:
    """A fitted 2-D layout: ``coords`` of the fitted points, and ``place`` for new ones."""

    method: str  # "umap" | "pca"
    coords: np.ndarray  # (n, 2)
    params: dict[str, Any] = field(default_factory=dict)  # UMAP's, plus "fitted" and "placed" row counts
    _reducer: Any = None
    _mean: np.ndarray | None = None
    _components: np.ndarray | None = None
    fitted_rows: np.ndarray | None = None  # rows of the input the layout was fitted on (None: all of them)

    def place(self, x: np.ndarray, *, batch: int = BATCH, on_progress: PlaceProgress | None = None) -> np.ndarray:
        """Coordinates of new points in this map (the fitted points do not move): UMAP's ``transform``, in batches
        of ``batch`` rows (``on_progress(done, total)`` after each), or the PCA projection."""
        z = _normalise(np.atleast_2d(x))
        if self.method != "umap":
            assert self._mean is not None and self._components is not None
            return (z - self._mean) @ self._components.T
        out = np.zeros((len(z), 2), dtype=float)
        for start in range(0, len(z), max(1, batch)):
            rows = z[start : start + max(1, batch)]
            out[start : start + len(rows)] = self._reducer.transform(rows)
            if on_progress is not None:
                on_progress(start + len(rows), len(z))
        return out


def weighted_placement(
    fitted: np.ndarray,
    coords: np.ndarray,
    rows: np.ndarray,
    *,
    k: int = PLACE_K,
    batch: int = BATCH,
    on_progress: PlaceProgress | None = None,
) -> np.ndarray:
    """Place each of ``rows`` at the similarity-weighted mean of the ``coords`` of its ``k`` nearest ``fitted`` rows.

    Cosine similarity (both sides are normalised here); weights ``max(similarity, 0) + 1e-9``. Exact: one
    ``(b, len(fitted))`` similarity block at a time, ``b`` at most ``batch`` and small enough that the block and its
    partition indices (12 bytes an entry) stay within :data:`PLACE_BLOCK_BYTES`: placing 50,000 rows into a
    50,000-row fit held 4.8 GB with 4,096-row blocks; 10,000 rows now peak at 0.44 GB, and run faster (3.2 s vs 5.2 s).

    >>> fitted = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> weighted_placement(fitted, np.array([[0.0, 0.0], [2.0, 2.0]]), np.array([[1.0, 1.0]]), k=2).round(6).tolist()
    [[1.0, 1.0]]
    """
    f, z = _normalise(np.atleast_2d(fitted)), _normalise(np.atleast_2d(rows))
    k = max(1, min(k, len(f)))
    out = np.zeros((len(z), 2), dtype=float)
    step = max(1, min(batch, PLACE_BLOCK_BYTES // (12 * max(1, len(f)))))
    for start in range(0, len(z), step):
        sims = z[start : start + step] @ f.T  # (b, n_fitted) float32
        top = (
            np.argpartition(sims, len(f) - k, axis=1)[:, len(f) - k :]  # the k largest, in no order
            if k < len(f)
            else np.broadcast_to(np.arange(len(f)), sims.shape)
        )
        weights = np.clip(np.take_along_axis(sims, top, axis=1), 0.0, None).astype(np.float64) + 1e-9
        out[start : start + len(sims)] = (coords[top] * weights[..., None]).sum(1) / weights.sum(1, keepdims=True)
        if on_progress is not None:
            on_progress(start + len(sims), len(z))
    return out


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


def _fit_all(z: np.ndarray, seed: int, n_neighbors: int, min_dist: float) -> EmbeddingMap:
    """A layout fitted on every row of the normalised ``z``."""
    if len(z) < _MIN_UMAP:
        fitted = _pca(z) if len(z) else EmbeddingMap("pca", np.zeros((0, 2)))
        fitted.params.update(fitted=len(z), placed=0)
        return fitted
    import umap

    params: dict[str, Any] = {"n_neighbors": min(n_neighbors, len(z) - 1), "min_dist": min_dist, "random_state": seed}
    if len(z) < 30:
        params["init"] = "pca"
    reducer = umap.UMAP(n_components=2, metric="euclidean", n_jobs=1, **params)
    coords = reducer.fit_transform(z)
    return EmbeddingMap("umap", np.asarray(coords, dtype=float), {**params, "fitted": len(z), "placed": 0}, reducer)


def fit_map(
    x: np.ndarray,
    *,
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    sample: int = SAMPLE,
    batch: int = BATCH,
    on_progress: PlaceProgress | None = None,
) -> EmbeddingMap:
    """Fit a 2-D map of the rows of ``x`` (seeded: the same input gives the same map in one environment).

    Up to ``sample`` rows: one fit over all of them. More: the layout is fitted on ``sample`` rows drawn uniformly
    without replacement (``numpy.random.default_rng(seed)``; their indices in ``fitted_rows``), and every other row
    is placed by :func:`weighted_placement` among the sampled rows (``batch`` rows at a time, ``on_progress(done,
    total)`` after each chunk). The sampled rows'
    coordinates are those of a plain fit of the sample; ``params`` records ``fitted`` and ``placed`` row counts.
    """
    z = _normalise(np.atleast_2d(x)) if len(x) else np.zeros((0, 2), dtype=np.float32)
    if len(z) <= max(sample, _MIN_UMAP):
        return _fit_all(z, seed, n_neighbors, min_dist)
    chosen = np.sort(np.random.default_rng(seed).choice(len(z), size=sample, replace=False))
    fitted = _fit_all(z[chosen], seed, n_neighbors, min_dist)
    rest = np.setdiff1d(np.arange(len(z)), chosen, assume_unique=True)
    coords = np.zeros((len(z), 2), dtype=float)
    coords[chosen] = fitted.coords
    coords[rest] = weighted_placement(z[chosen], fitted.coords, z[rest], batch=batch, on_progress=on_progress)
    params = {**fitted.params, "fitted": len(chosen), "placed": len(rest), "sample_seed": seed}
    return EmbeddingMap(
        fitted.method, coords, params, fitted._reducer, fitted._mean, fitted._components, fitted_rows=chosen
    )


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


def fit_faceted(
    x: np.ndarray,
    groups: Sequence[str],
    *,
    seed: int = 0,
    sample: int = SAMPLE,
    on_progress: PlaceProgress | None = None,
) -> FacetedMap:
    """Fit one :func:`fit_map` per group (largest first, ties by name) and tile them (see :class:`FacetedMap`).

    ``sample`` applies to each tile: a group of more rows is fitted on a sample and the rest placed. ``on_progress``
    counts rows placed over all tiles."""
    if len(groups) != len(x):
        raise ValueError(f"{len(x)} rows but {len(groups)} groups")
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    order = sorted(members, key=lambda g: (-len(members[g]), g))
    coords = np.zeros((len(x), 2), dtype=float)
    tiles = {}
    to_place = sum(max(0, len(rows) - sample) for rows in members.values() if len(rows) > max(sample, _MIN_UMAP))
    placed = 0
    for index, group in enumerate(order):
        rows = members[group]

        def tile_progress(done: int, total: int, before: int = placed) -> None:
            if on_progress is not None:
                on_progress(before + done, to_place)

        fitted = fit_map(np.asarray(x)[rows], seed=seed, sample=sample, on_progress=tile_progress)
        placed += int(fitted.params.get("placed", 0))
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
