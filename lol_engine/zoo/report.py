"""What is in a built zoo: label spreads, cost per LoRA, and trivial baselines that expose leaks and confounds.

Baselines are fitted on the manifest's ``train`` split and scored on ``test``: the train mean (or majority class),
and a model that sees only ``log ‖ΔW‖_F`` of the whole LoRA (linear regression, or logistic regression for
categorical labels). A learned LoL model is only interesting where it beats the norm-only baseline.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from lol_engine.lora.parse import load_lora
from lol_engine.symmetry import total_fro_norm
from lol_engine.zoo.manifest import read_manifest

__all__ = ["summarize_zoo"]

_MAX_CATEGORIES = 20


def _log_norms(zoo: Path, rows: list[dict[str, Any]]) -> np.ndarray:
    return np.array([[math.log(float(total_fro_norm(load_lora(zoo / r["path"]))) + 1e-12)] for r in rows])


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else float("nan")


def _regression(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> dict[str, float]:
    from sklearn.linear_model import LinearRegression

    out = {"min": float(y.min()), "mean": float(y.mean()), "std": float(y.std()), "max": float(y.max())}
    if train.sum() < 2 or test.sum() < 2:  # too few LoRAs in a split for a baseline
        return out | {"test_r2_mean_baseline": float("nan"), "test_r2_norm_only": float("nan")}
    norm_model = LinearRegression().fit(x[train], y[train])
    return out | {
        "test_r2_mean_baseline": _r2(y[test], np.full(test.sum(), y[train].mean())),
        "test_r2_norm_only": _r2(y[test], norm_model.predict(x[test])),
    }


def _classification(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression

    binary = set(np.unique(y).tolist()) <= {0, 1}
    out = {"positive_rate": float(y.mean())} if binary else {"n_values": float(len(np.unique(y)))}
    if not train.any() or not test.any():
        return out | {"test_acc_majority": float("nan"), "test_acc_norm_only": float("nan")}
    values, counts = np.unique(y[train], return_counts=True)
    majority = values[np.argmax(counts)]
    out["test_acc_majority"] = float((y[test] == majority).mean())
    if len(values) > 1:
        model = LogisticRegression(max_iter=1000).fit(x[train], y[train])
        out["test_acc_norm_only"] = float((model.predict(x[test]) == y[test]).mean())
    else:
        out["test_acc_norm_only"] = out["test_acc_majority"]
    return out


def _multilabel(
    x: np.ndarray, y: np.ndarray, mask: np.ndarray, train: np.ndarray, test: np.ndarray
) -> dict[str, float]:
    """Per position: majority and norm-only classifiers; accuracy over all valid (LoRA, position) test pairs."""
    hits_major, hits_norm, total = 0.0, 0.0, 0
    for j in range(y.shape[1]):
        valid_train, valid_test = train & mask[:, j], test & mask[:, j]
        if not valid_test.any() or not valid_train.any():
            continue
        scores = _classification(
            x[valid_train | valid_test],
            y[valid_train | valid_test, j],
            train[valid_train | valid_test],
            test[valid_train | valid_test],
        )
        n = int(valid_test.sum())
        hits_major += scores["test_acc_majority"] * n
        hits_norm += scores["test_acc_norm_only"] * n
        total += n
    return {
        "positions": float(y.shape[1]),
        "positive_rate": float(y[mask].mean()),
        "test_acc_majority": hits_major / total if total else float("nan"),
        "test_acc_norm_only": hits_norm / total if total else float("nan"),
    }


def _folds(split: np.ndarray, min_test: int = 20, k: int = 5) -> tuple[str, list[tuple[np.ndarray, np.ndarray]]]:
    """The manifest's train → test split, or k-fold cross-validation when its test split is too small."""
    train, test = split == "train", split == "test"
    if test.sum() >= min_test:
        return "train->test split", [(train, test)]
    fold = np.arange(len(split)) % k
    return f"{k}-fold cross-validation (test split < {min_test})", [(fold != i, fold == i) for i in range(k)]


def _label_stats(
    rows: list[dict[str, Any]], key: str, x: np.ndarray, train: np.ndarray, test: np.ndarray
) -> dict[str, float]:
    values = [r[key] for r in rows]
    if isinstance(values[0], list):
        y = np.array(values, dtype=int)
        mask_key = f"{key}_mask".replace("_member_mask", "_mask")
        mask = (
            np.array([r[mask_key] for r in rows], dtype=bool) if mask_key in rows[0] else np.ones_like(y, dtype=bool)
        )
        return _multilabel(x, y, mask, train, test)
    if isinstance(values[0], int) and len(set(values)) <= _MAX_CATEGORIES:
        return _classification(x, np.array(values), train, test)
    return _regression(x, np.array(values, dtype=float), train, test)


def summarize_zoo(zoo: str | Path) -> dict[str, Any]:
    """Label spreads, baselines and costs of a built zoo (a folder with ``manifest.parquet``)."""
    zoo = Path(zoo)
    rows = read_manifest(zoo)
    split = np.array([r["split"] for r in rows])
    protocol, folds = _folds(split)
    x = _log_norms(zoo, rows)
    seconds = np.array([r["train_seconds"] for r in rows])
    labels: dict[str, dict[str, float]] = {}
    for key in sorted(k for k in rows[0] if k.startswith("y_") and not k.endswith("_mask")):
        per_fold = [_label_stats(rows, key, x, train, test) for train, test in folds]
        labels[key] = {
            name: float(np.nanmean([f[name] for f in per_fold])) if name.startswith("test_") else per_fold[0][name]
            for name in per_fold[0]
        }
    return {
        "zoo": str(zoo),
        "n": len(rows),
        "splits": {s: int((split == s).sum()) for s in ("train", "val", "cal", "test")},
        "baseline_protocol": protocol,
        "train_seconds_mean": float(seconds.mean()),
        "train_seconds_median": float(np.median(seconds)),
        "labels": labels,
    }
