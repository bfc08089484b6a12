"""Frozen specs of a LoRA's weight space: which modules, their widths and ranks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod
from typing import Final, Literal

__all__ = ["KINDS", "LayerSpec", "LoraSpec", "ModuleKind", "natural_key"]

ModuleKind = Literal["linear", "conv", "embedding"]
"""How a module's ΔW is shaped: a linear weight, a flattened conv kernel, or an embedding table (transposed)."""
KINDS: Final[tuple[ModuleKind, ...]] = ("linear", "conv", "embedding")


@dataclass(frozen=True)
class LayerSpec:
    """One adapted module in the canonical convention ``A: (rank, d_in)``, ``B: (d_out, rank)``.

    >>> LayerSpec("model.layers.0.self_attn.v_proj", d_out=256, d_in=1536, rank=4).orig_shape
    (256, 1536)
    """

    name: str  # canonical module path, e.g. "model.layers.3.self_attn.q_proj"
    d_out: int
    d_in: int  # flattened: in_channels * kh * kw for conv LoRAs
    rank: int
    kind: ModuleKind = "linear"
    orig_shape: tuple[int, ...] = ()  # shape of the base weight ΔW reshapes to; () means (d_out, d_in)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown module kind {self.kind!r}; expected one of {KINDS}")
        if min(self.d_out, self.d_in, self.rank) < 1:
            raise ValueError(
                f"{self.name}: d_out, d_in and rank must be positive, got {self.d_out, self.d_in, self.rank}"
            )
        if not self.orig_shape:
            default = (self.d_in, self.d_out) if self.kind == "embedding" else (self.d_out, self.d_in)
            object.__setattr__(self, "orig_shape", default)
        elif prod(self.orig_shape) != self.d_out * self.d_in:
            raise ValueError(
                f"{self.name}: orig_shape {self.orig_shape} does not hold d_out*d_in = {self.d_out * self.d_in}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the canonical (flattened) ΔW, ``(d_out, d_in)``."""
        return (self.d_out, self.d_in)


@dataclass(frozen=True)
class LoraSpec:
    """The ordered modules of one LoRA. Two LoRAs with equal specs can be stacked into one batch."""

    layers: tuple[LayerSpec, ...]

    def __post_init__(self) -> None:
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValueError("duplicate layer names in LoraSpec")

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def names(self) -> tuple[str, ...]:
        """Module names, in order."""
        return tuple(layer.name for layer in self.layers)

    @property
    def ranks(self) -> tuple[int, ...]:
        """Per-module ranks, in order."""
        return tuple(layer.rank for layer in self.layers)


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``layers.2`` before ``layers.10``.

    >>> sorted(["layers.10.q", "layers.2.q"], key=natural_key)
    ['layers.2.q', 'layers.10.q']
    """
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name) if part)
