r"""The GL(r) symmetry of LoRA factors, and exact invariants computed without forming ΔW.

For ``G ∈ GL(r)``, ``g·(A, B) = (G A, B G⁻¹)`` leaves ``ΔW = s·B A`` unchanged. Everything here that is called an
invariant is a function of the ``ΔW`` alone, computed from ``r × r`` matrices:

* singular values: ``B = Q_B R_B``, ``Aᵀ = Q_A R_A`` ⇒ ``σ(B A) = σ(R_B R_Aᵀ)``, cost ``O((d_in + d_out) r²)``;
* Frobenius norm: ``‖B A‖²_F = Σ (BᵀB) ⊙ (A Aᵀ)``, cost ``O((d_in + d_out) r²)``;
* inner product: ``⟨B₁A₁, B₂A₂⟩_F = Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ)``, cost ``O((d_in + d_out) r₁ r₂)``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from lol_engine.lora.weights import LoraModule, LoraWeights

__all__ = [
    "act_gl",
    "act_gl_factors",
    "delta_fro_norm",
    "delta_inner",
    "lora_cosine",
    "lora_fro_norms",
    "lora_inner",
    "lora_singular_values",
    "many_singular_values",
    "qr_singular_values",
    "random_gl",
    "random_gl_like",
    "shared_modules",
    "singular_values",
    "stacked",
    "total_fro_norm",
]


def random_gl(
    rank: int,
    *,
    generator: torch.Generator | None = None,
    cond_max: float = 10.0,
    batch_shape: Sequence[int] = (),
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""A random well-conditioned ``G = Q_1 \mathrm{diag}(σ) Q_2`` with ``σ ∈ [κ^{-1/2}, κ^{1/2}]``, ``κ = cond_max``.

    The condition number of ``G`` is at most ``cond_max``; ``Q_1, Q_2`` are Haar-random orthogonal matrices.

    >>> g = random_gl(4, generator=torch.Generator().manual_seed(0), cond_max=10.0)
    >>> bool(torch.linalg.cond(g) <= 10.0 + 1e-9)
    True
    """
    if cond_max < 1:
        raise ValueError(f"cond_max must be >= 1, got {cond_max}")
    shape = (*batch_shape, rank, rank)
    q1 = _haar_orthogonal(shape, generator, dtype, device)
    q2 = _haar_orthogonal(shape, generator, dtype, device)
    half_log = 0.5 * math.log(cond_max)
    u = torch.rand((*batch_shape, rank), generator=generator, dtype=dtype, device=device)
    sigma = torch.exp((2 * u - 1) * half_log)  # (..., r) in [κ^-½, κ^½]
    return q1 @ torch.diag_embed(sigma) @ q2


def _haar_orthogonal(
    shape: tuple[int, ...], generator: torch.Generator | None, dtype: torch.dtype, device: torch.device | str | None
) -> Tensor:
    z = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    q, r = torch.linalg.qr(z)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # sign fix makes Q Haar-distributed


def random_gl_like(
    lora: LoraWeights, *, generator: torch.Generator | None = None, cond_max: float = 10.0
) -> tuple[Tensor, ...]:
    """One random ``G_i ∈ GL(r_i)`` per module, in the LoRA's dtype and device."""
    return tuple(
        random_gl(m.spec.rank, generator=generator, cond_max=cond_max, dtype=m.a.dtype, device=m.a.device)
        for m in lora
    )


def act_gl_factors(a: Tensor, b: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """``(G A, B G⁻¹)`` for batched factors ``a: (..., r, d_in)``, ``b: (..., d_out, r)``, ``g: (..., r, r)``.

    >>> a, b, g = torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64), random_gl(3)
    >>> ga, gb = act_gl_factors(a, b, g)
    >>> bool(torch.allclose(gb @ ga, b @ a))
    True
    """
    b_new = torch.linalg.solve(g.mT, b.mT).mT  # B G⁻¹ without forming the inverse
    return g @ a, b_new


def act_gl(lora: LoraWeights, gs: Sequence[Tensor]) -> LoraWeights:
    """Apply one ``G_i`` to each module: ``(A_i, B_i) ↦ (G_i A_i, B_i G_i⁻¹)``. Scales and DoRA data are untouched."""
    if len(gs) != len(lora):
        raise ValueError(f"need one group element per module: {len(gs)} for {len(lora)} modules")

    def act(m: LoraModule, g: Tensor) -> LoraModule:
        a, b = act_gl_factors(m.a, m.b, g)
        return replace(m, a=a, b=b)

    return replace(lora, modules=tuple(act(m, g) for m, g in zip(lora, gs, strict=True)))


def singular_values(a: Tensor, b: Tensor, scale: float | Tensor = 1.0) -> Tensor:
    r"""Singular values of ``scale · B A``, descending, padded with zeros to length ``r``; ΔW is never formed.

    ``a: (..., r, d_in)``, ``b: (..., d_out, r)`` → ``(..., r)``. Cost ``O((d_in + d_out) r² + r³)``. Float32/16
    factors on a CPU take the Gram route where it pays (:func:`_gram_route`: float64 Gram matrices); the others
    :func:`qr_singular_values`.

    >>> a, b = torch.randn(4, 30, dtype=torch.float64), torch.randn(20, 4, dtype=torch.float64)
    >>> bool(torch.allclose(singular_values(a, b), torch.linalg.svdvals(b @ a)[:4]))
    True
    """
    gram = _gram_singular_values(a, b) if _gram_route(a, b) else None
    sigma = gram if gram is not None else qr_singular_values(a, b)
    return sigma * _abs_scale(scale, sigma)


def qr_singular_values(a: Tensor, b: Tensor) -> Tensor:
    """Singular values of ``B A`` by the QR route, whatever the dtype and device: ``R_B R_Aᵀ`` from the QRs of ``B``
    and ``Aᵀ``, then the SVD of that ``r × r`` product. :func:`singular_values` takes it for float64 factors, on a
    GPU, under autograd, and for ranks the Gram route does not pay for; benchmarks time it against the Gram route.

    ``a: (..., r, d_in)``, ``b: (..., d_out, r)`` → ``(..., r)`` descending, padded with zeros.
    """
    rank = a.shape[-2]
    r_b = torch.linalg.qr(b, mode="r").R  # (..., min(d_out, r), r)
    r_a = torch.linalg.qr(a.mT, mode="r").R  # (..., min(d_in, r), r)
    sigma = torch.linalg.svdvals(r_b @ r_a.mT)  # (..., k)
    if sigma.shape[-1] < rank:
        sigma = torch.nn.functional.pad(sigma, (0, rank - sigma.shape[-1]))
    return sigma


_GRAM_SMALL_VALUES = 8192  # r·(d_in + d_out) of one module at most: a small module (Grams in NumPy)
_GRAM_SMALL_MAX_RANK = 16  # small modules above this rank take the QR route
_GRAM_MAX_RANK = 256  # large modules above this rank, or above d_in or d_out, take the QR route
_GRAM_CHUNK = 2**21  # factor entries converted to float64 at a time (16 MiB)


def _gram_route(a: Tensor, b: Tensor) -> bool:
    """Whether :func:`singular_values` takes the Gram route: CPU, no autograd, below float64, and a rank it pays for.

    On a CPU a batch of tall-skinny QRs is many LAPACK calls of level-2 work, while the Gram matrices are matrix
    products: with the real module shapes the float64 Grams took 2.7–3.6× less time than a float32 QR at rank 32 (SD
    1.5, SDXL), 2.5× at rank 128 and 2.6× for a 7B LLM at rank 16; at rank 8 they tie (the ``spectra route`` rows of
    ``benchmarks/run_all.py``). Where the rank exceeds ``d_in`` or ``d_out`` the Gram matrices are singular and their
    ``r × r`` eigenproblems cost more than the QRs of the thin side: a large module takes the Gram route only for
    ``r ≤ min(d_in, d_out, 256)``. Small modules (at most :data:`_GRAM_SMALL_VALUES` factor entries) take it up to
    rank 16, as before.

    Below float64 the Gram matrices formed in float64 are at least as accurate as a QR in the factors' own precision
    (see :func:`_gram_singular_values`); float64 factors keep the QR route and its full precision.
    """
    rank, d_in, d_out = a.shape[-2], a.shape[-1], b.shape[-2]
    return (
        (rank <= _GRAM_SMALL_MAX_RANK if _small_module(a, b) else rank <= min(d_in, d_out, _GRAM_MAX_RANK))
        and a.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and a.device.type == "cpu"
        and b.device.type == "cpu"
        and not (a.requires_grad or b.requires_grad)
        and a.dim() == b.dim()
    )


def _small_module(a: Tensor, b: Tensor) -> bool:
    """Whether one module of ``a: (..., r, d_in)``, ``b: (..., d_out, r)`` has at most :data:`_GRAM_SMALL_VALUES`
    factor entries: its Grams are formed in NumPy, and the Gram route's rank limit is :data:`_GRAM_SMALL_MAX_RANK`."""
    return a.shape[-2] * (a.shape[-1] + b.shape[-2]) <= _GRAM_SMALL_VALUES


def _gram_singular_values(a: Tensor, b: Tensor) -> Tensor | None:
    r"""Singular values of ``B A`` from the ``r × r`` Gram matrices, formed in float64, for low-precision factors.

    .. math::
        G_A = A A^\top = V W V^\top,\quad H = V W_+^{1/2},\quad
        σ(B A)^2 = \operatorname{eig}(H^\top (B^\top B) H)

    since :math:`H H^\top = G_A` makes :math:`H^\top G_B H` similar to :math:`G_B G_A = B^\top B A A^\top`. Every
    step is backward stable in float64 (:math:`H H^\top = G_A + E`, :math:`‖E‖ ≲ ε_{64} ‖G_A‖`), so the error of
    :math:`σ^2` is about :math:`ε_{64} ‖A‖^2 ‖B‖^2`, below what a float32 QR leaves (:math:`ε_{32} ‖A‖ ‖B‖` in σ).
    Rank-deficient and zero factors need no special case (clamped eigenvalues). Float64 values of float32/16 factors
    neither overflow nor underflow when squared.

    Small modules run in NumPy: a batch of tiny QRs or matmuls in torch runs as a parallel loop over the batch, and on
    a busy machine each such loop waits for its second thread (tens of ms for 64 LoRAs); NumPy runs them in one
    thread. Large modules (an SDXL one) run in torch, whose MKL products and batched eigensolvers are the faster there.

    ``a: (..., r, d_in)``, ``b: (..., d_out, r)`` → ``(..., r)`` descending, in the factors' dtype; None when a
    factor has a non-finite entry (the caller takes the QR route, whatever it makes of those).
    """
    rank = a.shape[-2]
    a2 = a.reshape(-1, rank, a.shape[-1])  # (N, r, d_in)
    b2 = b.reshape(-1, b.shape[-2], rank)  # (N, d_out, r)
    if not _small_module(a2, b2):
        sigma = _large_gram_singular_values(a2, b2)
        return None if sigma is None else sigma.to(a.dtype).reshape(*a.shape[:-2], rank)
    per = max(1, _GRAM_CHUNK // max(1, a2[0].numel() + b2[0].numel())) if len(a2) else 1
    out = np.empty((a2.shape[0], rank))
    for start in range(0, a2.shape[0], per):
        a64 = _float64(a2[start : start + per])
        b64 = _float64(b2[start : start + per])
        g_a = a64 @ a64.transpose(0, 2, 1)  # (n, r, r) = A Aᵀ
        g_b = b64.transpose(0, 2, 1) @ b64  # (n, r, r) = Bᵀ B
        if not (np.isfinite(g_a).all() and np.isfinite(g_b).all()):
            return None  # non-finite factors: the QR route, as before
        w, v = np.linalg.eigh(g_a)
        h = v * np.sqrt(np.maximum(w, 0.0))[:, None, :]  # (n, r, r), H Hᵀ = G_A
        squared = np.linalg.eigvalsh(h.transpose(0, 2, 1) @ g_b @ h)  # (n, r) ascending
        out[start : start + per] = np.sqrt(np.maximum(squared[:, ::-1], 0.0))
    return torch.from_numpy(out).to(a.dtype).reshape(*a.shape[:-2], rank)


def _large_gram_singular_values(a: Tensor, b: Tensor) -> Tensor | None:
    """:func:`_gram_singular_values` of large modules in torch (MKL): float64 copies made chunk by chunk in one buffer.

    ``a: (N, r, d_in)``, ``b: (N, d_out, r)`` → ``(N, r)`` float64, or None for non-finite factors.
    """
    rank = a.shape[-2]
    g_a = torch.empty(len(a), rank, rank, dtype=torch.float64)
    g_b = torch.empty(len(a), rank, rank, dtype=torch.float64)
    buffer = torch.empty(min(_GRAM_CHUNK, max(a.numel(), b.numel())), dtype=torch.float64)
    for factors, grams in ((a, g_a), (b, g_b)):
        per = max(1, len(buffer) // max(1, factors[0].numel()))
        for start in range(0, len(factors), per):
            chunk = factors[start : start + per]
            wide = buffer[: chunk.numel()].view(chunk.shape)
            wide.copy_(chunk)
            if factors is a:
                torch.matmul(wide, wide.mT, out=grams[start : start + per])  # A Aᵀ
            else:
                torch.matmul(wide.mT, wide, out=grams[start : start + per])  # Bᵀ B
    if not (torch.isfinite(g_a).all() and torch.isfinite(g_b).all()):
        return None
    h, info = torch.linalg.cholesky_ex(g_a)  # H Hᵀ = G_A, backward stable as the eigendecomposition below
    failed = info != 0  # G_A not numerically positive definite (A of rank < r): H = V W₊^½ for those
    if failed.any():
        w, v = torch.linalg.eigh(g_a[failed])
        h[failed] = v * w.clamp_min(0).sqrt().unsqueeze(-2)
    squared = torch.linalg.eigvalsh(h.mT @ g_b @ h)  # ascending
    return squared.flip(-1).clamp_min(0).sqrt()


def _float64(t: Tensor) -> np.ndarray:
    """A float64 NumPy copy of a CPU tensor (bfloat16, which NumPy lacks, through torch)."""
    if t.dtype == torch.bfloat16:
        return t.detach().to(torch.float64).numpy()
    return t.detach().numpy().astype(np.float64)


def _abs_scale(scale: float | Tensor, like: Tensor) -> Tensor | float:
    if isinstance(scale, Tensor):
        return scale.abs().to(like).unsqueeze(-1)
    return abs(scale)


def delta_fro_norm(a: Tensor, b: Tensor, scale: float | Tensor = 1.0) -> Tensor:
    """``‖scale · B A‖_F`` from ``r × r`` Gram matrices; ``a: (..., r, d_in)``, ``b: (..., d_out, r)`` → ``(...)``."""
    squared = ((b.mT @ b) * (a @ a.mT)).sum((-2, -1)).clamp_min(0)  # tr(BᵀB · AAᵀ)
    return squared.sqrt() * (scale.abs() if isinstance(scale, Tensor) else abs(scale))


def delta_inner(
    a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor, scale1: float | Tensor = 1.0, scale2: float | Tensor = 1.0
) -> Tensor:
    """``⟨s₁ B₁A₁, s₂ B₂A₂⟩_F`` without forming either product; ranks may differ. Batched over leading axes."""
    cross = ((b1.mT @ b2) * (a1 @ a2.mT)).sum((-2, -1))  # (r1, r2) ⊙ (r1, r2)
    return cross * scale1 * scale2


# Spectra per LoRA object, reused by the report, the fingerprint and the features of one request. The key carries the
# factors' version counters, so an in-place change of a tensor is never answered from the cache.
_SPECTRA: weakref.WeakKeyDictionary[LoraWeights, tuple[tuple[int, ...], dict[str, Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def lora_singular_values(lora: LoraWeights, cache: bool = True) -> dict[str, Tensor]:
    """Per-module singular values of the scaled ΔW. Modules of equal shape are stacked into one batched call.

    The result is cached on the (immutable) LoRA object; callers get a fresh dict of the same tensors.
    ``cache=False`` recomputes (benchmarks time the computation, not the cache).
    """
    if not cache:
        return _lora_singular_values(lora)
    versions = _versions(lora)
    cached = _SPECTRA.get(lora)
    if cached is not None and cached[0] == versions:
        return dict(cached[1])
    out = _lora_singular_values(lora)
    _SPECTRA[lora] = (versions, out)
    return dict(out)


_BATCH_ELEMENTS = 2**22  # factor entries stacked across LoRAs per batched call (16 MiB as float32)


def many_singular_values(loras: Sequence[LoraWeights]) -> list[dict[str, Tensor]]:
    """:func:`lora_singular_values` of many LoRAs, modules of one shape stacked *across* LoRAs into one batched call.

    Small LoRAs have a few modules of distinct shapes each, so one LoRA at a time means a few tiny QRs each; a batch of
    LoRAs of one base shares its shapes. Results are cached on each LoRA as :func:`lora_singular_values` caches them.
    """
    out: list[dict[str, Tensor] | None] = []
    todo: dict[tuple[int, int, int, torch.dtype, torch.device], list[tuple[int, LoraModule]]] = {}
    for i, lora in enumerate(loras):
        cached = _SPECTRA.get(lora)
        if cached is not None and cached[0] == _versions(lora):
            out.append(dict(cached[1]))
        elif sum(m.a.numel() + m.b.numel() for m in lora) > _BATCH_ELEMENTS:  # large: its own (zero-copy) buckets
            out.append(lora_singular_values(lora))
        else:
            out.append(None)
            for m in lora:
                todo.setdefault((m.spec.rank, m.spec.d_out, m.spec.d_in, m.a.dtype, m.a.device), []).append((i, m))
    found: dict[int, dict[str, Tensor]] = {i: {} for i, o in enumerate(out) if o is None}
    for members in todo.values():
        per_module = members[0][1].a.numel() + members[0][1].b.numel()
        step = max(1, _BATCH_ELEMENTS // per_module)
        for start in range(0, len(members), step):  # copies of at most _BATCH_ELEMENTS factor entries at a time
            chunk = members[start : start + step]
            a = torch.stack([m.a for _, m in chunk])  # (N, r, d_in)
            b = torch.stack([m.b for _, m in chunk])  # (N, d_out, r)
            scale = torch.tensor([m.scale for _, m in chunk], dtype=a.dtype, device=a.device)
            for (i, m), sigma in zip(chunk, singular_values(a, b, scale), strict=True):
                found[i][m.name] = sigma
    for i, spectra in found.items():
        lora = loras[i]
        ordered = {name: spectra[name] for name in lora.names}
        _SPECTRA[lora] = (_versions(lora), ordered)
        out[i] = dict(ordered)
    return [o for o in out if o is not None]


def _versions(lora: LoraWeights) -> tuple[int, ...]:
    return tuple(v for m in lora for v in (m.a._version, m.b._version))


def _lora_singular_values(lora: LoraWeights) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for modules in _buckets(lora):
        a = stacked([m.a for m in modules])  # (N, r, d_in)
        b = stacked([m.b for m in modules])  # (N, d_out, r)
        scale = torch.tensor([m.scale for m in modules], dtype=a.dtype, device=a.device)
        for m, sigma in zip(modules, singular_values(a, b, scale), strict=True):
            out[m.name] = sigma
    return {name: out[name] for name in lora.names}


def stacked(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.stack(tensors)``, without the copy when they already lie back to back in one buffer, in order.

    :func:`lol_engine.lora.parse.load_lora` reads the factors of modules of one shape into one stacked buffer, so the
    batched work here runs on that buffer as it is (a view of it). Anything else (a subset with a gap, another order,
    tensors of their own, a buffer that takes gradients) is stacked as usual.

    >>> base = torch.randn(3, 2, 4)
    >>> stacked(list(base)) is base, torch.equal(stacked([base[1], base[0]]), torch.stack([base[1], base[0]]))
    (True, True)
    """
    first = tensors[0] if tensors else None
    base = first._base if first is not None else None
    if base is None or base.requires_grad or not _back_to_back(tensors, base):
        return torch.stack(list(tensors))
    assert first is not None
    shape = (len(tensors), *first.shape)
    if base.shape == shape and base.data_ptr() == first.data_ptr() and base.is_contiguous():
        return base
    return base.as_strided(shape, (first.numel(), *first.stride()), first.storage_offset())


def _back_to_back(tensors: Sequence[Tensor], base: Tensor) -> bool:
    """Whether ``tensors`` are contiguous views of ``base`` of one shape and dtype, each starting where the one before
    ends."""
    first = tensors[0]
    start, step = first.data_ptr(), first.numel() * first.element_size()
    shape, strides = first.shape, first.stride()
    return (
        first.is_contiguous()
        and first.dtype == base.dtype
        and all(
            t._base is base and t.data_ptr() == start + i * step and t.shape == shape and t.stride() == strides
            for i, t in enumerate(tensors)
        )
    )


def _buckets(lora: LoraWeights) -> list[list[LoraModule]]:
    """Modules grouped by (rank, d_out, d_in), so that each group runs as one batched call."""
    buckets: dict[tuple[int, int, int], list[LoraModule]] = {}
    for m in lora:
        buckets.setdefault((m.spec.rank, m.spec.d_out, m.spec.d_in), []).append(m)
    return list(buckets.values())


def lora_fro_norms(lora: LoraWeights) -> dict[str, Tensor]:
    """Per-module ``‖ΔW_i‖_F`` (scale included), batched over modules of equal shape."""
    out: dict[str, Tensor] = {}
    for modules in _buckets(lora):
        a = stacked([m.a for m in modules])  # (N, r, d_in)
        b = stacked([m.b for m in modules])  # (N, d_out, r)
        scale = torch.tensor([m.scale for m in modules], dtype=a.dtype, device=a.device)
        for m, norm in zip(modules, delta_fro_norm(a, b, scale), strict=True):
            out[m.name] = norm
    return {name: out[name] for name in lora.names}


def total_fro_norm(lora: LoraWeights) -> Tensor:
    """``sqrt(Σ_i ‖ΔW_i‖²_F)`` over all modules."""
    return torch.stack([n.square() for n in lora_fro_norms(lora).values()]).sum().sqrt()


def shared_modules(first: LoraWeights, second: LoraWeights) -> list[str]:
    """Names of modules present in both LoRAs with the same ΔW shape (ranks may differ)."""
    other = {m.name: m.spec for m in second}
    return [
        m.name
        for m in first
        if m.name in other
        and (other[m.name].d_out, other[m.name].d_in, other[m.name].orig_shape)
        == (m.spec.d_out, m.spec.d_in, m.spec.orig_shape)
    ]


def lora_inner(first: LoraWeights, second: LoraWeights) -> Tensor:
    """``Σ_i ⟨ΔW_i, ΔW'_i⟩_F`` over :func:`shared_modules`."""
    names = shared_modules(first, second)
    if not names:
        raise ValueError("the two LoRAs share no module of the same shape")
    terms = [
        delta_inner(first[n].a, first[n].b, second[n].a, second[n].b, first[n].scale, second[n].scale) for n in names
    ]
    return torch.stack(terms).sum()


def lora_cosine(first: LoraWeights, second: LoraWeights) -> float:
    """Cosine similarity of the two updates over :func:`shared_modules`, in ``[-1, 1]``; 0 if either is zero there."""
    names = shared_modules(first, second)
    inner = lora_inner(first, second)
    norm1 = torch.stack([delta_fro_norm(first[n].a, first[n].b, first[n].scale) ** 2 for n in names]).sum().sqrt()
    norm2 = torch.stack([delta_fro_norm(second[n].a, second[n].b, second[n].scale) ** 2 for n in names]).sum().sqrt()
    denominator = float(norm1 * norm2)
    if denominator == 0.0:
        return 0.0
    return max(-1.0, min(1.0, float(inner) / denominator))
