"""Learning on a user's own collection: pick labelled LoRAs of one base and module layout, split them (by LoRA, by a
group label, or by the collection's own ``split`` label), train a LoL model, compare it with simple baselines on the
same split, calibrate it, and register it beside the collection so that uploads, maps and exports use it.

- **Which LoRAs.** Stored LoRAs that carry the label (optionally of one base family and one collection), of one module
  layout: the most common one among them (a LoL model reads a fixed set of modules); the others are counted, not
  used silently. A model of module sets (``module_tokens``, ``accepts_subsets``) takes every layout of one base
  instead: the most common base family when none is asked for, and, should a module name come in two shapes, the
  LoRAs that agree with its most common shape.
- **The split.** A ``split`` label holding ``train`` / ``val`` / ``cal`` / ``test`` on every chosen LoRA is used as it
  is (the shipped zoos carry theirs; ``cal`` may be absent there, and calibration then falls back to ``val``);
  otherwise 70 / 10 / 10 / 10 drawn per value of the ``group`` label (LoRAs of one group never straddle two splits)
  or, without one, per LoRA, from a seed. ``val`` early-stops, ``cal`` calibrates, ``test`` only reports.
- **Baselines on the same split.** The mean (regression) or the majority class, and ridge / logistic regression on
  the GL-invariant fingerprint. A LoL model is better only where it beats them.
- **Registration.** The predictor is saved under ``<data dir>/predictors/<name>`` with its provenance (collection,
  label, filters, split, metrics, baselines, date), calibrated on its ``cal`` split, with the digests of the LoRAs
  it learned from; :meth:`lol_engine.explorer.Explorer.register` then applies it to the stored LoRAs.
"""

from __future__ import annotations

import datetime
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lol_engine.errors import BadRequestError, NotFoundError
from lol_engine.train.loop import EpochCallback, LoadedZoo, TrainConfig, train_on_zoo
from lol_engine.train.tasks import Task
from lol_engine.zoo.recipe import SPLITS, quota_splits

if TYPE_CHECKING:
    from lol_engine.explorer import Explorer
    from lol_engine.nn.models import LoLModel

__all__ = [
    "CollectionData",
    "TrainingReport",
    "baselines",
    "collection_data",
    "train_on_collection",
    "train_predictor",
]

SHARES = SPLITS  # the zoos' 70 / 10 / 10 / 10
MIN_PER_SPLIT = 2


@dataclass
class CollectionData:
    """The chosen LoRAs as a :class:`LoadedZoo` (rows ``split``, ``y_<label>``, ``id``), and how they were chosen."""

    zoo: LoadedZoo
    ids: list[str]
    split_by: str
    left_out: dict[str, int] = field(default_factory=dict)  # reason -> how many labelled LoRAs were not used
    class_names: tuple[str, ...] | None = None  # text classes, in code order


def _splits(values: Sequence[str], seed: int) -> list[str]:
    """train / val / cal / test for each group value or LoRA id: every LoRA of a value together, the values split
    70 / 10 / 10 / 10 exactly (:func:`~lol_engine.zoo.recipe.quota_splits`), so that no split of a small collection
    comes out empty by chance."""
    of = quota_splits(seed, values)
    return [of[v] for v in values]


def collection_data(
    explorer: Explorer,
    label: str,
    *,
    base_family: str | None = None,
    collection: str | None = None,
    group: str | None = None,
    seed: int = 0,
    any_layout: bool = False,
) -> CollectionData:
    """The labelled LoRAs to learn ``label`` from (see the module for the rules); ``any_layout`` for a model of
    module sets."""
    records = explorer.records()
    stored = explorer.all_labels()
    labels = {r["id"]: stored.get(r["id"], {}) for r in records}
    left: Counter[str] = Counter()
    chosen = []
    for r in records:
        if label not in labels[r["id"]]:
            continue
        if base_family is not None and r["base_family"] != base_family:
            left[f"base family is not {base_family}"] += 1
        elif collection is not None and r["zoo"] != collection:
            left[f"collection is not {collection}"] += 1
        else:
            chosen.append(r)
    if not chosen and left:
        why = "; ".join(f"{n} whose {reason}" for reason, n in left.items())
        raise BadRequestError(f"no LoRA with the label {label!r} passes the filters ({why})")
    if not chosen:
        known = sorted({k for values in labels.values() for k in values})
        raise NotFoundError(f"no stored LoRA has the label {label!r} here; labels: {', '.join(known[:30]) or 'none'}")
    layouts = {r["id"]: tuple((m["name"], m["d_out"], m["d_in"]) for m in explorer.get(r["id"]).spec) for r in chosen}
    chosen = _one_base(chosen, layouts, left) if any_layout else _one_layout(chosen, layouts, left)
    values = [labels[r["id"]][label] for r in chosen]
    class_names = None
    if all(isinstance(v, str) for v in values):
        class_names = tuple(sorted(set(values)))
        values = [class_names.index(v) for v in values]
    elif any(isinstance(v, list) and any(not isinstance(x, (int, float)) for x in v) for v in values):
        raise BadRequestError(f"{label!r} holds lists of names: learn one 0/1 label per name instead")
    elif not all(isinstance(v, (int, float, list)) and not isinstance(v, bool) for v in values):
        raise BadRequestError(f"{label!r} mixes numbers and text: give one kind per label")
    splits: list[Any] = [labels[r["id"]].get("split") for r in chosen]
    required = [name for name, _ in SHARES]
    if all(s in required for s in splits):
        split_by = "the collection's split label"
        required = [name for name in required if name != "cal"]  # calibration falls back to val
    else:
        key = group if group is not None else ("group" if all("group" in labels[r["id"]] for r in chosen) else None)
        if key is not None and not all(key in labels[r["id"]] for r in chosen):
            raise BadRequestError(f"group label {key!r} is missing on some of the chosen LoRAs")
        splits = _splits([str(labels[r["id"]][key]) if key else r["id"] for r in chosen], seed)
        split_by = f"group label {key!r}" if key else "LoRA"
    sizes = Counter(splits)
    if min(sizes[s] for s in required) < MIN_PER_SPLIT:
        shown = ", ".join(f"{s} {sizes[s]}" for s in required)
        raise BadRequestError(
            f"{len(chosen)} LoRAs give splits of {shown}: every split needs {MIN_PER_SPLIT}; label more"
        )
    rows = [{"id": r["id"], "split": s, f"y_{label}": v} for r, s, v in zip(chosen, splits, values, strict=True)]
    loras = [explorer.weights(r["id"]) for r in chosen]
    zoo = LoadedZoo(Path(explorer.db_path), rows, loras)
    return CollectionData(zoo, [r["id"] for r in chosen], split_by, dict(left), class_names)


Layout = tuple[tuple[str, int, int], ...]  # (module name, d_out, d_in) of every module of one LoRA


def _one_layout(chosen: list[dict[str, Any]], layouts: dict[str, Layout], left: Counter[str]) -> list[dict[str, Any]]:
    """The LoRAs of the most common module layout; the others are counted in ``left``."""
    common, _ = Counter(layouts.values()).most_common(1)[0]
    other_layout = sum(layout != common for layout in layouts.values())
    if other_layout:
        left["another module layout"] = other_layout
    return [r for r in chosen if layouts[r["id"]] == common]


def _one_base(chosen: list[dict[str, Any]], layouts: dict[str, Layout], left: Counter[str]) -> list[dict[str, Any]]:
    """The LoRAs of the most common base family, any module layout, whose modules have their most common shapes."""
    family, _ = Counter(r["base_family"] for r in chosen).most_common(1)[0]
    other_family = sum(r["base_family"] != family for r in chosen)
    if other_family:
        left[f"another base family than {family}"] = other_family
    chosen = [r for r in chosen if r["base_family"] == family]
    shapes: dict[str, Counter[tuple[int, int]]] = {}
    for r in chosen:
        for name, d_out, d_in in layouts[r["id"]]:
            shapes.setdefault(name, Counter())[(d_out, d_in)] += 1
    usual = {name: counts.most_common(1)[0][0] for name, counts in shapes.items()}
    agree = [r for r in chosen if all(usual[n] == (o, i) for n, o, i in layouts[r["id"]])]
    if len(agree) < len(chosen):
        left["a module shaped unlike in the other LoRAs"] = len(chosen) - len(agree)
    return agree


def baselines(data: CollectionData, task: Task, fingerprints: np.ndarray) -> dict[str, float]:
    """Test-split scores of the mean / majority and of ridge / logistic regression on the fingerprint."""
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.preprocessing import StandardScaler

    zoo = data.zoo
    train, test = np.concatenate([zoo.split("train"), zoo.split("val")]), zoo.split("test")
    y = np.array([r[f"y_{task.label}"] for r in zoo.rows], dtype=object)
    x = StandardScaler().fit(fingerprints[train]).transform(fingerprints)
    if task.kind == "regression":
        yf = y.astype(float)
        ridge = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(x[train], yf[train])
        return {
            "mean r2": float(r2_score(yf[test], np.full(len(test), yf[train].mean()))),
            "ridge on fingerprint r2": float(r2_score(yf[test], ridge.predict(x[test]))),
        }
    if task.kind in ("binary", "categorical"):
        yi = y.astype(int)
        majority = Counter(yi[train].tolist()).most_common(1)[0][0]
        out = {"majority accuracy": float((yi[test] == majority).mean())}
        if len(set(yi[train].tolist())) > 1:
            logistic = LogisticRegression(max_iter=2000).fit(x[train], yi[train])
            out["logistic on fingerprint accuracy"] = float((logistic.predict(x[test]) == yi[test]).mean())
        return out
    stacked = np.array([list(v) for v in y], dtype=float)
    return {"majority accuracy": float((stacked[test] == (stacked[train].mean(0) >= 0.5)).mean())}


def train_on_collection(
    explorer: Explorer,
    label: str,
    model_name: str = "spectral_glnet",
    *,
    base_family: str | None = None,
    collection: str | None = None,
    group: str | None = None,
    seed: int = 0,
    config: TrainConfig | None = None,
    on_epoch: EpochCallback | None = None,
) -> tuple[LoLModel, Task, dict[str, Any], CollectionData]:
    """Train ``model_name`` on ``label`` of the stored collection; returns the model, its task, the result (``val``,
    ``test``, ``baselines``, ``provenance``) and the data it was trained on."""
    from lol_engine.nn.models import MODELS

    any_layout = model_name in MODELS and MODELS[model_name].accepts_subsets
    data = collection_data(
        explorer, label, base_family=base_family, collection=collection, group=group, seed=seed, any_layout=any_layout
    )
    config = config or TrainConfig(seed=seed)
    model, task, result = train_on_zoo(data.zoo, label, model_name, config=config, on_epoch=on_epoch)
    if data.class_names is not None:
        task = replace(task, names=data.class_names)
    fingerprints = explorer.fingerprints(data.ids)
    result["baselines"] = baselines(data, task, fingerprints)
    result["provenance"] = {
        "collection": str(explorer.db_path),
        "label": label,
        "base_family": base_family or _only(explorer, data.ids),
        "collection_filter": collection,
        "split": {"by": data.split_by, "seed": seed, **Counter(r["split"] for r in data.zoo.rows)},
        "left_out": data.left_out,
        "model": model_name,
        "trained_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    return model, task, result, data


@dataclass
class TrainingReport:
    """What :func:`train_predictor` did: the predictor's name and folder, the data, per-seed test metrics, the
    baselines on the same split, and whether the collection now uses it."""

    name: str
    folder: Path
    n: int
    base_family: str
    split_by: str
    sizes: dict[str, int]
    left_out: dict[str, int]
    test: dict[str, list[float]]  # metric -> one value per seed
    baselines: dict[str, float]
    registered: bool

    def lines(self, folder: bool = True) -> list[str]:
        """A plain-text report (the CLI prints it; the app shows it with ``folder=False``: no server path)."""
        shown = [name for name, _ in SHARES if name != "cal" or self.sizes.get(name, 0)]
        sizes = ", ".join(f"{name} {self.sizes.get(name, 0)}" for name in shown)
        out = [f"{self.n} LoRAs ({self.base_family}), split by {self.split_by}: {sizes}"]
        if "cal" not in shown:
            out.append("no cal split: the ranges are calibrated on val, the split that chose the epoch (optimistic)")
        out += [f"left out: {n} labelled LoRA(s), {reason}" for reason, n in self.left_out.items()]
        for metric, values in self.test.items():
            out.append(f"test {metric:10s} {np.mean(values):.4f} ± {np.std(values):.4f}  ({len(values)} seeds)")
        out += [f"baseline {name}: {value:.4f}" for name, value in self.baselines.items()]
        if folder:
            out.append(f"predictor: {self.folder}")
        if self.registered:
            out.append(f"registered as {self.name}: the collection uses it for uploads, maps and exports")
        return out


def train_predictor(
    explorer: Explorer,
    label: str,
    model_name: str = "spectral_glnet",
    *,
    base_family: str | None = None,
    collection: str | None = None,
    group: str | None = None,
    epochs: int = 30,
    seeds: int = 1,
    fold_scale: bool = True,
    out: str | Path | None = None,
    on_epoch: Callable[[int, int, int, float], bool] | None = None,
    device: str = "cpu",
) -> TrainingReport:
    """Train ``seeds`` runs, keep the best on validation, save it (default: the collection's predictors folder, as
    ``<label>-<model>``), calibrate it on its cal split (val without one) and, when it lies in that folder, register
    it.

    ``on_epoch(seed, epoch, epochs, val_loss)`` reports progress; returning False cancels (nothing is saved).
    ``device``: where training runs (:meth:`Explorer.train` passes the collection's, ``LOL_DEVICE``).
    """
    from lol_engine.train.calibrate import calibrate_folder
    from lol_engine.train.checkpoint import save_predictor

    if seeds < 1 or epochs < 1:
        raise BadRequestError("seeds and epochs must be at least 1")
    runs = []
    for seed in range(seeds):
        config = TrainConfig(epochs=epochs, seed=seed, fold_scale=fold_scale, device=device)
        progress = None if on_epoch is None else (lambda e, n, loss, s=seed: on_epoch(s, e, n, loss))
        runs.append(
            train_on_collection(
                explorer,
                label,
                model_name,
                base_family=base_family,
                collection=collection,
                group=group,
                config=config,
                on_epoch=progress,
            )
        )
    model, task, result, data = min(runs, key=lambda r: r[2]["val"]["loss"])
    folder = Path(out) if out is not None else explorer.predictors_dir / f"{label}-{model_name}"
    extra = {
        "zoo": None,
        "result": {k: result[k] for k in ("val", "test")},
        "baselines": result["baselines"],
        "provenance": result["provenance"],
    }
    save_predictor(folder, model, task, model_name, fold_scale, extra)
    calibrate_folder(folder, data.zoo)  # its cal split (val without one); records the LoRAs it learned from
    registered = folder.resolve().parent == explorer.predictors_dir.resolve()
    if registered:
        explorer.register(folder)
    split = result["provenance"]["split"]
    return TrainingReport(
        folder.name,
        folder,
        len(data.ids),
        result["provenance"]["base_family"],
        data.split_by,
        {name: int(split.get(name, 0)) for name, _ in SHARES},
        data.left_out,
        {metric: [r[2]["test"][metric] for r in runs] for metric in runs[0][2]["test"]},
        result["baselines"],
        registered,
    )


def _only(explorer: Explorer, ids: list[str]) -> str:
    families = {explorer.get(i).base_family for i in ids}
    return families.pop() if len(families) == 1 else "mixed"


def finite(value: float) -> float | None:
    """A JSON-safe number."""
    return value if math.isfinite(value) else None
