"""Out-of-domain warnings: how far a LoRA lies from the LoRAs a predictor learned from, in its own features.

The features are the predictor's head's hidden layer read *before* its LayerNorm
(:meth:`~lol_engine.train.checkpoint.Predictor.domain_features_many`, ``(N, 64)`` for the shipped predictors). The
embedding :meth:`~lol_engine.train.checkpoint.Predictor.embed` returns beside each estimate is that same layer after
LayerNorm and ReLU: normalised, it cannot tell a LoRA from the same LoRA with factors ×100 (on the shipped
``fashion-gen-class`` and ``digits-classes`` none of 20 such test LoRAs stood out there, against all 20 before the
LayerNorm). The features of the training LoRAs (the zoo's ``train`` split) are kept as a reference,
``reference.safetensors`` in the predictor's folder (one float32 tensor ``embeddings``, ``(n, 64)``). Then, for any
LoRA :math:`x` with features :math:`e(x)`:

.. math::
    d(x) = \\frac{1}{k} \\sum_{j=1}^{k} \\lVert e(x) - e(t_{(j)}) \\rVert_2

where :math:`t_{(1)}, …, t_{(k)}` are the :math:`k = 5` training LoRAs nearest to it. The threshold is the 99th
percentile (NumPy's default, linear interpolation) of :math:`d` over the predictor's held-out LoRAs, the zoo's
``cal`` and ``test`` splits (``val`` when a collection has neither). A LoRA with :math:`d` above it is **out of
domain**: farther from the LoRAs the predictor learned from than 99 % of held-out LoRAs like them, so its estimate
and its calibrated range (both rest on LoRAs like the zoo's) may not hold.

:math:`d` inherits the features' symmetry: for a GL(r)-invariant predictor it is the same for every factorisation
of one ΔW (``tests/test_shipped_invariance.py``). ``config.json`` records the threshold and how it was made under
``domain``; :func:`reference_folder` writes both (``lol predictors reference``), and
:func:`~lol_engine.train.calibrate.calibrate_folder` runs it after calibrating.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lol_engine.errors import BadRequestError

if TYPE_CHECKING:
    from lol_engine.train.checkpoint import Predictor
    from lol_engine.train.loop import LoadedZoo

__all__ = [
    "HELD_OUT",
    "QUANTILE",
    "REFERENCE",
    "DomainReference",
    "K",
    "fit_reference",
    "held_out_splits",
    "knn_mean_distance",
    "load_reference",
    "reference_folder",
]

REFERENCE = "reference.safetensors"
K = 5
QUANTILE = 0.99
HELD_OUT = ("cal", "test")
_CHUNK = 256  # query rows per distance block: (256, n) float64 stays small for any zoo


def knn_mean_distance(queries: Any, reference: Any, k: int = K) -> np.ndarray:
    """Mean Euclidean distance from each query row to its ``k`` nearest ``reference`` rows (all of them when there are
    fewer), in float64.

    >>> knn_mean_distance([[0.0, 0.0]], [[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]], k=2)
    array([3.])
    """
    q = np.asarray(queries, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1] or len(r) == 0 or k < 1:
        raise BadRequestError(f"cannot measure distances of {q.shape} rows to a {r.shape} reference with k={k}")
    kk = min(k, len(r))
    r_sq = (r * r).sum(1)  # (n,)
    out = np.empty(len(q))
    for start in range(0, len(q), _CHUNK):
        block = q[start : start + _CHUNK]  # (m, k)
        d2 = (block * block).sum(1)[:, None] + r_sq[None, :] - 2.0 * block @ r.T  # (m, n)
        dist = np.sqrt(np.clip(d2, 0.0, None))
        out[start : start + len(block)] = np.partition(dist, kk - 1, axis=1)[:, :kk].mean(1)
    return out


@dataclass(frozen=True)
class DomainReference:
    """A predictor's training LoRAs in its domain features, and the distance beyond which a LoRA is out of domain."""

    embeddings: np.ndarray  # (n, k) float32: one row per training LoRA
    k: int
    threshold: float

    def distances(self, vectors: Any) -> np.ndarray:
        """:func:`knn_mean_distance` of each row of domain features to the reference."""
        return knn_mean_distance(vectors, self.embeddings, self.k)

    def out_of_domain(self, distance: float) -> bool:
        """Whether a LoRA at ``distance`` lies beyond the threshold."""
        return bool(distance > self.threshold)


def held_out_splits(zoo: LoadedZoo) -> list[str]:
    """The splits whose LoRAs set the threshold: ``cal`` and ``test`` (those with rows), else ``val``."""
    splits = [s for s in HELD_OUT if len(zoo.split(s))]
    return splits or (["val"] if len(zoo.split("val")) else [])


def _embed(predictor: Predictor, zoo: LoadedZoo, rows: np.ndarray, chunk: int = 128) -> np.ndarray:
    """The predictor's domain features of ``zoo``'s LoRAs ``rows``, batched: ``(len(rows), k)`` float32."""
    batches = [rows[s : s + chunk] for s in range(0, len(rows), chunk)]
    parts = [predictor.domain_features_many([zoo.loras[int(i)] for i in batch]) for batch in batches]
    return torch.cat(parts).numpy().astype(np.float32)


def fit_reference(
    predictor: Predictor, zoo: LoadedZoo, k: int = K, quantile: float = QUANTILE
) -> tuple[DomainReference, dict[str, Any]]:
    """The reference of ``predictor`` (its domain features of ``zoo``'s train split) and its ``domain`` entry for
    ``config.json`` (the threshold: the ``quantile`` of :func:`knn_mean_distance` over :func:`held_out_splits`)."""
    if not 0.0 < quantile < 1.0 or k < 1:
        raise BadRequestError(f"need 0 < quantile < 1 and k >= 1, got quantile {quantile}, k {k}")
    train, splits = zoo.split("train"), held_out_splits(zoo)
    if not len(train) or not splits:
        raise BadRequestError("a domain reference needs LoRAs in the train split and in cal, test or val")
    reference = _embed(predictor, zoo, train)  # (n, k) float32, as stored
    held = np.concatenate([zoo.split(s) for s in splits])
    distances = knn_mean_distance(_embed(predictor, zoo, held), reference, k)
    threshold = float(np.percentile(distances, 100 * quantile))
    entry = {
        "method": f"mean Euclidean distance to the {k} nearest training LoRAs in the predictor's head features "
        "before its LayerNorm",
        "reference": REFERENCE,
        "k": k,
        "quantile": quantile,
        "threshold": threshold,
        "n_reference": len(train),
        "embedding_dim": int(reference.shape[1]),
        "held_out_splits": splits,
        "n_held_out": len(held),
        "held_out_median": float(np.median(distances)),
        "held_out_flagged": float((distances > threshold).mean()),
    }
    return DomainReference(reference, k, threshold), entry


def load_reference(folder: str | Path, config: dict[str, Any]) -> DomainReference | None:
    """The reference a folder holds (``config["domain"]`` and its file), or None when it has none."""
    from safetensors.numpy import load_file

    entry = config.get("domain")
    if not isinstance(entry, dict):
        return None
    path = Path(folder) / str(entry.get("reference", REFERENCE))
    if path.name != REFERENCE or not path.is_file():
        return None
    embeddings = load_file(str(path))["embeddings"]
    return DomainReference(embeddings.astype(np.float32, copy=False), int(entry["k"]), float(entry["threshold"]))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(json.dumps(data, indent=2))
    os.replace(staged, path)


def reference_folder(folder: str | Path, zoo: LoadedZoo, k: int = K, quantile: float = QUANTILE) -> dict[str, Any]:
    """Write the reference of the predictor saved in ``folder`` (:data:`REFERENCE`) and record in its
    ``config.json``: ``domain`` (:func:`fit_reference`), ``zoo_splits`` (LoRAs per split of ``zoo``), and, for a zoo
    built by a recipe, ``recipe`` and ``target`` (the label's description from the recipe, for the glossary)."""
    from lol_engine.lora.safe_io import write_safetensors
    from lol_engine.train.checkpoint import load_predictor
    from lol_engine.zoo.registry import recipe_class

    folder = Path(folder)
    predictor = load_predictor(folder)
    reference, entry = fit_reference(predictor, zoo, k=k, quantile=quantile)
    write_safetensors({"embeddings": torch.from_numpy(reference.embeddings)}, folder / REFERENCE)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["domain"] = entry
    config["zoo_splits"] = dict(sorted(Counter(str(r["split"]) for r in zoo.rows).items()))
    recipes = {r.get("recipe") for r in zoo.rows}
    recipe = recipe_class(str(recipes.pop())) if len(recipes) == 1 and None not in recipes else None
    if recipe is not None:
        config["recipe"] = recipe.name
        description = recipe.label_descriptions.get(predictor.task.label)
        if description is not None:
            config["target"] = description.to_json()
    _write_json(config_path, config)
    return entry
