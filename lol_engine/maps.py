"""2-D maps of LoRA embeddings: UMAP (the only module that imports umap), with a PCA fallback for tiny collections.

Rules: rows are L2-normalised (Euclidean distance then orders like cosine distance); n < 4 → PCA
(UMAP fails for n = 2, 3); 4 ≤ n < 30 → UMAP with ``init="pca"`` and ``n_neighbors = min(15, n − 1)``; otherwise
UMAP defaults. A fitted map places new points with ``transform`` without moving the old ones. UMAP's first fit in a
process pays ~20 s of JIT compilation: :func:`warm_up` pays it in a background thread, off the request path.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["EmbeddingMap", "fit_map", "warm_up"]

_MIN_UMAP = 4


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


def warm_up(dim: int = 16) -> threading.Thread:
    """Compile UMAP's JIT code in a daemon thread (fit 50 random points, then transform); returns the thread."""

    def run() -> None:
        rng = np.random.default_rng(0)
        fitted = fit_map(rng.normal(size=(50, dim)))
        fitted.place(rng.normal(size=(3, dim)))

    thread = threading.Thread(target=run, name="umap-warm-up", daemon=True)
    thread.start()
    return thread
