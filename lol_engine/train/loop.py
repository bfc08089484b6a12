"""Training LoL models on a zoo: load once, fit with AdamW, select the epoch on the validation split only."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lol_engine.errors import BadRequestError, NotFoundError
from lol_engine.lora.parse import load_lora
from lol_engine.lora.weights import LoraWeights
from lol_engine.nn.batch import LoraBatch, ModuleSetBatch
from lol_engine.nn.models import MODELS, LoLModel, ModelConfig, build_model
from lol_engine.train.tasks import Task, infer_task, metrics, targets

__all__ = [
    "EpochCallback",
    "LoadedZoo",
    "Split",
    "TrainConfig",
    "TrainingCancelledError",
    "evaluate",
    "fit",
    "load_zoo",
    "train_on_zoo",
]

EpochCallback = Callable[[int, int, float], bool]  # (epoch, epochs, validation loss) -> go on?


class TrainingCancelledError(BadRequestError):
    """Training was stopped on request (the epoch callback said stop); nothing was saved."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; ``fold_scale`` is the documented scale choice (see :mod:`lol_engine.nn.batch`)."""

    epochs: int = field(default=30, metadata={"help": "passes over the training split (at most)"})
    patience: int | None = field(
        default=None, metadata={"help": "stop after this many epochs without a lower validation loss; None: never"}
    )
    batch: int = field(default=32, metadata={"help": "LoRAs per step"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    seed: int = field(default=0, metadata={"help": "initialisation and shuffling seed"})
    fold_scale: bool = field(default=True, metadata={"help": "fold alpha/r into the factors"})
    device: str = field(default="cpu", metadata={"help": "where the model and the splits live while training"})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


@dataclass
class LoadedZoo:
    """A zoo's manifest rows and LoRAs, loaded once and shared by every model and task."""

    path: Path
    rows: list[dict[str, Any]]
    loras: list[LoraWeights]

    def split(self, name: str) -> np.ndarray:
        """Row indices of the train / val / cal / test split."""
        return np.array([i for i, r in enumerate(self.rows) if r["split"] == name], dtype=np.int64)

    def resplit(self, column: str) -> LoadedZoo:
        """The same LoRAs with the splits of manifest column ``column`` (e.g. ``split_lora``, the per-LoRA split
        that ignores groups), sharing the loaded weights."""
        if self.rows and column not in self.rows[0]:
            raise NotFoundError(f"{self.path}: the manifest has no column {column!r}; rebuild its manifest")
        return LoadedZoo(self.path, [r | {"split": r[column]} for r in self.rows], self.loras)


def load_zoo(path: str | Path) -> LoadedZoo:
    """Read a built zoo's manifest and every LoRA in it."""
    from lol_engine.zoo.manifest import read_manifest

    path = Path(path)
    if not (path / "manifest.parquet").is_file():
        raise NotFoundError(f"{path}: no zoo there (no manifest.parquet); build one with `lol zoo build`")
    rows = read_manifest(path)
    return LoadedZoo(path, rows, [load_lora(path / r["path"]) for r in rows])


@dataclass
class Split:
    """Model inputs and targets of one split."""

    batch: LoraBatch | ModuleSetBatch
    y: Tensor
    mask: Tensor

    @classmethod
    def make(
        cls,
        zoo: LoadedZoo,
        idx: Sequence[int] | np.ndarray,
        task: Task,
        fold_scale: bool,
        spec: Any = None,
        *,
        module_sets: bool = False,
    ) -> Split:
        """One batch of ``zoo``'s LoRAs ``idx``: a :class:`LoraBatch` in ``spec``'s module order, or with
        ``module_sets`` a :class:`ModuleSetBatch` of the union of their modules (``spec`` unused)."""
        loras = [zoo.loras[i] for i in idx]
        y, mask = targets([zoo.rows[i] for i in idx], task)
        if module_sets:
            return cls(ModuleSetBatch.from_loras(loras, fold_scale=fold_scale), y, mask)
        return cls(LoraBatch.from_loras(loras, fold_scale=fold_scale, spec=spec), y, mask)

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: str | torch.device) -> Split:
        """The split on ``device`` (inputs, targets and mask)."""
        return Split(self.batch.to(device), self.y.to(device), self.mask.to(device))


@torch.no_grad()
def evaluate(model: LoLModel, task: Task, data: Split, chunk: int = 256) -> dict[str, float]:
    """Metrics of ``model`` on a split (eval mode, chunked forward)."""
    model.eval()
    logits = torch.cat([model(data.batch.index(slice(i, i + chunk))) for i in range(0, len(data), chunk)])
    return metrics(task, logits, data.y, data.mask)


def fit(
    model: LoLModel, task: Task, train: Split, val: Split, config: TrainConfig, on_epoch: EpochCallback | None = None
) -> dict[str, Any]:
    """AdamW on the training split; keeps the weights of the epoch with the lowest validation loss, stopping early
    after ``config.patience`` epochs without a new lowest one.

    ``on_epoch(epoch, epochs, val_loss)`` is called after every epoch (progress); when it returns False, training
    stops with :class:`TrainingCancelledError`.
    """
    gen = torch.Generator().manual_seed(config.seed)
    if isinstance(train.batch, LoraBatch):  # models of module sets have nothing to prepare
        model.prepare(train.batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best = (float("inf"), copy.deepcopy(model.state_dict()), -1)
    history = []
    for epoch in range(config.epochs):
        model.train()
        for idx in torch.randperm(len(train), generator=gen).split(config.batch):
            optimizer.zero_grad()
            loss = task.loss(model(train.batch.index(idx)), train.y[idx], train.mask[idx])
            loss.backward()
            optimizer.step()
        val_loss = evaluate(model, task, val)["loss"]
        history.append(val_loss)
        if val_loss < best[0]:
            best = (val_loss, copy.deepcopy(model.state_dict()), epoch)
        if on_epoch is not None and not on_epoch(epoch + 1, config.epochs, val_loss):
            raise TrainingCancelledError(f"training stopped on request after epoch {epoch + 1} of {config.epochs}")
        if config.patience is not None and epoch - best[2] >= config.patience:
            break
    model.load_state_dict(best[1])
    return {"best_epoch": best[2], "val_loss_history": history}


def train_on_zoo(
    zoo: LoadedZoo,
    label: str,
    model_name: str,
    model_config: ModelConfig | None = None,
    config: TrainConfig | None = None,
    on_epoch: EpochCallback | None = None,
) -> tuple[LoLModel, Task, dict[str, Any]]:
    """Train one model on one label; return it, its task and ``{"val": …, "test": …, "fit": …, "seconds": …}``."""
    config = config or TrainConfig()
    train_idx, val_idx, test_idx = zoo.split("train"), zoo.split("val"), zoo.split("test")
    if min(len(train_idx), len(val_idx), len(test_idx)) == 0:
        sizes = f"train {len(train_idx)}, val {len(val_idx)}, test {len(test_idx)}"
        raise BadRequestError(f"{zoo.path}: every split needs LoRAs ({sizes}); build a larger zoo")
    task = infer_task(zoo.rows, label, train_idx)
    sets = model_name in MODELS and MODELS[model_name].accepts_subsets
    train = Split.make(zoo, train_idx, task, config.fold_scale, module_sets=sets)
    spec = train.batch.spec  # with module sets: the union of the training LoRAs' modules, the model's vocabulary
    val = Split.make(zoo, val_idx, task, config.fold_scale, spec, module_sets=sets)
    test = Split.make(zoo, test_idx, task, config.fold_scale, spec, module_sets=sets)
    train, val, test = (s.to(config.device) for s in (train, val, test))
    torch.manual_seed(config.seed)
    model = build_model(model_name, spec, task.out_dim, model_config).to(config.device)
    start = time.perf_counter()
    info = fit(model, task, train, val, config, on_epoch)
    seconds = time.perf_counter() - start
    return (
        model,
        task,
        {"val": evaluate(model, task, val), "test": evaluate(model, task, test), "fit": info, "seconds": seconds},
    )
