"""Shared pieces of the recipes: saving adapters with provenance, base-model caching and hashing, training loops."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

ModelT = TypeVar("ModelT", bound=nn.Module)

__all__ = [
    "adam_steps",
    "load_or_build_base",
    "normalize_adapter_config",
    "round_trainable_to_fp16",
    "save_adapter",
    "state_sha256",
]


def state_sha256(module: nn.Module) -> str:
    """sha256 over a module's tensors in name order: the identity of a base model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().to(torch.float32).numpy().tobytes())
    return digest.hexdigest()


def load_or_build_base(path: Path, make: Callable[[], ModelT], train: Callable[[ModelT], None]) -> ModelT:
    """Load ``path`` (safetensors) into ``make()``, or build it with ``train`` and save it there."""
    from safetensors.torch import load_file

    from lol_engine.lora.safe_io import write_safetensors

    model = make()
    if path.exists():
        model.load_state_dict(load_file(str(path)))
    else:
        train(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(dict(model.state_dict()), path)
    return model.eval()


def round_trainable_to_fp16(model: nn.Module) -> None:
    """Round every trainable parameter to fp16 precision, so labels describe exactly the weights that are stored."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(param.half().float())


def save_adapter(model: Any, out_dir: Path, provenance: Mapping[str, object]) -> None:
    """``save_pretrained``, then rewrite the weights as fp16 with provenance in ``__metadata__``."""
    from safetensors.torch import load_file

    from lol_engine.lora.safe_io import write_safetensors

    model.save_pretrained(str(out_dir))
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's model-card template: 5 KB of boilerplate per LoRA
    weights = out_dir / "adapter_model.safetensors"
    tensors = {k: v.half().contiguous() for k, v in load_file(str(weights)).items()}
    metadata = {"format": "pt", **{f"lol.{k}": str(v) for k, v in provenance.items()}, "lol.synthetic_zoo": "true"}
    write_safetensors(tensors, weights, metadata)
    normalize_adapter_config(out_dir / "adapter_config.json", str(provenance.get("base", "")) or None)


def normalize_adapter_config(path: Path, base: str | None) -> None:
    """Name the base and sort peft's set-valued lists (their saved order changes between runs) for stable files."""
    config = json.loads(path.read_text())
    if base is not None:
        config["base_model_name_or_path"] = base
    for key in ("target_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def adam_steps(
    params: Sequence[Tensor],
    loss_fn: Callable[[Tensor], Tensor],
    *,
    n_samples: int,
    steps: int,
    batch: int,
    lr: float,
    generator: torch.Generator,
    weight_decay: float = 0.0,
) -> float:
    """Minibatch AdamW: ``loss_fn(batch_indices)`` per step; returns the last loss."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(n_samples, (min(batch, n_samples),), generator=generator)
        optimizer.zero_grad()
        loss = loss_fn(idx)
        loss.backward()
        optimizer.step()
    return float(loss.detach())
