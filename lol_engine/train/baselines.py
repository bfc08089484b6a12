"""Simple baselines beside every LoL model: the same splits, the same metrics, hyperparameters chosen on ``val``.

A LoL model is worth its cost only where it beats these. Each baseline fits on the ``train`` split, picks its one
hyperparameter set by the task loss on ``val`` (as LoL models pick their epoch and seed) and reports
:func:`lol_engine.train.tasks.metrics` on ``val`` and ``test``:

- ``constant``: the training split's mean (regression), majority class (categorical) or per-entry positive rate
  (binary, multi-label; masked entries skipped);
- ``linear · <features>``: ridge regression (regression) or L2-regularised logistic regression (classification, one
  per entry for multi-label), ``alpha`` (``C = 1 / alpha``) from a grid, on standardised features;
- ``gbt · <features>``: scikit-learn's ``HistGradientBoosting`` regressor / classifier, learning rate and leaf count
  from a small grid.

Features (:func:`zoo_features`):

- ``fingerprint``: the GL-invariant :func:`lol_engine.fingerprint.fingerprint` (spectral summaries per module role);
- ``spectra``: per module, the sorted top-``k`` singular values of the scaled ΔW, modules in the zoo's name order,
  concatenated; a rank below ``k`` or a missing module is zero-padded (the input of the paper's MLP + SVD);
- ``hyperparameters``: the recipe's recorded training choices (numeric ``hp_*`` columns) **without** the data
  choices: :data:`DATA_CHOICES` (which classes, which identity, which images) decide labels such as ``classes``,
  ``n_classes``, ``class``, ``bold`` and probe membership outright, so a baseline that read them would read the label.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lol_engine.train.tasks import Task, infer_task, metrics, targets

if TYPE_CHECKING:
    from lol_engine.train.loop import LoadedZoo

__all__ = ["DATA_CHOICES", "GBT_GRID", "LINEAR_ALPHAS", "fit_baselines", "hyperparameter_columns", "zoo_features"]

# hp_* names that pick the data (which classes, categories, identity, images): several labels are these choices
DATA_CHOICES = frozenset({"classes_mask", "sources_mask", "data_seed", "identity", "image_seed"})
LINEAR_ALPHAS = tuple(float(a) for a in np.logspace(-3, 3, 7))
GBT_GRID: tuple[dict[str, Any], ...] = (
    {"learning_rate": 0.1, "max_leaf_nodes": 7},
    {"learning_rate": 0.1, "max_leaf_nodes": 31},
    {"learning_rate": 0.03, "max_leaf_nodes": 15, "max_iter": 300},
)
_EPS = 1e-6


def hyperparameter_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Numeric ``hp_*`` columns that are training choices (not :data:`DATA_CHOICES`, no seed), in manifest order."""
    if not rows:
        return []
    return [
        k
        for k, v in rows[0].items()
        if k.startswith("hp_")
        and k[3:] not in DATA_CHOICES
        and "seed" not in k
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
    ]


def _spectra(zoo: LoadedZoo, k: int | None) -> np.ndarray:
    from lol_engine.spec import natural_key
    from lol_engine.symmetry import lora_singular_values

    per = [lora_singular_values(lora) for lora in zoo.loras]
    names = sorted({n for s in per for n in s}, key=natural_key)
    k = k or max(int(t.numel()) for s in per for t in s.values())
    out = np.zeros((len(per), len(names) * k))
    for i, s in enumerate(per):
        for j, name in enumerate(names):
            if name in s:
                sigma = torch.sort(s[name].double().cpu(), descending=True).values[:k].numpy()
                out[i, j * k : j * k + len(sigma)] = sigma
    return out


def zoo_features(zoo: LoadedZoo, k: int | None = None) -> dict[str, np.ndarray]:
    """``{"fingerprint", "spectra", "hyperparameters"}`` feature matrices, one row per LoRA of ``zoo`` (the last only
    where the manifest records training choices). ``k``: singular values per module (default: the largest rank)."""
    from lol_engine.fingerprint import fingerprint

    out = {
        "fingerprint": np.stack([fingerprint(lora).numpy() for lora in zoo.loras]),
        "spectra": _spectra(zoo, k),
    }
    columns = hyperparameter_columns(zoo.rows)
    if columns:
        out["hyperparameters"] = np.array([[float(r[c]) for c in columns] for r in zoo.rows])
    return out


@dataclass(frozen=True)
class _Data:
    task: Task
    y: np.ndarray  # (N,) or (N, out_dim)
    mask: np.ndarray  # like y
    idx: dict[str, np.ndarray]  # split name -> row indices


def _logits(task: Task, scores: np.ndarray) -> torch.Tensor:
    """Model-style logits from predictions: values (regression) or probabilities (classification)."""
    if task.kind == "regression":
        return torch.tensor((scores.reshape(-1, 1) - task.mean) / task.std, dtype=torch.float32)
    p = np.clip(scores, _EPS, 1 - _EPS)
    if task.kind == "categorical":
        return torch.tensor(np.log(p), dtype=torch.float32)
    return torch.tensor(np.log(p) - np.log1p(-p), dtype=torch.float32).reshape(len(p), -1)


def _scores(data: _Data, logits: torch.Tensor, split: str) -> dict[str, float]:
    idx = data.idx[split]
    y = torch.tensor(data.y[idx], dtype=torch.float32)
    mask = torch.tensor(data.mask[idx], dtype=torch.bool)
    return metrics(data.task, logits[idx], y, mask)


def _linear(x: np.ndarray, y: np.ndarray, fit: np.ndarray, params: dict[str, Any], kind: str) -> Any:
    """Predictions for every row (regression) or ``(probabilities, classes)``, fitted on rows ``fit``."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x[fit])
    xs = scaler.transform(x)
    if kind == "regression":
        return Ridge(alpha=params["alpha"]).fit(xs[fit], y[fit]).predict(xs)
    model = LogisticRegression(C=1.0 / params["alpha"], max_iter=2000).fit(xs[fit], y[fit])
    return model.predict_proba(xs), model.classes_


def _gbt(x: np.ndarray, y: np.ndarray, fit: np.ndarray, params: dict[str, Any], kind: str) -> Any:
    """As :func:`_linear`, with gradient-boosted trees (raw features: trees need no scaling)."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    if kind == "regression":
        return (
            HistGradientBoostingRegressor(early_stopping=False, random_state=0, **params)
            .fit(x[fit], y[fit])
            .predict(x)
        )
    model = HistGradientBoostingClassifier(early_stopping=False, random_state=0, **params).fit(x[fit], y[fit])
    return model.predict_proba(x), model.classes_


def _predict(data: _Data, x: np.ndarray, learner: Callable[..., Any], params: dict[str, Any]) -> np.ndarray:
    """Predictions for every row (values, class probabilities, or per-entry probabilities of 1)."""
    task, fit = data.task, data.idx["train"]
    if task.kind == "regression":
        return np.asarray(learner(x, data.y, fit, params, "regression"))
    if task.kind == "categorical":
        labels = data.y.astype(int)
        out = np.full((len(x), task.out_dim), _EPS)
        if len(set(labels[fit].tolist())) == 1:
            out[:, labels[fit][0]] = 1.0
            return out
        proba, classes = learner(x, labels, fit, params, "classification")
        out[:, classes] = proba
        return out
    y = data.y.reshape(len(x), -1).astype(int)
    mask = data.mask.reshape(len(x), -1)
    out = np.zeros(y.shape)
    for j in range(y.shape[1]):
        rows = fit[mask[fit, j]]
        if len(rows) == 0 or len(set(y[rows, j].tolist())) == 1:
            out[:, j] = y[rows, j].mean() if len(rows) else 0.5
            continue
        proba, classes = learner(x, y[:, j], rows, params, "classification")
        out[:, j] = proba[:, list(classes).index(1)]
    return out


def _constant(data: _Data) -> np.ndarray:
    task, fit, n = data.task, data.idx["train"], len(data.y)
    if task.kind == "regression":
        return np.full(n, data.y[fit].mean())
    if task.kind == "categorical":
        counts = np.bincount(data.y[fit].astype(int), minlength=task.out_dim)
        out = np.full((n, task.out_dim), _EPS)
        out[:, counts.argmax()] = 1.0  # the loss of a hard majority is large; accuracy is the point here
        return out
    y, mask = data.y.reshape(n, -1)[fit], data.mask.reshape(n, -1)[fit]
    rate = (y * mask).sum(0) / np.maximum(mask.sum(0), 1)
    return np.broadcast_to(rate, (n, len(rate))).copy()


def _best_on_val(
    data: _Data, x: np.ndarray, learner: Callable[..., Any], grid: list[dict[str, Any]]
) -> dict[str, Any]:
    best: dict[str, Any] | None = None
    for params in grid:
        logits = _logits(data.task, _predict(data, x, learner, params))
        val = _scores(data, logits, "val")
        if best is None or val["loss"] < best["val"]["loss"]:
            best = {"val": val, "test": _scores(data, logits, "test"), "params": params}
    assert best is not None
    return best


def fit_baselines(
    zoo: LoadedZoo,
    label: str,
    features: dict[str, np.ndarray] | None = None,
    learners: tuple[str, ...] = ("linear", "gbt"),
    quick: bool = False,
) -> dict[str, dict[str, Any]]:
    """Every baseline of ``label`` on ``zoo``'s splits: ``{name: {"val": metrics, "test": metrics, "params": …}}``.

    ``features`` defaults to :func:`zoo_features` (pass it to share one computation between labels). Names are
    ``constant`` and ``<learner> · <features>``, e.g. ``gbt · spectra``. ``quick``: one GBT setting and three
    alphas (smoke runs).
    """
    idx = {name: zoo.split(name) for name in ("train", "val", "test")}
    task = infer_task(zoo.rows, label, idx["train"])
    y, mask = targets(zoo.rows, task)
    data = _Data(task, y.numpy(), mask.numpy(), idx)
    features = zoo_features(zoo) if features is None else features
    const = _logits(task, _constant(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank correlations of a constant are undefined (nan)
        out: dict[str, dict[str, Any]] = {
            "constant": {"val": _scores(data, const, "val"), "test": _scores(data, const, "test"), "params": {}}
        }
    alphas = LINEAR_ALPHAS[::3] if quick else LINEAR_ALPHAS
    grids: dict[str, tuple[Callable[..., Any], list[dict[str, Any]]]] = {
        "linear": (_linear, [{"alpha": a} for a in alphas]),
        "gbt": (_gbt, [dict(p) for p in GBT_GRID[:1] if quick] or [dict(p) for p in GBT_GRID]),
    }
    for feature_name, x in features.items():
        for learner_name in learners:
            learner, grid = grids[learner_name]
            out[f"{learner_name} · {feature_name}"] = _best_on_val(data, x, learner, grid)
    return out
