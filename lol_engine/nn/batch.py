"""Batches of LoRAs as per-module stacked factors, the input of the LoL models: :class:`LoraBatch` (one spec, every
LoRA has the same modules) and :class:`ModuleSetBatch` (LoRAs of one base with different module sets and ranks, for
the models that read one token per module).

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
from torch.nn.functional import pad as nn_pad

from lol_engine.errors import BadRequestError
from lol_engine.lora.weights import LoraWeights
from lol_engine.spec import LayerSpec, LoraSpec, natural_key

__all__ = ["LoraBatch", "ModuleSetBatch", "SpecMismatchError", "check_compatible"]


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


@dataclass(frozen=True, eq=False)
class ModuleSetBatch:
    """LoRAs with different module sets and ranks: the union of their modules (natural order of names), every
    module's factors zero-padded in rank to the batch's largest rank ``r``, and which LoRA has which module.

    ``a[m]: (N, r, d_in_m)``, ``b[m]: (N, d_out_m, r)``, ``present: (N, M)`` bool, ``scale: (N, M)`` (ones when
    folded). A LoRA without module ``m`` has zero factors there and ``present[n, m]`` False. Zero-padding the rank
    keeps ΔW: the padded rows of A and columns of B add nothing to ``B A``. ``spec`` holds the union with rank ``r``.

    >>> from lol_engine.testing import random_lora
    >>> gen = torch.Generator().manual_seed(0)
    >>> x = random_lora(LoraSpec((LayerSpec("q", 6, 5, 2),)), generator=gen)
    >>> y = random_lora(LoraSpec((LayerSpec("v", 6, 5, 3),)), generator=gen)
    >>> batch = ModuleSetBatch.from_loras([x, y])
    >>> batch.spec.names, batch.present.tolist(), tuple(batch.a[0].shape)
    (('q', 'v'), [[True, False], [False, True]], (2, 3, 5))
    """

    spec: LoraSpec
    a: tuple[Tensor, ...]
    b: tuple[Tensor, ...]
    present: Tensor
    scale: Tensor
    folded: bool

    @classmethod
    def from_loras(
        cls, loras: Sequence[LoraWeights], *, fold_scale: bool = True, dtype: torch.dtype = torch.float32
    ) -> ModuleSetBatch:
        """Stack LoRAs whose modules may differ; a module must have one shape in every LoRA that has it."""
        if not loras:
            raise ValueError("an empty batch")
        shapes: dict[str, LayerSpec] = {}
        for lora in loras:
            for layer in lora.spec.layers:
                known = shapes.setdefault(layer.name, layer)
                if (known.d_out, known.d_in) != (layer.d_out, layer.d_in):
                    raise SpecMismatchError(
                        f"module {layer.name} is {known.d_out}×{known.d_in} in one LoRA and "
                        f"{layer.d_out}×{layer.d_in} in another: not LoRAs of one base"
                    )
        names = sorted(shapes, key=natural_key)
        rank = max(layer.rank for lora in loras for layer in lora.spec.layers)
        loras = [lora.fold_scale() if fold_scale else lora for lora in loras]
        like = loras[0].modules[0].a
        n, column = len(loras), {name: j for j, name in enumerate(names)}
        a = [torch.zeros(n, rank, shapes[m].d_in, dtype=dtype, device=like.device) for m in names]
        b = [torch.zeros(n, shapes[m].d_out, rank, dtype=dtype, device=like.device) for m in names]
        present = torch.zeros(n, len(names), dtype=torch.bool, device=like.device)
        scale = torch.ones(n, len(names), dtype=dtype, device=like.device)
        for i, lora in enumerate(loras):
            for module in lora:
                j, r = column[module.name], module.spec.rank
                a[j][i, :r] = module.a.to(dtype)
                b[j][i, :, :r] = module.b.to(dtype)
                present[i, j] = True
                scale[i, j] = module.scale
        layers = tuple(
            LayerSpec(m, shapes[m].d_out, shapes[m].d_in, rank, shapes[m].kind, shapes[m].orig_shape) for m in names
        )
        return cls(LoraSpec(layers), tuple(a), tuple(b), present, scale, fold_scale)

    @classmethod
    def from_lora_batch(cls, batch: LoraBatch) -> ModuleSetBatch:
        """The same LoRAs, every module present, factors zero-padded to the largest rank."""
        rank = max(batch.spec.ranks)
        a = tuple(nn_pad(t, (0, 0, 0, rank - t.shape[1])) for t in batch.a)  # (N, r, d_in)
        b = tuple(nn_pad(t, (0, rank - t.shape[2])) for t in batch.b)  # (N, d_out, r)
        layers = tuple(LayerSpec(s.name, s.d_out, s.d_in, rank, s.kind, s.orig_shape) for s in batch.spec.layers)
        present = torch.ones(batch.scale.shape, dtype=torch.bool, device=batch.scale.device)
        return cls(LoraSpec(layers), a, b, present, batch.scale, batch.folded)

    def __len__(self) -> int:
        return self.present.shape[0]

    def index(self, idx: Tensor | slice) -> ModuleSetBatch:
        """A sub-batch (it keeps every module of the union; some may be absent from all of its LoRAs)."""
        return ModuleSetBatch(
            self.spec,
            tuple(t[idx] for t in self.a),
            tuple(t[idx] for t in self.b),
            self.present[idx],
            self.scale[idx],
            self.folded,
        )

    def to(self, *args: object, **kwargs: object) -> ModuleSetBatch:
        """``Tensor.to`` on every float tensor (device and dtype follow what you pass; ``present`` stays bool)."""
        move = lambda t: t.to(*args, **kwargs)  # noqa: E731
        device = move(self.scale).device
        return ModuleSetBatch(
            self.spec,
            tuple(map(move, self.a)),
            tuple(map(move, self.b)),
            self.present.to(device),
            move(self.scale),
            self.folded,
        )

    def scaled(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Factors whose product is the true ΔW (folds the scale now if the batch was built without folding)."""
        if self.folded:
            return self.a, self.b
        return tuple(a * self.scale[:, i, None, None] for i, a in enumerate(self.a)), self.b
