"""Prediction tasks inferred from a zoo manifest's label columns, with their losses, decoders and metrics."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lol_engine.errors import NotFoundError

__all__ = ["Task", "infer_task", "metrics", "targets"]

_MAX_CATEGORIES = 20


@dataclass(frozen=True)
class Task:
    """One label of a zoo as a learning problem."""

    label: str  # manifest column without "y_", e.g. "quality"
    kind: str  # regression | binary | categorical | multilabel
    out_dim: int
    names: tuple[str, ...]  # output names: the label, its classes, or its positions
    mean: float = 0.0  # regression targets are standardised with the training split's mean and std
    std: float = 1.0
    mask_label: str | None = None  # multilabel entries that count (e.g. probes of trained classes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for ``config.json``."""
        out = asdict(self)
        out["names"] = list(self.names)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Task:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**raw, "names": tuple(raw["names"])})

    def loss(self, logits: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        """Training loss: MSE on standardised targets, BCE, or cross-entropy; masked entries ignored."""
        if self.kind == "regression":
            return nn.functional.mse_loss(logits[:, 0], (y - self.mean) / self.std)
        if self.kind == "categorical":
            return nn.functional.cross_entropy(logits, y.long())
        target = y.view_as(logits)
        raw = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        weights = mask.view_as(logits).to(raw.dtype)
        return (raw * weights).sum() / weights.sum().clamp_min(1.0)

    def decode(self, logits: Tensor) -> Tensor:
        """Predictions in label units: values, probabilities of 1, or class probabilities."""
        if self.kind == "regression":
            return logits[:, 0] * self.std + self.mean
        if self.kind == "categorical":
            return torch.softmax(logits, dim=1)
        probs = torch.sigmoid(logits)
        return probs[:, 0] if self.kind == "binary" else probs


def infer_task(rows: list[dict[str, Any]], label: str, train: np.ndarray) -> Task:
    """The task of manifest column ``y_<label>``; regression statistics come from the ``train`` rows only.

    Lists are multi-label; integers 0/1 binary; integers that are class codes ``0..K-1`` with ``K ≤ 20`` categorical;
    every other number (counts such as ``ss_num_train_images`` = 10, 20, … 320, scores, rates) regression.
    """
    key = f"y_{label}"
    if not rows or key not in rows[0]:
        known = sorted(k[2:] for k in rows[0] if k.startswith("y_")) if rows else []
        raise NotFoundError(f"the zoo has no label {label!r}; known: {', '.join(known)}")
    values = [r[key] for r in rows]
    if isinstance(values[0], list):
        mask_key = f"y_{label.removesuffix('_member')}_mask"
        mask_label = mask_key[2:] if mask_key in rows[0] else None
        return Task(
            label,
            "multilabel",
            len(values[0]),
            tuple(f"{label}[{i}]" for i in range(len(values[0]))),
            mask_label=mask_label,
        )
    distinct = sorted(set(values))
    if isinstance(values[0], int) and distinct == [0, 1]:
        return Task(label, "binary", 1, (label,))
    if isinstance(values[0], int) and distinct[0] >= 0 and distinct[-1] < _MAX_CATEGORIES:  # class codes 0..K-1
        return Task(label, "categorical", max(distinct) + 1, tuple(str(v) for v in range(max(distinct) + 1)))
    y = np.array(values, dtype=float)[train]
    return Task(label, "regression", 1, (label,), mean=float(y.mean()), std=float(y.std()) or 1.0)


def targets(rows: list[dict[str, Any]], task: Task) -> tuple[Tensor, Tensor]:
    """``(y, mask)`` tensors for the rows; ``mask`` marks the entries that count."""
    y = torch.tensor([r[f"y_{task.label}"] for r in rows], dtype=torch.float32)
    if task.mask_label is not None:
        mask = torch.tensor([r[f"y_{task.mask_label}"] for r in rows], dtype=torch.bool)
    else:
        mask = torch.ones_like(y, dtype=torch.bool)
    return y, mask


def metrics(task: Task, logits: Tensor, y: Tensor, mask: Tensor) -> dict[str, float]:
    """Test-time metrics.

    Regression: R², Spearman, Kendall τ; binary and multilabel: accuracy (logit > 0) and macro AUC; categorical:
    accuracy. Always the task loss.
    """
    from scipy.stats import kendalltau, spearmanr
    from sklearn.metrics import roc_auc_score

    logits, y, mask = logits.detach().cpu(), y.cpu(), mask.cpu()  # trained on a GPU: numpy needs CPU tensors
    out = {"loss": float(task.loss(logits, y, mask))}
    if task.kind == "regression":
        pred = task.decode(logits).numpy()
        truth = y.numpy()
        ss = float(((truth - truth.mean()) ** 2).sum())
        out["r2"] = 1.0 - float(((truth - pred) ** 2).sum()) / ss if ss > 0 else math.nan
        out["spearman"] = float(spearmanr(truth, pred).statistic)
        out["kendall"] = float(kendalltau(truth, pred).statistic)
    elif task.kind == "categorical":
        out["accuracy"] = float((logits.argmax(1) == y.long()).float().mean())
    else:
        scores = logits.view(len(logits), -1).numpy()
        truth = y.view(len(y), -1).numpy()
        valid = mask.view(len(mask), -1).numpy()
        out["accuracy"] = float(((scores > 0) == (truth > 0.5))[valid].mean())
        aucs = [
            roc_auc_score(truth[valid[:, j], j], scores[valid[:, j], j])
            for j in range(truth.shape[1])
            if len(set(truth[valid[:, j], j].tolist())) == 2
        ]
        out["auc"] = float(np.mean(aucs)) if aucs else math.nan
    return out
