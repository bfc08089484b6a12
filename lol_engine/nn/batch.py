"""A batch of LoRAs with one spec, as per-module stacked factors: the input of every LoL model.

**Scale choice (documented once, here).** By default the scale is *folded* into the factors at batching time,
``A ← sign(s)·√|s|·A``, ``B ← √|s|·B`` (:meth:`LoraWeights.fold_scale`), so every model sees the true update
``ΔW = s·B A``. The paper's code feeds raw factors and ignores ``α/r``; then the same ΔW at two ranks (α fixed)
looks different to the model. ``fold_scale=False`` reproduces the paper's behaviour; ``tests/test_nn.py`` shows the
difference on a rank change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lol_engine.errors import BadRequestError
from lol_engine.lora.weights import LoraWeights
from lol_engine.spec import LayerSpec, LoraSpec

__all__ = ["LoraBatch", "SpecMismatchError", "check_compatible"]


class SpecMismatchError(BadRequestError):
    """A LoRA's modules do not match what a predictor expects; the message says which are missing or differ."""


def check_compatible(expected: LoraSpec, got: LoraSpec, *, same_rank: bool) -> None:
    """Raise :class:`SpecMismatchError` naming missing, extra or differently shaped modules."""
    want = {layer.name: layer for layer in expected.layers}
    have = {layer.name: layer for layer in got.layers}
    missing = [n for n in want if n not in have]
    extra = [n for n in have if n not in want]

    def mismatch(n: str) -> bool:
        shape_differs = (want[n].d_out, want[n].d_in) != (have[n].d_out, have[n].d_in)
        return shape_differs or (same_rank and want[n].rank != have[n].rank)

    differ = [
        f"{n}: expects {want[n].d_out}×{want[n].d_in}"
        + (f" rank {want[n].rank}" if same_rank else "")
        + f", got {have[n].d_out}×{have[n].d_in} rank {have[n].rank}"
        for n in want
        if n in have and mismatch(n)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} module(s) missing (first: {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} unexpected module(s) (first: {extra[0]})")
    if differ:
        problems.append(f"{len(differ)} module(s) differ ({differ[0]})")
    if problems:
        raise SpecMismatchError("the LoRA does not fit this predictor: " + "; ".join(problems))


@dataclass(frozen=True, eq=False)
class LoraBatch:
    """``a[i]: (N, r_i, d_in_i)``, ``b[i]: (N, d_out_i, r_i)`` for module ``i`` of ``spec``; scales already folded
    unless ``folded`` is False (then ``scale: (N, L)`` holds them)."""

    spec: LoraSpec
    a: tuple[Tensor, ...]
    b: tuple[Tensor, ...]
    scale: Tensor
    folded: bool

    @classmethod
    def from_loras(
        cls,
        loras: Sequence[LoraWeights],
        *,
        fold_scale: bool = True,
        spec: LoraSpec | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> LoraBatch:
        """Stack LoRAs with the same modules and ranks (module order follows ``spec``, default the first LoRA's)."""
        if not loras:
            raise ValueError("an empty batch")
        spec = spec or loras[0].spec
        for lora in loras:
            check_compatible(spec, lora.spec, same_rank=False)
        names = spec.names
        loras = [lora.fold_scale() if fold_scale else lora for lora in loras]
        a = tuple(torch.stack([lora[n].a for lora in loras]).to(dtype) for n in names)
        b = tuple(torch.stack([lora[n].b for lora in loras]).to(dtype) for n in names)
        scale = torch.tensor([[lora[n].scale for n in names] for lora in loras], dtype=dtype)
        ranks = {n: {lora[n].spec.rank for lora in loras} for n in names}
        if any(len(r) > 1 for r in ranks.values()):
            raise SpecMismatchError("LoRAs in one batch must share each module's rank")
        layers = tuple(
            LayerSpec(n, s.d_out, s.d_in, next(iter(ranks[n])), s.kind, s.orig_shape)
            for n, s in zip(names, spec.layers, strict=True)
        )
        return cls(LoraSpec(layers), a, b, scale, fold_scale)

    def __len__(self) -> int:
        return self.a[0].shape[0]

    def index(self, idx: Tensor | slice) -> LoraBatch:
        """A sub-batch."""
        return LoraBatch(
            self.spec, tuple(t[idx] for t in self.a), tuple(t[idx] for t in self.b), self.scale[idx], self.folded
        )

    def to(self, *args: object, **kwargs: object) -> LoraBatch:
        """``Tensor.to`` on every tensor (device and dtype follow what you pass)."""
        move = lambda t: t.to(*args, **kwargs)  # noqa: E731
        return LoraBatch(self.spec, tuple(map(move, self.a)), tuple(map(move, self.b)), move(self.scale), self.folded)

    def scaled(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Factors whose product is the true ΔW (folds the scale now if the batch was built without folding)."""
        if self.folded:
            return self.a, self.b
        return tuple(a * self.scale[:, i, None, None] for i, a in enumerate(self.a)), self.b
