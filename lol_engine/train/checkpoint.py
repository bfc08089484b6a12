"""Predictors on disk: ``model.safetensors`` + ``config.json`` (model, spec, task, normalisation, scale choice)."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lol_engine.lora.weights import LoraWeights
from lol_engine.nn.batch import LoraBatch, SpecMismatchError, check_compatible
from lol_engine.nn.models import LoLModel, ModelConfig, build_model
from lol_engine.spec import LayerSpec, LoraSpec
from lol_engine.train.tasks import Task

__all__ = ["Predictor", "load_predictor", "save_predictor"]


def save_predictor(
    folder: str | Path,
    model: LoLModel,
    task: Task,
    model_name: str,
    fold_scale: bool,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint folder and return it."""
    from lol_engine.lora.safe_io import write_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors({k: v.detach().float() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    spec = [
        {
            "name": s.name,
            "d_out": s.d_out,
            "d_in": s.d_in,
            "rank": s.rank,
            "kind": s.kind,
            "orig_shape": list(s.orig_shape),
        }
        for s in model.spec.layers
    ]
    config = {"model": model_name, "model_config": model.config.to_dict(), "spec": spec, "task": task.to_dict(),
              "fold_scale": fold_scale, **(extra or {})}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@dataclass
class Predictor:
    """A trained model with its task: ``predict(lora)`` gives labels in their own units."""

    model: LoLModel
    task: Task
    fold_scale: bool
    config: dict[str, Any]
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def _last_layer(self) -> torch.nn.Linear:
        """The head's final linear layer (every LoL model ends in ``_head``: … → ReLU → Dropout → Linear)."""
        head = self.model.head
        assert isinstance(head, torch.nn.Sequential) and isinstance(head[-1], torch.nn.Linear)
        return head[-1]

    @property
    def embedding_dim(self) -> int:
        """Length of :meth:`embed`'s vector: the width of the model's head before its last layer."""
        return int(self._last_layer.in_features)

    def to(self, device: str | torch.device) -> Predictor:
        """Move the model to a device (a GPU, say); inputs follow it, outputs come back on the CPU."""
        self.model.to(device)
        return self

    def predict(self, lora: LoraWeights) -> dict[str, Any]:
        """Predictions for one LoRA; raises :class:`SpecMismatchError` naming modules that are missing or differ."""
        return self.predict_and_embed(lora)[0]

    def embed(self, lora: LoraWeights) -> torch.Tensor:
        """The encoder's embedding of one LoRA: the head's hidden features (after its ReLU), input to the last layer.

        It inherits the model's symmetry: GL(r)-invariant for GL(r)-invariant models.
        """
        return self.predict_and_embed(lora)[1]

    def predict_and_embed(self, lora: LoraWeights) -> tuple[dict[str, Any], torch.Tensor]:
        """:meth:`predict` and :meth:`embed` from one forward pass."""
        return self.predict_and_embed_many([lora])[0]

    def fits(self, lora: LoraWeights) -> bool:
        """Whether ``lora`` has this predictor's modules (and rank, unless the model is rank-agnostic)."""
        try:
            check_compatible(self.model.spec, lora.spec, same_rank=not self.model.rank_agnostic)
        except SpecMismatchError:
            return False
        return True

    @torch.no_grad()
    def predict_and_embed_many(self, loras: Sequence[LoraWeights]) -> list[tuple[dict[str, Any], torch.Tensor]]:
        """:meth:`predict_and_embed` for many LoRAs in one batched forward (each must fit, else SpecMismatchError)."""
        for lora in loras:
            check_compatible(self.model.spec, lora.spec, same_rank=not self.model.rank_agnostic)
        device = next(self.model.parameters()).device
        batch = LoraBatch.from_loras(list(loras), fold_scale=self.fold_scale, spec=self.model.spec).to(device)
        captured: list[torch.Tensor] = []
        with self._lock:  # the hook sees every forward of the shared model: one forward at a time
            hook = self._last_layer.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach()))
            try:
                logits = self.model.eval()(batch)
            finally:
                hook.remove()
        logits, hidden = logits.cpu(), captured[0].cpu()
        return [(self._decode(logits[i : i + 1]), hidden[i]) for i in range(len(loras))]

    def _decode(self, logits: torch.Tensor) -> dict[str, Any]:
        out = self.task.decode(logits)[0]
        if self.task.kind in ("regression", "binary"):
            return {self.task.label: float(out)}
        return {self.task.label: {name: float(p) for name, p in zip(self.task.names, out.tolist(), strict=True)}}


def load_predictor(folder: str | Path) -> Predictor:
    """Read a checkpoint folder written by :func:`save_predictor` (safetensors and JSON only)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    spec = LoraSpec(
        tuple(
            LayerSpec(s["name"], s["d_out"], s["d_in"], s["rank"], s["kind"], tuple(s["orig_shape"]))
            for s in config["spec"]
        )
    )
    task = Task.from_dict(config["task"])
    model = build_model(config["model"], spec, task.out_dim, ModelConfig(**config["model_config"]))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return Predictor(model.eval(), task, bool(config["fold_scale"]), config)
