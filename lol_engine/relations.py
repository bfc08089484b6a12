r"""Near-duplicate detection: how a LoRA relates to a few candidates, from exact inner products of the factors.

A query ``q`` and candidates ``X_1 … X_K`` (in practice the top-k stored LoRAs by ΔW cosine, so the work is bounded
by ``k``, not by the collection) are compared as whole updates over the union of their modules (a module a LoRA lacks
counts as a zero ΔW). Four relations are recognised, simplest first:

* **same** — ``‖ΔW_q − ΔW_X‖_F ≤ τ ‖ΔW_X‖_F``: a format conversion, a GL(r) re-factorisation, an α ↔ B trade, an
  fp16 re-save;
* **rescale** — ``ΔW_q ≈ c ΔW_X`` with ``c = ⟨q, X⟩ / ‖X‖²`` and ``|c − 1| > τ`` (α changed);
* **truncation** — ``ΔW_q,i ≈ T_{k_i}(ΔW_X,i)`` per module, the best rank-``k_i`` approximation of X's module with
  ``k_i`` the query's (numerical) rank there, lower than X's in at least one module (kohya's ``resize_lora.py``,
  fixed or dynamic per-module ranks); the energy kept is ``Σ_i Σ_{j ≤ k_i} σ_ij² / Σ_i ‖ΔW_X,i‖²_F``;
* **merge** — ``ΔW_q ≈ Σ_j w_j ΔW_{X_j}`` over 2 … ``max_terms`` candidates, ``w = G_S⁻¹ h_S`` (least squares on the
  Gram matrix ``G_ij = ⟨ΔW_i, ΔW_j⟩`` and ``h_i = ⟨ΔW_i, ΔW_q⟩``); the fewest terms that fit are reported.

The residual of every fit is relative to ``‖ΔW_q‖_F`` (to ``‖ΔW_X‖_F`` for *same*) and must stay under

.. math::
    τ = \max\Big(10^{-3},\; 4\,\sqrt{ν_q^2 + Σ_j w_j^2 ν_j^2}\,/\,‖ΔW_q‖_F\Big),
    \qquad ν^2 = \tfrac{2u^2}{3} Σ_i s_i^2 Σ_j ‖b_{ij}‖^2 ‖a_{ij}‖^2,

``ν`` being the expected Frobenius error of rounding a LoRA's stored factors to its storage precision (unit roundoff
``u``: 2⁻¹¹ for F16, 2⁻⁸ for BF16, 2⁻²⁴ for F32; each entry moves by a uniform ``±u`` relative error of variance
``u²/3``). So an fp16 or bf16 re-save of a GL-mixed copy counts as the same ΔW however its factors are conditioned,
while float32 files are held to 10⁻³: a 0.1 % change is below what any LoRA tool means to change, and a real
retraining or a fine-tuned continuation moves ΔW by far more (see ``benchmarks/bench_duplicates.py``).

Residuals come from Gram entries (``‖q − Σ w X‖² = ‖q‖² − 2 wᵀh + wᵀGw``) in float64, so they are exact to about
``√ε ≈ 10⁻⁸`` relative: far below any τ.

Cost: per candidate ``O((d_in + d_out) r²)`` per module (two Gram blocks, and a QR of X's factors for truncation,
the route of :func:`lol_engine.symmetry.singular_values`); a merge search adds one Gram of the ``K`` candidates,
``O((d_in + d_out) (K r)²)`` per module, and ``C(K, 2) + … + C(K, m)`` solves of ``m × m`` systems. No ΔW is formed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

import numpy as np
import torch

from lol_engine.lora.weights import LoraModule, LoraWeights
from lol_engine.symmetry import delta_inner, lora_singular_values

__all__ = [
    "MIN_COSINE",
    "REL_TOLERANCE",
    "Relation",
    "RelationKind",
    "TruncationFit",
    "delta_gram",
    "relate",
    "rounding_noise",
    "truncation_fit",
    "unit_roundoff",
]

RelationKind = Literal["same", "rescale", "truncation", "merge"]
REL_TOLERANCE: Final = 1e-3  # the floor of τ: a relative ΔW change below 0.1 % is "the same"
NOISE_MARGIN: Final = 4.0  # τ allows 4× the expected rounding error of the files' storage precision
MIN_COSINE: Final = 0.3  # below this ΔW cosine no truncation (energy < 9 %) and no merge search is tried
_UNIT_ROUNDOFF: Final = {
    "F64": 2.0**-53,
    "F32": 2.0**-24,
    "F16": 2.0**-11,
    "BF16": 2.0**-8,
    "F8_E4M3": 2.0**-4,
    "F8_E5M2": 2.0**-3,
}
_TORCH_DTYPES: Final = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

_Key = tuple[str, int, int, tuple[int, ...]]  # a module as comparable: name and ΔW shape


@dataclass(frozen=True)
class Relation:
    """How a query LoRA derives from one or more candidates, with the fit that shows it.

    ``others`` are the candidates' keys (as given to :func:`relate`, e.g. store ids) and ``names`` their display
    names, in the order of ``weights``: ``(1.0,)`` for *same* and *truncation*, ``(c,)`` for *rescale*, one weight per
    term for *merge*. ``residual`` is the fit's relative error and ``tolerance`` the τ it had to stay under.
    """

    kind: RelationKind
    others: tuple[str, ...]
    names: tuple[str, ...]
    weights: tuple[float, ...]
    residual: float
    tolerance: float
    energy: float | None = None  # truncation: share of the source's Σσ² kept
    ranks: tuple[int, ...] = ()  # truncation: the rank kept in each of the source's modules (0: module absent)

    @property
    def text(self) -> str:
        """A one-line description, e.g. ``"rank-8 truncation of X keeping 97.3 % of its energy"``."""
        first = self.names[0]
        if self.kind == "same":
            return f"same ΔW as {first}"
        if self.kind == "rescale":
            return f"rescaled copy of {first} (×{self.weights[0]:.3g})"
        if self.kind == "truncation":
            kept = [k for k in self.ranks if k > 0]
            rank = f"rank-{kept[0]}" if min(kept) == max(kept) else f"rank-{min(kept)}…{max(kept)} (per module)"
            absent = len(self.ranks) - len(kept)
            tail = f", without {absent} of its {len(self.ranks)} modules" if absent else ""
            return f"{rank} truncation of {first} keeping {100 * (self.energy or 0.0):.1f} % of its energy{tail}"
        terms = []
        for i, (w, name) in enumerate(zip(self.weights, self.names, strict=True)):
            sign = ("−" if w < 0 else "") if i == 0 else (" − " if w < 0 else " + ")
            terms.append(f"{sign}{abs(w):.2g}·{name}")
        return "≈ " + "".join(terms)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``kind``, ``text``, ``ids`` (the ``others``), ``weights``, ``energy``, ``ranks``, fit."""
        return {
            "kind": self.kind,
            "text": self.text,
            "ids": list(self.others),
            "weights": list(self.weights),
            "energy": self.energy,
            "ranks": list(self.ranks) or None,
            "residual": self.residual,
            "tolerance": self.tolerance,
        }


def unit_roundoff(lora: LoraWeights) -> float:
    """The coarsest unit roundoff of the LoRA's storage dtypes (its file's, else its tensors')."""
    listed = [_UNIT_ROUNDOFF[d] for d in lora.meta.dtype.split("+") if d in _UNIT_ROUNDOFF]
    tensors = [_UNIT_ROUNDOFF.get(_TORCH_DTYPES.get(t.dtype, "F32"), 2.0**-24) for m in lora for t in (m.a, m.b)]
    return max(listed or tensors)


def rounding_noise(lora: LoraWeights) -> float:
    r"""Expected ``‖δΔW‖_F`` when each stored factor entry is rounded with relative error ``U(-u, u)``.

    .. math:: ν^2 = \tfrac{2u^2}{3} Σ_i s_i^2 Σ_j ‖b_{ij}‖^2 ‖a_{ij}‖^2

    with ``b_ij`` the j-th column of ``B_i`` and ``a_ij`` the j-th row of ``A_i``.
    """
    total = 0.0
    for m in lora:
        a, b = m.a.double(), m.b.double()
        total += m.scale**2 * float((b.square().sum(0) * a.square().sum(1)).sum())  # Σ_j ‖b_j‖²‖a_j‖²
    return math.sqrt(2.0 / 3.0 * total) * unit_roundoff(lora)


def _key(m: LoraModule) -> _Key:
    return (m.name, m.spec.d_out, m.spec.d_in, m.spec.orig_shape)


def delta_gram(loras: Sequence[LoraWeights]) -> np.ndarray:
    r"""``G_ij = Σ_modules ⟨ΔW_i, ΔW_j⟩_F`` over the union of modules (one a LoRA lacks is zero there), float64.

    Per module, the factors of every LoRA that has it are concatenated (``B`` scaled) and one
    ``(BᵀB) ⊙ (A Aᵀ)`` of size ``R × R`` (``R = Σ r``) is summed into blocks. Cost ``O((d_in + d_out) R²)``.

    >>> from lol_engine.spec import LayerSpec, LoraSpec
    >>> from lol_engine.testing import random_lora
    >>> spec = LoraSpec((LayerSpec("q", d_out=6, d_in=5, rank=2),))
    >>> x, y = (random_lora(spec, generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    >>> g = delta_gram([x, y])
    >>> dense = [m.delta_weight().reshape(-1) for m in (x["q"], y["q"])]
    >>> bool(np.isclose(g[0, 1], float(dense[0] @ dense[1])))
    True
    """
    groups: dict[_Key, list[tuple[int, LoraModule]]] = {}
    for i, lora in enumerate(loras):
        for m in lora:
            groups.setdefault(_key(m), []).append((i, m))
    gram = torch.zeros(len(loras), len(loras), dtype=torch.float64)
    for members in groups.values():
        a = torch.cat([m.a.double() for _, m in members])  # (R, d_in)
        b = torch.cat([m.b.double() * m.scale for _, m in members], dim=1)  # (d_out, R)
        owner = torch.cat([torch.full((m.spec.rank,), i) for i, m in members])  # (R,)
        pick = torch.nn.functional.one_hot(owner, len(loras)).double()  # (R, n)
        gram += pick.mT @ ((b.mT @ b) * (a @ a.mT)) @ pick  # (n, n)
    return gram.numpy()


def _truncated_factors(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """X's module as ``σ`` (descending), ``b_u = Q_B U`` (d_out, r) and ``a_v = Vᵀ Q_Aᵀ`` (r, d_in): ΔW = b_u σ a_v."""
    q_b, r_b = torch.linalg.qr(m.b.double())  # (d_out, r), (r, r)
    q_a, r_a = torch.linalg.qr(m.a.double().mT)  # (d_in, r), (r, r)
    u, sigma, vh = torch.linalg.svd(m.scale * r_b @ r_a.mT)  # core (r, r)
    return sigma, q_b @ u, vh @ q_a.mT


def _numerical_ranks(lora: LoraWeights, tolerance: float) -> dict[_Key, int]:
    spectra = lora_singular_values(lora)  # {name: σ descending}, scale included
    return {_key(m): int((spectra[m.name] > tolerance * spectra[m.name][0]).sum()) for m in lora}


class TruncationFit(NamedTuple):
    """How close a query is to the per-module best low-rank approximation of a source."""

    residual: float  # ‖ΔW_q − T(ΔW_X)‖_F
    energy: float  # Σ kept σ² / Σ σ² over all of X's modules
    ranks: tuple[int, ...]  # rank kept in each of X's modules, in X's order (0: q lacks the module)
    source_ranks: tuple[int, ...]  # X's own numerical rank in each module


def truncation_fit(query: LoraWeights, source: LoraWeights, tolerance: float = REL_TOLERANCE) -> TruncationFit:
    """Compare ``query`` with ``T(ΔW_X)``, each of X's modules truncated (by SVD) to q's rank there.

    Ranks are numerical: singular values above ``tolerance × σ₁`` of the module count. X's spectrum comes from a QR
    of its factors (:func:`lol_engine.symmetry.singular_values`' route); ``⟨q, T⟩`` from ``r × k`` Gram blocks.
    """
    ranks = _numerical_ranks(query, tolerance)
    by_key = {_key(m): m for m in query}
    kept_energy = total_energy = inner = 0.0
    kept_ranks, source_ranks = [], []
    for m in source:
        sigma, b_u, a_v = _truncated_factors(m)
        k = min(ranks.get(_key(m), 0), len(sigma))
        total_energy += float(sigma.square().sum())
        kept_energy += float(sigma[:k].square().sum())
        kept_ranks.append(k)
        source_ranks.append(int((sigma > tolerance * sigma[0]).sum()) if sigma[0] > 0 else 0)
        if k > 0:
            q = by_key[_key(m)]
            b_t, a_t = b_u[:, :k] * sigma[:k], a_v[:k]  # (d_out, k), (k, d_in): the best rank-k ΔW
            inner += float(delta_inner(q.a.double(), q.b.double(), a_t, b_t, q.scale, 1.0))
    q_norm2 = float(delta_gram([query])[0, 0])
    residual = math.sqrt(max(q_norm2 - 2.0 * inner + kept_energy, 0.0))
    energy = kept_energy / total_energy if total_energy > 0 else 0.0
    return TruncationFit(residual, energy, tuple(kept_ranks), tuple(source_ranks))


def _tolerance(q_norm: float, noise2: float) -> float:
    return max(REL_TOLERANCE, NOISE_MARGIN * math.sqrt(noise2) / q_norm)


def _pairwise(
    query: LoraWeights, x: LoraWeights, gram: np.ndarray, key: str, name: str, q_noise: float, x_noise: float
) -> Relation | None:
    """same, rescale or truncation of one candidate (``gram``: the 2 × 2 Gram of query and x), or None."""
    q2, h, x2 = float(gram[0, 0]), float(gram[0, 1]), float(gram[1, 1])
    if x2 <= 0:
        return None
    q_norm, x_norm = math.sqrt(q2), math.sqrt(x2)
    tol = _tolerance(x_norm, q_noise**2 + x_noise**2)
    same = math.sqrt(max(q2 - 2 * h + x2, 0.0)) / x_norm
    if same <= tol:
        return Relation("same", (key,), (name,), (1.0,), same, tol)
    c = h / x2
    tol = _tolerance(q_norm, q_noise**2 + c**2 * x_noise**2)
    rescaled = math.sqrt(max(q2 - h * c, 0.0)) / q_norm
    if rescaled <= tol and abs(c - 1) > tol:
        return Relation("rescale", (key,), (name,), (c,), rescaled, tol)
    tol = _tolerance(q_norm, q_noise**2 + x_noise**2)
    if h / (q_norm * x_norm) < MIN_COSINE or not _may_truncate(query, x, q2, h, x2, tol):
        return None
    fit = truncation_fit(query, x, tol)
    lower = any(k < r for k, r in zip(fit.ranks, fit.source_ranks, strict=True))
    if lower and fit.residual / q_norm <= tol:
        return Relation("truncation", (key,), (name,), (1.0,), fit.residual / q_norm, tol, fit.energy, fit.ranks)
    return None


def _may_truncate(query: LoraWeights, x: LoraWeights, q2: float, h: float, x2: float, tol: float) -> bool:
    """Cheap necessary conditions for ``q ≈ T(X)`` before any QR: a rank below X's, and ``⟨q, X⟩ ≈ ‖q‖²``.

    With ``T`` the truncation, ``⟨T, X⟩ = ‖T‖²``; if ``‖q − T‖ ≤ τ‖q‖`` then
    ``|⟨q, X⟩ − ‖q‖²| ≤ τ‖q‖ (2‖q‖ + ‖X − T‖) + O(τ²)`` with ``‖X − T‖² ≈ ‖X‖² − ‖q‖²``; twice that is allowed.
    """
    ranks = _numerical_ranks(query, tol)
    if all(ranks.get(_key(m), 0) >= m.spec.rank for m in x):
        return False
    q_norm = math.sqrt(q2)
    return abs(h - q2) <= 2 * tol * q_norm * (2 * q_norm + math.sqrt(max(x2 - q2, 0.0)))


def _merge(
    query: LoraWeights,
    candidates: Sequence[LoraWeights],
    keys: Sequence[str],
    names: Sequence[str],
    noises: np.ndarray,
    max_terms: int,
) -> Relation | None:
    """The fewest candidates (2 … max_terms) whose least-squares combination fits the query, or None."""
    gram = delta_gram([query, *candidates])
    q2, h, g = gram[0, 0], gram[0, 1:], gram[1:, 1:]
    q_norm = math.sqrt(q2)
    norms = np.sqrt(np.clip(np.diag(g), 1e-300, None))
    q_noise2 = noises[0] ** 2
    for size in range(2, max_terms + 1):
        best: Relation | None = None
        for subset in itertools.combinations(range(len(candidates)), size):
            s = list(subset)
            corr = g[np.ix_(s, s)] / np.outer(norms[s], norms[s])
            if np.linalg.eigvalsh(corr)[0] < 1e-8:  # two candidates (nearly) the same ΔW: weights not identifiable
                continue
            w = np.linalg.solve(g[np.ix_(s, s)], h[s])
            residual = math.sqrt(max(q2 - 2 * float(w @ h[s]) + float(w @ g[np.ix_(s, s)] @ w), 0.0)) / q_norm
            tol = _tolerance(q_norm, q_noise2 + float(np.sum(w**2 * noises[1:][s] ** 2)))
            if residual > tol or np.any(np.abs(w) * norms[s] <= tol * q_norm):  # a negligible term: fewer fit
                continue
            if best is None or residual < best.residual:
                order = sorted(range(size), key=lambda i: -abs(w[i]))
                best = Relation(
                    "merge",
                    tuple(keys[s[i]] for i in order),
                    tuple(names[s[i]] for i in order),
                    tuple(float(w[i]) for i in order),
                    residual,
                    tol,
                )
        if best is not None:
            return best
    return None


def relate(
    query: LoraWeights,
    candidates: Sequence[LoraWeights],
    keys: Sequence[str],
    names: Sequence[str] | None = None,
    max_terms: int = 3,
) -> list[Relation | None]:
    """The relation of ``query`` to each candidate (None where there is none), aligned with ``candidates``.

    Each candidate is checked on its own for *same*, *rescale* and *truncation* (in that order). Only when none
    holds, and some candidate has ΔW cosine ≥ :data:`MIN_COSINE` with the query, is a *merge* of 2 … ``max_terms``
    candidates searched; the merge found is given to each of its terms. DoRA LoRAs get no relation (their update
    needs the base weights). Pass the top-k candidates by ΔW cosine: the cost grows with ``k²``, not the collection.
    """
    names = list(keys) if names is None else list(names)
    if len(keys) != len(candidates) or len(names) != len(candidates):
        raise ValueError(f"need one key and name per candidate: {len(keys)}, {len(names)} for {len(candidates)}")
    out: list[Relation | None] = [None] * len(candidates)
    usable = [i for i, c in enumerate(candidates) if not c.meta.is_dora]
    if query.meta.is_dora or not usable or float(delta_gram([query])[0, 0]) <= 0:
        return out
    query64 = query.to(torch.float64)
    noises = np.array([rounding_noise(query), *(rounding_noise(c) for c in candidates)])
    cosines = np.zeros(len(candidates))
    wide = {i: candidates[i].to(torch.float64) for i in usable}  # converted once: k copies, freed on return
    for i in usable:
        x = wide[i]
        gram = delta_gram([query64, x])
        cosines[i] = gram[0, 1] / math.sqrt(max(gram[0, 0] * gram[1, 1], 1e-300))
        out[i] = _pairwise(query64, x, gram, keys[i], names[i], float(noises[0]), float(noises[i + 1]))
    if any(r is not None for r in out) or len(usable) < 2 or np.max(np.abs(cosines)) < MIN_COSINE:
        return out
    pool = [wide[i] for i in usable]
    found = _merge(
        query64,
        pool,
        [keys[i] for i in usable],
        [names[i] for i in usable],
        noises[[0, *(i + 1 for i in usable)]],
        max_terms,
    )
    if found is not None:
        for i in usable:
            if keys[i] in found.others:
                out[i] = found
    return out
