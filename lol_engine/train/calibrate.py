"""Split-conformal calibration of predictors: intervals for regression, label sets for classification.

A predictor is calibrated once on its zoo's ``cal`` split (seen neither by the weights' training nor by the early
stopping and model choice made on ``val``) and checked on the test split. Calibrating on ``val`` itself under-covers:
the epoch and seed chosen there are the ones whose errors happen to be small on it (the shipped ``digits-acc_own``
covered .82 of test labels at a nominal .90 that way). A collection whose own ``split`` label has no ``cal`` rows falls
back to ``val``, and its calibration says so (``"split": "val"``).

With nonconformity scores ``s`` on ``n`` calibration LoRAs, the threshold ``q`` is the ``⌈(n + 1)·coverage⌉``-th
smallest score; for a new LoRA from the same distribution:

- regression: ``[ŷ − q, ŷ + q]`` holds the true label with probability ≥ ``coverage`` (score ``|y − ŷ|``);
- categorical: the set ``{k : 1 − p_k ≤ q}`` holds the true class (score ``1 − p_true``);
- binary and multilabel: per entry, the set of values ``v ∈ {0, 1}`` with ``1 − p(v) ≤ q`` (score ``1 − p(y)``);
  coverage is then per entry, not joint.

The guarantee is marginal and only for LoRAs like the zoo's (same base, same recipe); the app says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from lol_engine.errors import BadRequestError
from lol_engine.estimate import Estimate, Kind
from lol_engine.lora.weights import LoraWeights
from lol_engine.train.tasks import Task

if TYPE_CHECKING:
    from lol_engine.train.checkpoint import Predictor
    from lol_engine.train.loop import LoadedZoo

__all__ = [
    "calibrate",
    "calibrate_folder",
    "calibration_split",
    "conformal_quantile",
    "estimate",
    "estimate_from",
    "nonconformity",
]


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The ``⌈(n + 1)·coverage⌉``-th smallest score (``inf`` when there are too few scores for that coverage)."""
    if not 0.0 < coverage < 1.0:
        raise BadRequestError(f"coverage must be in (0, 1), got {coverage}")
    s = np.sort(np.asarray(scores, dtype=float).reshape(-1))
    rank = math.ceil((len(s) + 1) * coverage)
    return float(s[rank - 1]) if rank <= len(s) else math.inf


def nonconformity(task: Task, decoded: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Scores of the true labels under ``decoded`` predictions (see the module docstring), masked entries dropped."""
    if task.kind == "regression":
        return (y - decoded).abs().numpy()
    if task.kind == "categorical":
        return (1.0 - decoded.gather(1, y.long().view(-1, 1))[:, 0]).numpy()
    p = decoded.reshape(y.shape)
    p_true = torch.where(y > 0.5, p, 1.0 - p)
    return (1.0 - p_true)[mask.reshape(y.shape)].numpy()


def _covered(task: Task, decoded: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, q: float) -> np.ndarray:
    return nonconformity(task, decoded, y, mask) <= q


def _size(task: Task, decoded: torch.Tensor, mask: torch.Tensor, q: float) -> float:
    """Mean interval width (regression) or mean label-set size (classification)."""
    if task.kind == "regression":
        return 2 * q
    if task.kind == "categorical":
        return float(((1.0 - decoded) <= q).sum(1).float().mean())
    p = decoded.reshape(mask.shape)
    size = ((1.0 - p) <= q).float() + (p <= q).float()
    return float(size[mask].mean())


def calibrate(
    predictor: Predictor, zoo: LoadedZoo, coverage: float = 0.9, split: str = "cal", check: str | None = "test"
) -> dict[str, Any]:
    """Calibrate ``predictor`` (:class:`~lol_engine.train.checkpoint.Predictor`) on ``zoo``'s ``split``.

    Returns the JSON-ready ``calibration`` entry of a predictor's ``config.json``: threshold ``q``, the number of
    calibration LoRAs, and the empirical coverage and mean interval width / set size on the ``check`` split.
    """
    from lol_engine.train.loop import Split

    task, model = predictor.task, predictor.model.eval()

    def decoded(name: str) -> tuple[torch.Tensor, Split]:
        sets = model.accepts_subsets
        data = Split.make(zoo, zoo.split(name), task, predictor.fold_scale, model.spec, module_sets=sets)
        with torch.no_grad():
            logits = torch.cat([model(data.batch.index(slice(i, i + 256))) for i in range(0, len(data), 256)])
        return task.decode(logits), data

    pred, data = decoded(split)
    scores = nonconformity(task, pred, data.y, data.mask)
    q = conformal_quantile(scores, coverage)
    out: dict[str, Any] = {
        "method": "split conformal",
        "coverage": coverage,
        "split": split,
        "n": len(data),
        "n_scores": int(scores.size),
        "q": q,
    }
    if check is not None:
        pred, data = decoded(check)
        out[f"{check}_coverage"] = float(_covered(task, pred, data.y, data.mask, q).mean())
        out[f"{check}_mean_size"] = _size(task, pred, data.mask, q)
    return out


def calibration_split(zoo: LoadedZoo) -> str:
    """``cal`` when the zoo has such rows; otherwise ``val`` (a collection split by its own label without ``cal``)."""
    return "cal" if len(zoo.split("cal")) else "val"


def calibrate_folder(folder: str | Path, zoo: LoadedZoo, coverage: float = 0.9) -> dict[str, Any]:
    """Calibrate the predictor saved in ``folder`` on ``zoo``'s :func:`calibration_split` and record it in its
    ``config.json``.

    Also records ``seen`` (:func:`~lol_engine.train.checkpoint.seen_digests`): the LoRAs of ``zoo`` that its weights,
    its early stopping and its calibration learned from (train, val, cal), so that their estimates are flagged
    in-sample; and then writes its domain reference and the description of its label
    (:func:`~lol_engine.train.domain.reference_folder`), so that estimates carry an out-of-domain flag.
    """
    from lol_engine.train.checkpoint import load_predictor, seen_digests
    from lol_engine.train.domain import reference_folder

    result = calibrate(load_predictor(folder), zoo, coverage=coverage, split=calibration_split(zoo))
    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text())
    config["calibration"] = result
    config["seen"] = seen_digests(zoo)
    config_path.write_text(json.dumps(config, indent=2))
    reference_folder(folder, zoo)
    return result


def estimate(predictor: Predictor, lora: LoraWeights) -> Estimate:
    """The predictor's estimate for one LoRA, with its calibrated range when available.

    Raises :class:`~lol_engine.nn.batch.SpecMismatchError` when the LoRA does not fit the predictor.
    """
    return predictor.predict(lora)


def estimate_from(
    predictor: Predictor,
    decoded: Any,
    in_sample: bool = False,
    domain_distance: float | None = None,
    out_of_domain: bool | None = None,
) -> Estimate:
    """The :class:`Estimate` of one LoRA's decoded output (:meth:`Task.decode`'s row: a number or a vector), with
    its domain distance and out-of-domain flag when the predictor has a reference (:mod:`lol_engine.train.domain`)."""
    task: Task = predictor.task
    cal = predictor.config.get("calibration")
    q = float(cal["q"]) if cal else None
    values = torch.as_tensor(decoded, dtype=torch.float64).reshape(-1).tolist()
    value: float | str | tuple[str, ...]
    probs: dict[str, float] = {}
    interval: tuple[float, float] | None = None
    sets: dict[str, tuple[str, ...]] | None = None
    if task.kind == "regression":
        value = number = values[0]
        interval = (number - q, number + q) if q is not None else None
    elif task.kind == "categorical":
        probs = dict(zip(task.names, values, strict=True))
        value = max(probs, key=lambda k: probs[k])
        if q is not None:
            sets = {task.label: tuple(k for k, p in sorted(probs.items(), key=lambda kv: -kv[1]) if 1 - p <= q)}
    else:
        probs = dict(zip((task.label,) if task.kind == "binary" else task.names, values, strict=True))
        if q is not None:
            sets = {n: tuple(v for v, pv in (("1", p), ("0", 1 - p)) if 1 - pv <= q) for n, p in probs.items()}
        if task.kind == "binary":
            value = "1" if values[0] >= 0.5 else "0"
        else:
            value = tuple(n for n, p in probs.items() if p >= 0.5)
    return Estimate(
        predictor=predictor.name,
        label=task.label,
        kind=cast(Kind, task.kind),
        value=value,
        probabilities=probs,
        interval=interval,
        sets=sets,
        coverage=float(cal["coverage"]) if cal else None,
        skill=predictor.skill,
        in_sample=in_sample,
        domain_distance=domain_distance,
        out_of_domain=out_of_domain,
    )
