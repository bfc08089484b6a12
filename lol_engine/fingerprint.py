"""An architecture-agnostic, GL-invariant fingerprint of a LoRA: spectral summaries per module role.

Every LoRA, whatever its base model, maps to the same :data:`FINGERPRINT_NAMES`-long vector, so LoRAs of different
bases can share one map. Each entry is a function of the spectra of the ``ΔW_i`` and of module names only, hence
invariant under every ``(A_i, B_i) ↦ (G_i A_i, B_i G_i⁻¹)``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from lol_engine.lora.weights import LoraWeights
from lol_engine.spec import LayerSpec, natural_key
from lol_engine.symmetry import many_singular_values

__all__ = ["FINGERPRINT_NAMES", "ROLES", "fingerprint", "fingerprints", "module_role"]

# (role, pattern on the last name components); the first match wins. Conv layers with a kernel are "conv".
_ROLE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("qkv", r"(qkv|linear1)$"),
    ("q", r"(q_proj|to_q|query|\.q|attn\.q)$"),
    ("k", r"(k_proj|to_k|key|\.k)$"),
    ("v", r"(v_proj|to_v|value|\.v)$"),
    ("attn_out", r"(o_proj|out_proj|to_out\.0|attn\.proj|attention\.output\.dense|\.o|dense)$"),
    (
        "mlp",
        r"(mlp.*|ff\.net.*|fc[12]|gate_proj|up_proj|down_proj|intermediate\.dense|output\.dense|linear2|wi(_[01])?|wo)$",
    ),
)
ROLES: tuple[str, ...] = ("q", "k", "v", "qkv", "attn_out", "mlp", "conv", "other")
_TOP = 4  # normalised singular values σ_2/σ_1 … σ_5/σ_1 kept per role
_PER_ROLE = (
    "share_modules",
    "share_energy",
    "mean_log_norm",
    "std_log_norm",
    "mean_log_effective_rank",
    "mean_top1_energy",
    "mean_log_stable_rank",
    *(f"mean_sigma{i + 2}_over_sigma1" for i in range(_TOP)),
    "energy_weighted_depth",
)
_GLOBAL = ("log_n_modules", "log_total_norm", "log_effective_rank_all", "top1_energy_all")
FINGERPRINT_NAMES: tuple[str, ...] = _GLOBAL + tuple(f"{role}.{feat}" for role in ROLES for feat in _PER_ROLE)


def module_role(spec: LayerSpec) -> str:
    """The role of a module, from its name and kind: one of :data:`ROLES`.

    >>> module_role(LayerSpec("model.layers.0.self_attn.q_proj", 8, 8, 2))
    'q'
    >>> module_role(LayerSpec("down_blocks.0.resnets.0.conv1", 8, 72, 2, "conv", (8, 8, 3, 3)))
    'conv'
    """
    return _role(spec.name, spec.kind == "conv" and math.prod(spec.orig_shape[2:]) > 1)


@functools.lru_cache(maxsize=2**16)
def _role(name: str, kernel_conv: bool) -> str:
    """:func:`module_role` by name; cached, since a collection's LoRAs of one base repeat the same names."""
    if kernel_conv:
        return "conv"
    for role, pattern in _COMPILED_ROLES:
        if pattern.search(name):
            return role
    return "other"


_COMPILED_ROLES = tuple((role, re.compile(pattern)) for role, pattern in _ROLE_PATTERNS)


def _spectral_stats(sigma: np.ndarray) -> np.ndarray:
    """Per row of ``sigma: (M, r)`` (descending, zero-padded): log ‖ΔW‖, log effective rank, top-1 energy, log stable
    rank and σ_2..σ_5 over σ_1, as ``(M, 4 + TOP)``; all zeros for a zero spectrum."""
    energy = np.square(sigma)  # (M, r)
    total = energy.sum(1)  # (M,)
    live = total > 0
    out = np.zeros((len(sigma), 4 + _TOP))
    if not live.any():
        return out
    e, t, s = energy[live], total[live], sigma[live]
    p = e / t[:, None]
    out[live, 0] = 0.5 * np.log(t)
    out[live, 1] = -(p * np.log(np.maximum(p, 1e-300))).sum(1)
    out[live, 2] = p[:, 0]
    out[live, 3] = np.log(t / e[:, 0])
    tail = s[:, 1 : 1 + _TOP] / s[:, :1]  # (M_live, ≤ TOP): zero padding gives zero ratios, as for a short rank
    out[np.flatnonzero(live)[:, None], 4 + np.arange(tail.shape[1])] = tail
    return out


def fingerprint(lora: LoraWeights) -> Tensor:
    """The fixed-length GL-invariant fingerprint (float64, length ``len(FINGERPRINT_NAMES)``).

    Vectorised over modules: one spectrum matrix, one stats matrix, one pass per role.

    >>> lora = LoraWeights.from_factors({"layers.0.q_proj": (torch.randn(2, 6), torch.randn(5, 2))})
    >>> fingerprint(lora).shape == (len(FINGERPRINT_NAMES),)
    True
    """
    return fingerprints([lora])[0]


def fingerprints(loras: Sequence[LoraWeights]) -> list[Tensor]:
    """:func:`fingerprint` of many LoRAs; their spectra come from one batched call per module shape across them all.

    LoRAs of one layout (the same modules, kinds and ranks in the same order: a collection of one base) are
    fingerprinted together, as arrays over the LoRAs, instead of one LoRA at a time.
    """
    spectra = many_singular_values(loras)
    layouts: dict[tuple[tuple[str, str, tuple[int, ...], int], ...], list[int]] = {}
    for i, lora in enumerate(loras):
        key = tuple((m.name, m.spec.kind, m.spec.orig_shape, m.spec.rank) for m in lora)
        layouts.setdefault(key, []).append(i)
    out: list[Tensor | None] = [None] * len(loras)
    for members in layouts.values():
        rows = _layout_fingerprints(loras[members[0]], [spectra[i] for i in members])  # (n, len(NAMES))
        for i, row in zip(members, torch.from_numpy(rows), strict=True):
            out[i] = row
    return [fp for fp in out if fp is not None]


def _layout_fingerprints(lora: LoraWeights, spectra: Sequence[dict[str, Tensor]]) -> np.ndarray:
    """Fingerprints ``(n, len(FINGERPRINT_NAMES))`` of ``n`` LoRAs laid out as ``lora``, from their spectra."""
    n, n_modules = len(spectra), len(lora)
    sigma = np.zeros((n, n_modules, max(m.spec.rank for m in lora)))  # (n, M, r_max), zero-padded
    for j, m in enumerate(lora):
        column = torch.stack([s[m.name].detach() for s in spectra]).cpu().numpy()  # (n, r_j)
        sigma[:, j, : column.shape[1]] = column
    stats = _spectral_stats(sigma.reshape(n * n_modules, -1)).reshape(n, n_modules, -1)  # (n, M, 4 + TOP)
    energies = np.square(sigma).sum(2)  # (n, M)
    total = energies.sum(1)  # (n,)
    overall = _spectral_stats(np.sort(sigma.reshape(n, -1), axis=1)[:, ::-1])  # (n, 4 + TOP)
    live = total > 0
    columns = [
        np.full(n, math.log(n_modules)),
        np.where(live, 0.5 * np.log(np.where(live, total, 1.0)), 0.0),
        overall[:, 1],
        overall[:, 2],
    ]
    order = sorted(range(n_modules), key=lambda j: natural_key(lora.modules[j].name))
    roles = np.array([module_role(lora.modules[j].spec) for j in order])
    for role in ROLES:
        members = np.asarray(order, dtype=np.int64)[roles == role]
        columns += _role_columns(stats[:, members], energies[:, members], n_modules, total)
    return np.stack(columns, axis=1)


def _role_columns(block: np.ndarray, energy: np.ndarray, n_modules: int, total: np.ndarray) -> list[np.ndarray]:
    """The :data:`_PER_ROLE` features of one role's modules for ``n`` LoRAs: ``block: (n, n_role, 4 + TOP)`` and
    ``energy: (n, n_role)`` in name order, ``total: (n,)`` the LoRAs' whole energies."""
    n, n_role = energy.shape
    if not n_role:
        return [np.zeros(n)] * len(_PER_ROLE)
    depth = np.linspace(0.0, 1.0, n_role) if n_role > 1 else np.zeros(1)
    energy_sum = energy.sum(1)  # (n,)
    some = energy_sum > 0
    weighted = np.where(some, (energy * depth).sum(1) / np.where(some, energy_sum, 1.0), 0.0)
    share = np.where(total > 0, energy_sum / np.where(total > 0, total, 1.0), 0.0)
    return [
        np.full(n, n_role / n_modules),
        share,
        block[:, :, 0].mean(1),
        block[:, :, 0].std(1),
        block[:, :, 1].mean(1),
        block[:, :, 2].mean(1),
        block[:, :, 3].mean(1),
        *block[:, :, 4:].mean(1).T,
        weighted,
    ]
