"""Exact ΔW cosine similarity between one LoRA and many, and per module between two, without forming any ΔW.

``cos(ΔW, ΔW') = Σ_i ⟨ΔW_i, ΔW'_i⟩_F / (‖ΔW‖_F ‖ΔW'‖_F)`` over the modules both LoRAs have with the same shape
(:func:`lol_engine.symmetry.shared_modules`); each inner product is ``Σ (B_iᵀB'_i) ⊙ (A_i A'_iᵀ)``, so the cost is
``O((d_in + d_out)·r·r')`` per module. Candidates with the same module layout are stacked and done in one batched
product; :func:`lol_engine.symmetry.lora_cosine` is the one-pair reference the tests compare against.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lol_engine.lora.weights import LoraWeights
from lol_engine.symmetry import delta_fro_norm, delta_inner, shared_modules

__all__ = ["cosine_to_many", "module_cosines"]


def _layout(lora: LoraWeights) -> tuple[tuple[str, int, int, int, tuple[int, ...]], ...]:
    return tuple((m.name, m.spec.d_out, m.spec.d_in, m.spec.rank, m.spec.orig_shape) for m in lora)


def cosine_to_many(query: LoraWeights, candidates: Sequence[LoraWeights]) -> np.ndarray:
    """ΔW cosine of ``query`` with every candidate (float64 array; NaN where they share no module)."""
    out = np.full(len(candidates), np.nan)
    groups: dict[tuple[tuple[str, int, int, int, tuple[int, ...]], ...], list[int]] = {}
    for i, lora in enumerate(candidates):
        groups.setdefault(_layout(lora), []).append(i)
    for members in groups.values():
        first = candidates[members[0]]
        names = shared_modules(query, first)
        if not names:
            continue
        inner = torch.zeros(len(members), dtype=torch.float64)
        norm_c = torch.zeros(len(members), dtype=torch.float64)
        norm_q = torch.zeros((), dtype=torch.float64)
        for name in names:
            q = query[name]
            a = torch.stack([candidates[i][name].a for i in members]).double()  # (N, r', d_in)
            b = torch.stack([candidates[i][name].b for i in members]).double()  # (N, d_out, r')
            scale = torch.tensor([candidates[i][name].scale for i in members], dtype=torch.float64)
            inner += delta_inner(q.a.double(), q.b.double(), a, b, q.scale, 1.0) * scale
            norm_c += delta_fro_norm(a, b, scale.abs()).square()
            norm_q += delta_fro_norm(q.a.double(), q.b.double(), q.scale).square()
        denominator = (norm_q * norm_c).sqrt()
        cos = torch.where(denominator > 0, inner / denominator.clamp_min(1e-300), torch.zeros_like(inner))
        out[members] = cos.clamp(-1.0, 1.0).numpy()
    return out


def module_cosines(first: LoraWeights, second: LoraWeights) -> list[tuple[str, float, float, float]]:
    """``(module, ΔW cosine, ‖ΔW‖_F of first, ‖ΔW‖_F of second)`` for every shared module, in ``first``'s order."""
    rows = []
    for name in shared_modules(first, second):
        m1, m2 = first[name], second[name]
        a1, b1, a2, b2 = m1.a.double(), m1.b.double(), m2.a.double(), m2.b.double()
        n1 = float(delta_fro_norm(a1, b1, m1.scale))
        n2 = float(delta_fro_norm(a2, b2, m2.scale))
        inner = float(delta_inner(a1, b1, a2, b2, m1.scale, m2.scale))
        cos = max(-1.0, min(1.0, inner / (n1 * n2))) if n1 * n2 > 0 else 0.0
        rows.append((name, cos, n1, n2))
    return rows
