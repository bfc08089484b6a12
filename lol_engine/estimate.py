"""A prediction as one typed object: what every predictor returns and every consumer (store, maps, UI, API, exports)
reads. Light: no torch, so the store and the app can use it without loading models.

One :class:`Estimate` per predictor and LoRA, whatever the task:

- ``regression``: ``value`` is the number; ``interval`` its calibrated range;
- ``binary``: ``value`` is ``"1"`` or ``"0"``; ``probabilities`` ``{label: p(1)}``; ``sets`` ``{label: values}``;
- ``categorical``: ``value`` is the most likely class; ``probabilities`` ``{class: p}``; ``sets`` ``{label: classes}``;
- ``multilabel``: ``value`` the entries predicted 1; ``probabilities`` ``{entry: p(1)}``; ``sets`` ``{entry: values}``.

``sets`` are split-conformal sets (:mod:`lol_engine.train.calibrate`) and ``interval`` a split-conformal interval, both
at nominal ``coverage``; all three are ``None`` for a predictor never calibrated. ``skill`` is the predictor's held-out
score; ``in_sample`` is true when the LoRA (its file's sha256, or exactly its ΔW) was among the LoRAs the predictor
learned from — its prediction is then a memory, not an estimate, and its range says nothing.

``domain_distance`` is the mean distance from the LoRA to the 5 nearest LoRAs the predictor trained on, in its own
features, and ``out_of_domain`` whether that is beyond the distance of 99 % of its held-out LoRAs
(:mod:`lol_engine.train.domain`): its estimate and range may then not hold. Both are ``None`` (unknown) for a
predictor without a reference and for estimates stored before they existed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

__all__ = ["KINDS", "Estimate", "Kind", "Skill"]

Kind = Literal["regression", "binary", "categorical", "multilabel"]
KINDS: tuple[Kind, ...] = ("regression", "binary", "categorical", "multilabel")


@dataclass(frozen=True)
class Skill:
    """A predictor's held-out score: ``metric`` (``R²``, ``AUC`` or ``accuracy``) on ``split``."""

    metric: str
    value: float
    split: str = "test"

    def __str__(self) -> str:
        return f"{self.split} {self.metric} {self.value:.2f}"

    @classmethod
    def from_result(cls, result: Mapping[str, Any] | None, split: str = "test") -> Skill | None:
        """The headline metric of a predictor's recorded ``result`` (R², then AUC, then accuracy), if any."""
        scores = (result or {}).get(split, {})
        for key, metric in (("r2", "R²"), ("auc", "AUC"), ("accuracy", "accuracy")):
            value = scores.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                return cls(metric, float(value), split)
        return None


@dataclass(frozen=True)
class Estimate:
    """One predictor's output for one LoRA (see the module for what each field holds per ``kind``)."""

    predictor: str
    label: str
    kind: Kind
    value: float | str | tuple[str, ...]
    probabilities: Mapping[str, float] = field(default_factory=dict)
    interval: tuple[float, float] | None = None
    sets: Mapping[str, tuple[str, ...]] | None = None
    coverage: float | None = None
    skill: Skill | None = None
    in_sample: bool = False
    domain_distance: float | None = None
    out_of_domain: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown task kind {self.kind!r} (one of {', '.join(KINDS)})")
        if (self.domain_distance is None) != (self.out_of_domain is None):
            raise ValueError("domain_distance and out_of_domain are both known or both unknown")

    @property
    def probability(self) -> float | None:
        """Binary: p(1); categorical: the probability of the predicted class; otherwise None."""
        if self.kind == "binary":
            return self.probabilities[self.label]
        if self.kind == "categorical":
            return self.probabilities[str(self.value)]
        return None

    @property
    def summary(self) -> float | int | str:
        """One cell for tables and map colours: the number (4 decimals), p(1), the class, or how many entries are 1."""
        if self.kind == "regression":
            return round(float(cast(float, self.value)), 4)
        if self.kind == "binary":
            return round(self.probabilities[self.label], 4)
        if self.kind == "categorical":
            return str(self.value)
        return len(cast(tuple[str, ...], self.value))

    def range_text(self) -> str:
        """The calibrated range as shown: ``[lo, hi] @90%``, ``{a, b} @90%`` (``∅`` for an empty set), or ``""``."""
        if self.coverage is None:
            return ""
        at = f" @{self.coverage:.0%}"
        if self.interval is not None:
            return f"[{self.interval[0]:.3g}, {self.interval[1]:.3g}]{at}"
        if self.sets is None:
            return ""
        if self.kind == "multilabel":
            sure_1 = sum(s == ("1",) for s in self.sets.values())
            sure_0 = sum(s == ("0",) for s in self.sets.values())
            return f"{sure_1} sure 1 · {sure_0} sure 0 · {len(self.sets) - sure_1 - sure_0} unsure{at}"
        chosen = self.sets[self.label]
        return ("{" + ", ".join(chosen) + "}" if chosen else "∅") + at

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (:meth:`from_json` reads it back); infinite bounds become ``None``."""
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        interval = None if self.interval is None else [_finite(v) for v in self.interval]
        return {
            "predictor": self.predictor,
            "label": self.label,
            "kind": self.kind,
            "value": value,
            "probabilities": dict(self.probabilities),
            "interval": interval,
            "sets": None if self.sets is None else {k: list(v) for k, v in self.sets.items()},
            "coverage": self.coverage,
            "skill": None if self.skill is None else [self.skill.metric, self.skill.value, self.skill.split],
            "in_sample": self.in_sample,
            "domain_distance": None if self.domain_distance is None else _finite(self.domain_distance),
            "out_of_domain": self.out_of_domain,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Estimate:
        """The estimate :meth:`to_json` wrote."""
        value = data["value"]
        interval = data.get("interval")
        skill = data.get("skill")
        sets = data.get("sets")
        distance, flagged = data.get("domain_distance"), data.get("out_of_domain")  # absent from older rows
        return cls(
            predictor=str(data["predictor"]),
            label=str(data["label"]),
            kind=data["kind"],
            value=tuple(value) if isinstance(value, list) else value,
            probabilities={str(k): float(v) for k, v in (data.get("probabilities") or {}).items()},
            interval=None if interval is None else (_bound(interval[0], -1), _bound(interval[1], 1)),
            sets=None if sets is None else {str(k): tuple(v) for k, v in sets.items()},
            coverage=data.get("coverage"),
            skill=None if skill is None else Skill(str(skill[0]), float(skill[1]), str(skill[2])),
            in_sample=bool(data.get("in_sample", False)),
            domain_distance=None if distance is None or flagged is None else float(distance),
            out_of_domain=None if distance is None or flagged is None else bool(flagged),
        )


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _bound(value: float | None, sign: int) -> float:
    return sign * math.inf if value is None else float(value)
