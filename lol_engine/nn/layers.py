r"""GL(r)-equivariant building blocks.

``a: (N, r, d_in)`` is A-like (transforms by ``G·``), ``b: (N, d_out, r)`` is B-like (by ``·G⁻¹``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["GLLinear", "canonicalize", "gl_gate", "spectra_features"]


class GLLinear(nn.Module):
    r"""The GL-equivariant linear layer of the paper (Eq. 4), one pair of maps per module:

    .. math::
        B_i \mapsto \Phi_i B_i, \qquad A_i \mapsto A_i \Psi_i^\top

    A-like in, A-like out; B-like in, B-like out. No A↔B mixing, no mixing across modules, no bias (Proposition 1:
    these are all the linear equivariant maps). Cost ``O((d_in + d_out)·r·d)`` per module; ΔW is never formed.

    >>> layer = GLLinear([(6, 5)], width=3)
    >>> a, b = layer([torch.randn(2, 4, 5)], [torch.randn(2, 6, 4)])
    >>> a[0].shape, b[0].shape
    (torch.Size([2, 4, 3]), torch.Size([2, 3, 4]))
    """

    def __init__(self, shapes: Sequence[tuple[int, int]], width: int) -> None:
        super().__init__()
        self.phi = nn.ParameterList(nn.Parameter(torch.randn(width, d_out) / math.sqrt(d_out)) for d_out, _ in shapes)
        self.psi = nn.ParameterList(nn.Parameter(torch.randn(width, d_in) / math.sqrt(d_in)) for _, d_in in shapes)

    def forward(self, a: Sequence[Tensor], b: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        a_out = [torch.einsum("nri,di->nrd", a_i, psi) for a_i, psi in zip(a, self.psi, strict=True)]  # (N, r, d)
        b_out = [torch.einsum("nor,do->ndr", b_i, phi) for b_i, phi in zip(b, self.phi, strict=True)]  # (N, d, r)
        return a_out, b_out


def gl_gate(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    r"""GL nonlinearity (paper Eq. 6): rows of B and columns of A gated by the signs of ΔW's row and column sums.

    .. math::
        B \leftarrow \mathrm{diag}(\mathbb 1[B A \mathbf 1 > 0])\, B, \qquad
        A \leftarrow A\, \mathrm{diag}(\mathbb 1[\mathbf 1^\top B A > 0])

    A-like in, A-like out; B-like in, B-like out. Cost ``O((d_in + d_out) r)``; ΔW is never formed.

    >>> a, b = torch.randn(2, 4, 5), torch.randn(2, 3, 4)
    >>> [t.shape for t in gl_gate(a, b)]
    [torch.Size([2, 4, 5]), torch.Size([2, 3, 4])]
    """
    row = b @ a.sum(-1, keepdim=True)  # (N, d_out, 1) = B (A 1)
    col = b.sum(-2, keepdim=True) @ a  # (N, 1, d_in) = (1ᵀ B) A
    return a * (col > 0), b * (row > 0)


def canonicalize(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    r"""The GL-canonical factors of ``ΔW = B A``: ``B_c = Q_B U S^{1/2}``, ``A_c = S^{1/2} V^\top Q_A^\top``.

    ``B = Q_B R_B``, ``Aᵀ = Q_A R_A``, ``R_B R_Aᵀ = U S Vᵀ``. Signs are fixed so that the largest-magnitude entry of
    every column of ``B_c`` is positive. Invariant under GL(r) wherever the singular values are distinct; cost
    ``O((d_in + d_out) r² + r³)``.

    >>> a, b = torch.randn(2, 3, 7, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    >>> a_c, b_c = canonicalize(a, b)
    >>> bool(torch.allclose(b_c @ a_c, b @ a))
    True
    """
    q_b, r_b = torch.linalg.qr(b)  # (N, d_out, k), (N, k, r)
    q_a, r_a = torch.linalg.qr(a.mT)  # (N, d_in, k), (N, k, r)
    u, s, vh = torch.linalg.svd(r_b @ r_a.mT)  # core (N, k, k)
    b_dir = q_b @ u  # (N, d_out, k)
    pick = b_dir.abs().argmax(dim=-2, keepdim=True)  # (N, 1, k)
    sign = torch.sign(torch.gather(b_dir, -2, pick))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    root = s.sqrt().unsqueeze(-2)  # (N, 1, k)
    b_c = b_dir * sign * root
    a_c = (vh * sign.mT * root.mT) @ q_a.mT  # (N, k, d_in)
    return a_c, b_c


def spectra_features(a: Tensor, b: Tensor, width: int) -> Tensor:
    """``log(σ + 1e-6)`` of ΔW (QR route), truncated or zero-padded (before the log) to ``width``: ``(N, width)``."""
    from lol_engine.symmetry import singular_values

    sigma = singular_values(a, b)  # (N, r)
    sigma = sigma[..., :width] if sigma.shape[-1] >= width else nn.functional.pad(sigma, (0, width - sigma.shape[-1]))
    return torch.log(sigma + 1e-6)
