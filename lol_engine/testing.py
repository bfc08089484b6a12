"""Test helpers that ship with the package: random LoRAs and GL(r) invariance / equivariance / sensitivity checks.

>>> from lol_engine.spec import LayerSpec
>>> spec = LoraSpec((LayerSpec("q", d_out=6, d_in=5, rank=2), LayerSpec("v", d_out=3, d_in=5, rank=2)))
>>> lora = random_lora(spec, generator=torch.Generator().manual_seed(0))
>>> from lol_engine.symmetry import total_fro_norm
>>> assert_gl_invariant(total_fro_norm, lora, generator=torch.Generator().manual_seed(1))
>>> assert_gl_sensitive(total_fro_norm, lora, generator=torch.Generator().manual_seed(2))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lol_engine.lora.weights import LoraModule, LoraWeights
from lol_engine.spec import LoraSpec
from lol_engine.symmetry import act_gl, random_gl, random_gl_like

__all__ = ["as_flat_tensor", "assert_gl_equivariant", "assert_gl_invariant", "assert_gl_sensitive", "random_lora"]


def random_lora(
    spec: LoraSpec,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    scale: float | Sequence[float] = 1.0,
) -> LoraWeights:
    """A LoRA of the given spec with standard-normal factors scaled by ``1/√d`` so ``ΔW`` entries are ``O(1)``."""
    scales = [scale] * len(spec) if isinstance(scale, int | float) else list(scale)
    modules = []
    for layer, s in zip(spec.layers, scales, strict=True):
        a = torch.randn(layer.rank, layer.d_in, generator=generator, dtype=dtype) / layer.d_in**0.5
        b = torch.randn(layer.d_out, layer.rank, generator=generator, dtype=dtype) / layer.rank**0.5
        modules.append(LoraModule(layer, a, b, scale=float(s), alpha=float(s) * layer.rank))
    return LoraWeights(tuple(modules))


def as_flat_tensor(value: Any) -> Tensor:
    """Flatten a function's output (tensor, array, number, mapping, sequence or LoraWeights) to one float64 vector."""
    if isinstance(value, LoraWeights):
        return torch.cat([torch.cat([m.a.reshape(-1), m.b.reshape(-1)]) for m in value]).to(torch.float64)
    if isinstance(value, Tensor):
        return value.detach().reshape(-1).to(torch.float64).cpu()
    if isinstance(value, np.ndarray | float | int | np.floating):
        return torch.as_tensor(np.asarray(value, dtype=np.float64)).reshape(-1)
    if isinstance(value, Mapping):
        return torch.cat([as_flat_tensor(value[k]) for k in sorted(value)]) if value else torch.zeros(0)
    if isinstance(value, Sequence):
        return torch.cat([as_flat_tensor(v) for v in value]) if value else torch.zeros(0)
    raise TypeError(f"cannot compare outputs of type {type(value).__name__}")


def _assert_close(got: Tensor, want: Tensor, rtol: float, atol: float, what: str) -> None:
    if got.shape != want.shape:
        raise AssertionError(f"{what}: output shape changed from {tuple(want.shape)} to {tuple(got.shape)}")
    err = (got - want).abs()
    bound = atol + rtol * want.abs()
    if not bool((err <= bound).all()):
        worst = int(torch.argmax(err - bound))
        raise AssertionError(
            f"{what}: max abs error {float(err.max()):.3e} (entry {worst}: got {float(got[worst]):.6e}, "
            f"expected {float(want[worst]):.6e}); rtol={rtol}, atol={atol}"
        )


def assert_gl_invariant(
    fn: Callable[[LoraWeights], Any],
    lora: LoraWeights,
    *,
    generator: torch.Generator | None = None,
    cond_max: float = 10.0,
    rtol: float = 1e-9,
    atol: float = 1e-10,
    trials: int = 3,
) -> None:
    """Assert ``fn(g·x) ≈ fn(x)`` for ``trials`` random ``g ∈ Π GL(r_i)`` with condition number ≤ ``cond_max``."""
    want = as_flat_tensor(fn(lora))
    for trial in range(trials):
        moved = act_gl(lora, random_gl_like(lora, generator=generator, cond_max=cond_max))
        _assert_close(as_flat_tensor(fn(moved)), want, rtol, atol, f"GL invariance, trial {trial}")


def assert_gl_equivariant(
    fn: Callable[[LoraWeights], LoraWeights],
    lora: LoraWeights,
    *,
    generator: torch.Generator | None = None,
    cond_max: float = 10.0,
    rtol: float = 1e-9,
    atol: float = 1e-10,
    trials: int = 3,
) -> None:
    """Assert ``fn(g·x) ≈ g·fn(x)``: ``fn`` maps a LoRA to A-like / B-like outputs of the same ranks."""
    for trial in range(trials):
        gs = random_gl_like(lora, generator=generator, cond_max=cond_max)
        got = as_flat_tensor(fn(act_gl(lora, gs)))
        want = as_flat_tensor(act_gl(fn(lora), gs))
        _assert_close(got, want, rtol, atol, f"GL equivariance, trial {trial}")


def assert_gl_sensitive(
    fn: Callable[[LoraWeights], Any],
    lora: LoraWeights,
    *,
    generator: torch.Generator | None = None,
    cond_max: float = 10.0,
    min_change: float = 1e-6,
) -> None:
    """Assert that an *uncoupled* change ``A_i → G_i A_i`` (B unchanged, so ΔW changes) changes ``fn``.

    Catches functions that are trivially invariant, e.g. constant. ``min_change`` is relative to ``‖fn(x)‖``.
    """

    def move_a_only(m: LoraModule) -> LoraModule:
        g = random_gl(m.spec.rank, generator=generator, cond_max=cond_max, dtype=m.a.dtype, device=m.a.device)
        return replace(m, a=g @ m.a)

    before = as_flat_tensor(fn(lora))
    after = as_flat_tensor(fn(lora.map_modules(move_a_only)))
    change = float((after - before).norm())
    scale = max(float(before.norm()), 1e-12)
    if change <= min_change * scale:
        raise AssertionError(f"not sensitive: an uncoupled change A → G A moved the output by only {change:.3e}")
