r"""A ΔW sketch: a fixed-length random projection of a LoRA's whole update whose inner products estimate ΔW's.

The candidates of a large collection's ΔW-cosine neighbours (:meth:`lol_engine.explorer.Explorer.neighbours`) must
come from a vector whose cosine follows the ΔW cosine; the fingerprint does not (it keeps spectra only: ``ΔW`` and
``-ΔW``, or two LoRAs with equal spectra in different subspaces, share a fingerprint). The sketch of a module is

.. math::
    s_m = R_m \operatorname{vec}(P_m \,\Delta W_m\, Q_m^\top), \qquad
    \Delta W_m = \text{scale}\cdot B_m A_m, \qquad s = \textstyle\sum_m s_m,

with Gaussian ``P_m: (p, d_out)``, ``Q_m: (q, d_in)`` (entries of variance ``1/p``, ``1/q``; one pair per module
shape) and ``R_m`` a random signed permutation of the ``D = p q`` entries, seeded by a hash of the module's name and
shape (every process draws the same ones; memory stays a few MB however many modules a LoRA has). Then
:math:`\mathbb E\langle s, s'\rangle = \sum_m \langle \Delta W_m, \Delta W'_m\rangle_F` over the modules both LoRAs
have with the same shape (the numerator of :func:`lol_engine.similarity.cosine_to_many`); modules of one LoRA only
add zero-mean noise. The error of the cosine estimate shrinks like ``1/√D``. Cost per module:
``O(r (p d_out + q d_in) + D r)``; ΔW is never formed. It depends on ``ΔW`` only, hence is GL(r)-invariant.
It is a candidate generator: the explorer re-ranks its candidates by the exact ΔW cosine.

>>> import torch
>>> from lol_engine.lora.weights import LoraWeights
>>> lora = LoraWeights.from_factors({"layer.q": (torch.randn(2, 5), torch.randn(3, 2))})
>>> delta_sketch(lora).shape
(256,)
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from lol_engine.lora.weights import LoraWeights

__all__ = ["DW_SKETCH", "SKETCH_DIM", "DeltaSketchEncoder", "delta_sketch"]

DW_SKETCH = "dw-sketch"  # encoder name of the sketch
SKETCH_DIM = 256  # D: the cosine estimate's error is about 1/√D
_SIDE = 16  # p = q: each module's ΔW is first compressed to a 16 × 16 matrix


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@functools.lru_cache(maxsize=256)
def _compressors(d_out: int, d_in: int, salt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``P: (p, d_out)``, ``Q: (q, d_in)`` (float64) of every module of that shape: a model has few distinct
    shapes, so this cache stays small (an SDXL LoRA: about ten), whatever the number of modules."""
    gen = torch.Generator().manual_seed(_seed(f"{d_out}|{d_in}|{salt}"))
    p = torch.randn(_SIDE, d_out, generator=gen, dtype=torch.float64) / _SIDE**0.5
    q = torch.randn(_SIDE, d_in, generator=gen, dtype=torch.float64) / _SIDE**0.5
    return p, q


@functools.lru_cache(maxsize=8192)
def _scatter(name: str, d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``R_m`` of one module as a signed permutation of the ``p q = D`` entries (seeded by name and shape): an
    orthogonal map, so a module's own inner product is kept exactly, while modules of different names land on
    independent random signs (their cross terms have mean zero). 256 indices and signs a module."""
    gen = torch.Generator().manual_seed(_seed(f"{name}|{d_out}|{d_in}"))
    order = torch.randperm(SKETCH_DIM, generator=gen)
    signs = torch.randint(0, 2, (SKETCH_DIM,), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
    return order, signs


def delta_sketch(lora: LoraWeights) -> np.ndarray:
    """The ``(SKETCH_DIM,)`` float32 sketch of ``lora``'s ΔW (see the module)."""
    out = torch.zeros(SKETCH_DIM, dtype=torch.float64)
    for m in lora:
        p, q = _compressors(m.spec.d_out, m.spec.d_in)
        order, signs = _scatter(m.name, m.spec.d_out, m.spec.d_in)
        u = p @ m.b.double()  # (p, r)
        v = m.a.double() @ q.T  # (r, q)
        out[order] += signs * (m.scale * (u @ v)).reshape(-1)  # R_m vec(P ΔW Qᵀ)
    return out.numpy().astype(np.float32)


class DeltaSketchEncoder:
    """The ΔW sketch as an encoder (``dw-sketch``): every LoRA has one. Ingest it with the other encoders so that
    large collections find ΔW-cosine candidates by it (:mod:`lol_engine.ann`)."""

    name = DW_SKETCH

    def accepts(self, lora: LoraWeights) -> bool:
        """Every LoRA has a sketch."""
        return True

    def encode_many(self, loras: Sequence[LoraWeights]) -> list[np.ndarray]:
        """The sketch of each LoRA."""
        return [delta_sketch(lora) for lora in loras]
