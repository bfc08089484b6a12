"""Builders of small LoRA files with real key names, written with ``safetensors.torch.save_file``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

Tensors = dict[str, torch.Tensor]


def save(path: Path, tensors: Tensors, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` as a safetensors file and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def factors(
    rank: int, d_in: int, d_out: int, *, kernel: tuple[int, ...] = (), seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``A: (rank, d_in, *kernel)`` and ``B: (d_out, rank, 1, …)`` in float32."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, d_in, *kernel, generator=gen)
    b = torch.randn(d_out, rank, *(1 for _ in kernel), generator=gen)
    return a, b


def pair(stem: str, a_suffix: str, b_suffix: str, a: torch.Tensor, b: torch.Tensor) -> Tensors:
    """Two keys ``stem + a_suffix`` and ``stem + b_suffix``."""
    return {stem + a_suffix: a, stem + b_suffix: b}


def kohya(
    stem: str, rank: int = 4, d_in: int = 16, d_out: int = 12, alpha: float | None = None, seed: int = 0
) -> Tensors:
    """A kohya module: ``lora_down``/``lora_up`` plus an optional 0-dim ``alpha``."""
    a, b = factors(rank, d_in, d_out, seed=seed)
    out = pair(stem, ".lora_down.weight", ".lora_up.weight", a, b)
    if alpha is not None:
        out[stem + ".alpha"] = torch.tensor(float(alpha))
    return out


def peft(stem: str, rank: int = 4, d_in: int = 16, d_out: int = 12, seed: int = 0) -> Tensors:
    """A PEFT-style module: ``lora_A.weight``/``lora_B.weight``."""
    a, b = factors(rank, d_in, d_out, seed=seed)
    return pair(stem, ".lora_A.weight", ".lora_B.weight", a, b)


def raw_file(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """Write a safetensors-shaped file by hand (for malformed headers): ``[u64 N][header][data]``."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(blob) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    return path


def write_config(folder: Path, **fields: object) -> Path:
    """Write an ``adapter_config.json`` with PEFT's defaults overridden by ``fields``."""
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": ["q_proj"], **fields}
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(config))
    return path
