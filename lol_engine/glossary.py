"""What a predictor predicts, in words: one :class:`Glossary` per predictor, for people reading its estimates.

Light (no torch): the app, the CLI and exports read it without loading models.

- :class:`LabelDescription` is what one label means. It is written **once**, on the zoo recipe that makes the label
  (``Recipe.label_descriptions`` in :mod:`lol_engine.zoo.recipes`), copied into a predictor's ``config.json`` as
  ``target`` when the predictor is calibrated or its reference is written, and read back from the recipe for
  folders that have no copy.
- :class:`Glossary` gathers it with what the predictor's ``config.json`` records: the base model, the zoo and its
  data, how many LoRAs it trained on, its held-out score beside the best simple baseline (chosen on validation) and
  the constant, its calibration, and its out-of-domain threshold. Nothing is invented: a field the folder does not
  record is ``None``.
- A predictor trained on a user's own collection (:mod:`lol_engine.train.collection`) gets a glossary from what is
  known (label, collection, base family, held-out scores and baselines), and says that the label's meaning is the
  user's.

>>> d = LabelDescription("Accuracy", "Share of images classified right.", percent=True, bounds=(0.0, 1.0))
>>> d.format(0.8567), d.format(1.07), d.format_range(0.604, 1.2), d.range_text()
('85.7 %', '100 %', '60.4 – 100 %', '0 % to 100 %')
>>> LabelDescription("Loss", "Cross-entropy.", unit="nats", bounds=(0.0, None)).format(1234.5)
'1230 nats'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import Any

__all__ = [
    "METRIC_NAMES",
    "Glossary",
    "LabelDescription",
    "Score",
    "glossary_of",
    "label_description",
    "significant",
]

METRIC_NAMES = {"r2": "R²", "accuracy": "accuracy", "auc": "AUC", "spearman": "Spearman ρ", "kendall": "Kendall τ"}
_PERCENT_METRICS = frozenset({"accuracy"})
THIS = "this predictor"


def significant(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, without scientific notation between 1e-4 and 1e9.

    >>> significant(0.10000000149011612), significant(2.4733967), significant(-0.000512345), significant(0.0)
    ('0.1', '2.47', '-0.000512', '0')
    """
    if not math.isfinite(value):
        return "∞" if value > 0 else ("−∞" if value < 0 else "nan")
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if not -4 <= magnitude < 9:
        return f"{value:.{digits - 1}e}"
    rounded = round(value, digits - 1 - magnitude)
    decimals = max(0, digits - 1 - magnitude)
    text = f"{rounded:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


@dataclass(frozen=True)
class LabelDescription:
    """What one label means, written once on the recipe that makes it.

    ``percent``: a share in [0, 1] (accuracy, recall, probability), shown as a percentage. ``unit``: appended to
    other numbers (``"nats"``). ``bounds``: the values the label can take (``None``: open); shown values and ranges
    are clipped to them, which never drops the true value out of a range. ``classes``: human names of the outputs in
    code order (categorical: class ``k``; multilabel: entry ``k``; binary: ``(name of 0, name of 1)``).
    """

    title: str
    meaning: str
    unit: str = ""
    percent: bool = False
    bounds: tuple[float | None, float | None] = (None, None)
    classes: tuple[str, ...] = ()

    def clip(self, value: float) -> float:
        """``value`` within :attr:`bounds`."""
        low, high = self.bounds
        if low is not None and value < low:
            return low
        if high is not None and value > high:
            return high
        return value

    def format(self, value: float, clip: bool = True) -> str:
        """A number of this label as shown: a percentage (3 significant digits) or 3 significant digits + unit."""
        value = self.clip(value) if clip else value
        if self.percent:
            return f"{significant(100 * value)} %"
        return significant(value) + (f" {self.unit}" if self.unit else "")

    def format_range(self, low: float, high: float) -> str:
        """A range of this label as shown, the unit written once: ``60.4 – 99.4 %``, ``0 – 4.95 nats``."""
        low, high = self.clip(low), self.clip(high)
        if self.percent:
            return f"{significant(100 * low)} – {significant(100 * high)} %"
        return f"{significant(low)} – {significant(high)}" + (f" {self.unit}" if self.unit else "")

    def range_text(self) -> str:
        """The values the label can take, in words (``""`` when unbounded)."""
        low, high = self.bounds
        if low is not None and high is not None:
            return f"{self.format(low, clip=False)} to {self.format(high, clip=False)}"
        if low is not None:
            return f"≥ {self.format(low, clip=False)}"
        if high is not None:
            return f"≤ {self.format(high, clip=False)}"
        return ""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready (the ``target`` entry of a predictor's ``config.json``)."""
        return {
            "title": self.title,
            "meaning": self.meaning,
            "unit": self.unit,
            "percent": self.percent,
            "bounds": list(self.bounds),
            "classes": list(self.classes),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LabelDescription:
        """Inverse of :meth:`to_json`."""
        low, high = data.get("bounds") or (None, None)
        return cls(
            title=str(data["title"]),
            meaning=str(data["meaning"]),
            unit=str(data.get("unit") or ""),
            percent=bool(data.get("percent", False)),
            bounds=(None if low is None else float(low), None if high is None else float(high)),
            classes=tuple(str(c) for c in data.get("classes") or ()),
        )


@dataclass(frozen=True)
class Score:
    """One held-out score: who (``this predictor``, a baseline's name, ``constant``), the metric key (``r2``,
    ``accuracy``, ``auc``), its value and the split it was measured on (``test`` or ``val``)."""

    who: str
    metric: str
    value: float
    split: str

    @property
    def metric_name(self) -> str:
        """The metric as people write it (``R²``)."""
        return METRIC_NAMES.get(self.metric, self.metric)

    def value_text(self) -> str:
        """The value as shown: accuracies as percentages, other metrics with two decimals."""
        if self.metric in _PERCENT_METRICS:
            return f"{significant(100 * self.value)} %"
        return f"{self.value:.2f}".replace("-", "−")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"who": self.who, "metric": self.metric, "value": self.value, "split": self.split}


@dataclass(frozen=True)
class Glossary:
    """Everything a reader needs to judge one predictor's estimates (see the module docstring)."""

    predictor: str
    label: str
    kind: str
    description: LabelDescription
    outputs: tuple[str, ...]  # the task's output names, in code order (class codes, entry names)
    base_name: str | None
    base_family: str | None
    zoo: str | None  # the zoo recipe, or "your collection"
    zoo_description: str | None
    data: str | None
    n_train: int | None  # LoRAs its weights were trained on
    skill: Score | None  # its test score, in the metric it was chosen by
    skill_val: Score | None
    baseline: Score | None  # the best simple baseline (chosen on validation)
    constant: Score | None
    coverage: float | None  # nominal coverage of its ranges
    held_out_coverage: float | None  # their empirical coverage on the test split
    calibration_split: str | None
    domain_threshold: float | None  # mean distance to the k nearest training LoRAs beyond which it warns
    domain_k: int | None
    users_label: bool  # a label of the user's collection: its meaning is the user's

    @property
    def title(self) -> str:
        """A human title of the target."""
        return self.description.title

    def class_name(self, output: str) -> str:
        """The human name of an output (a class code, a multilabel entry, or ``"0"`` / ``"1"`` for binary)."""
        names = self.description.classes
        if self.kind == "binary" and output in ("0", "1") and len(names) == 2:
            return names[int(output)]
        if output in self.outputs and len(names) == len(self.outputs):
            return names[self.outputs.index(output)]
        return output

    def skill_text(self) -> str:
        """``test R² 0.82 · best simple baseline (gbt · spectra) 0.70 on test · constant −0.00 on val``."""
        if self.skill is None:
            return "not recorded"
        parts = [f"{self.skill.split} {self.skill.metric_name} {self.skill.value_text()}"]
        if self.baseline is not None:
            parts.append(
                f"best simple baseline ({self.baseline.who}) {self.baseline.value_text()} on {self.baseline.split}"
            )
        if self.constant is not None:
            parts.append(f"constant {self.constant.value_text()} on {self.constant.split}")
        return " · ".join(parts)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: one dict per predictor for the app and API."""
        d = self.description

        def score(s: Score | None) -> dict[str, Any] | None:
            return None if s is None else s.to_json()

        return {
            "predictor": self.predictor,
            "label": self.label,
            "kind": self.kind,
            "title": d.title,
            "meaning": d.meaning,
            "unit": d.unit,
            "percent": d.percent,
            "range": d.range_text(),
            "bounds": list(d.bounds),
            "classes": list(d.classes),
            "base": {"name": self.base_name, "family": self.base_family},
            "zoo": self.zoo,
            "zoo_description": self.zoo_description,
            "data": self.data,
            "n_train": self.n_train,
            "skill": score(self.skill),
            "skill_val": score(self.skill_val),
            "baseline": score(self.baseline),
            "constant": score(self.constant),
            "skill_text": self.skill_text(),
            "coverage": self.coverage,
            "held_out_coverage": self.held_out_coverage,
            "calibration_split": self.calibration_split,
            "domain_threshold": self.domain_threshold,
            "domain_k": self.domain_k,
            "users_label": self.users_label,
        }


def _recipe_name(config: Mapping[str, Any]) -> str | None:
    """The zoo recipe a predictor learned from: recorded, or the last part of its zoo folder (``data/zoo/digits``)."""
    recorded = config.get("recipe")
    if isinstance(recorded, str) and recorded:
        return recorded
    zoo = config.get("zoo")
    return PurePath(zoo).name if isinstance(zoo, str) and zoo else None


def _recipe(config: Mapping[str, Any]) -> Any:
    """The registered recipe class of a predictor's zoo, or None."""
    from lol_engine.zoo.registry import recipe_class

    name = _recipe_name(config)
    return recipe_class(name) if name else None


def label_description(label: str, config: Mapping[str, Any]) -> LabelDescription | None:
    """A label's description: the copy in ``config["target"]``, else the recipe's (``None`` when neither has it)."""
    stored = config.get("target")
    if isinstance(stored, Mapping) and stored.get("title"):
        return LabelDescription.from_json(stored)
    recipe = _recipe(config)
    return None if recipe is None else recipe.label_descriptions.get(label)


def _user_description(label: str, outputs: Sequence[str]) -> LabelDescription:
    return LabelDescription(
        title=f"“{label}”, a label of your collection",
        meaning=(
            f"A label from your own collection's labels table. lol-explorer learned to predict it from the LoRA "
            f"weights alone but does not know what “{label}” measures: its meaning is yours."
        ),
        classes=tuple(outputs) if len(outputs) > 1 else (),
    )


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _score(who: str, metric: str, value: Any, split: str) -> Score | None:
    number = _finite(value)
    return None if number is None else Score(who, metric, number, split)


def _scores(kind: str, config: Mapping[str, Any]) -> tuple[Score | None, Score | None, Score | None, Score | None]:
    """``(test skill, val skill, best baseline, constant)`` from what ``config`` records (see :class:`Glossary`).

    Three records exist: the toy zoos' ``selection`` (a ``metric`` and every baseline's validation score), the
    real-base zoos' ``selection`` (the best baseline chosen on validation, with its test score, and the constant's
    validation score) and a collection predictor's ``baselines`` (test scores).
    """
    result = config.get("result") or {}
    selection = config.get("selection") or {}
    collection = config.get("baselines") or {}
    if isinstance(selection.get("metric"), str):
        metric = selection["metric"]
    elif collection or "best_baseline" in selection:  # what these baselines were scored by
        metric = "r2" if kind == "regression" else "accuracy"
    else:
        test = result.get("test") or {}
        metric = next((m for m in ("r2", "auc", "accuracy") if _finite(test.get(m)) is not None), "")
    skill = _score(THIS, metric, (result.get("test") or {}).get(metric), "test")
    skill_val = _score(THIS, metric, (result.get("val") or {}).get(metric), "val")
    baseline = constant = None
    if isinstance(selection.get("baselines"), Mapping):
        split = str(selection.get("split", "val"))
        scores = {str(k): _finite(v) for k, v in selection["baselines"].items()}
        constant = _score("constant", metric, scores.pop("constant", None), split)
        learned = {k: v for k, v in scores.items() if v is not None}
        if learned:
            best = max(learned, key=lambda k: learned[k] or 0.0)
            baseline = _score(best, metric, learned[best], split)
    elif "best_baseline" in selection:
        baseline = _score(str(selection["best_baseline"]), metric, selection.get("best_baseline_test"), "test")
        constant = _score("constant", metric, selection.get("constant_val"), "val")
    elif collection:
        suffix = f" {metric}"
        for key, value in collection.items():
            score = _score(str(key).removesuffix(suffix), metric, value, "test") if key.endswith(suffix) else None
            if score is None:
                continue
            if score.who in ("mean", "majority"):
                constant = replace(score, who=f"constant ({score.who})")
            elif baseline is None or score.value > baseline.value:
                baseline = score
    return skill, skill_val, baseline, constant


def _n_train(config: Mapping[str, Any]) -> int | None:
    for sizes in (config.get("zoo_splits"), ((config.get("provenance") or {}).get("split") or {})):
        if isinstance(sizes, Mapping) and isinstance(sizes.get("train"), int):
            return int(sizes["train"])
    domain = config.get("domain") or {}
    return int(domain["n_reference"]) if isinstance(domain.get("n_reference"), int) else None


def glossary_of(name: str, label: str, kind: str, outputs: Sequence[str], config: Mapping[str, Any]) -> Glossary:
    """The glossary of the predictor ``name`` whose task is ``label`` / ``kind`` with output names ``outputs``,
    from its ``config.json`` (and its zoo recipe for what the folder does not hold)."""
    provenance = config.get("provenance") or {}
    users = bool(provenance.get("collection")) and not config.get("zoo")
    recipe = None if users else _recipe(config)
    description = None if users else label_description(label, config)
    if description is None:
        description = (
            _user_description(label, outputs)
            if users
            else LabelDescription(label, f"No description of “{label}” is recorded for this predictor.")
        )
    base = config.get("base") or {}
    base_name = base.get("name") or (recipe.base_title if recipe is not None else None)
    family = base.get("family") or (recipe.base_family if recipe is not None else provenance.get("base_family"))
    if users:
        chosen = provenance.get("collection_filter")
        zoo: str | None = "your collection"
        zoo_description: str | None = f"LoRAs of the collection {chosen!r}" if chosen else "every stored LoRA"
        data: str | None = f"the stored LoRAs of your collection that carry the label “{label}”"
    else:
        zoo = _recipe_name(config)
        zoo_description = recipe.description if recipe is not None else None
        data = recipe.data_title if recipe is not None else None
    skill, skill_val, baseline, constant = _scores(kind, config)
    calibration = config.get("calibration") or {}
    domain = config.get("domain") or {}
    return Glossary(
        predictor=name,
        label=label,
        kind=kind,
        description=description,
        outputs=tuple(outputs),
        base_name=base_name,
        base_family=family,
        zoo=zoo,
        zoo_description=zoo_description,
        data=data,
        n_train=_n_train(config),
        skill=skill,
        skill_val=skill_val,
        baseline=baseline,
        constant=constant,
        coverage=_finite(calibration.get("coverage")),
        held_out_coverage=_finite(calibration.get("test_coverage")),
        calibration_split=calibration.get("split"),
        domain_threshold=_finite(domain.get("threshold")),
        domain_k=int(domain["k"]) if isinstance(domain.get("k"), int) else None,
        users_label=users,
    )
