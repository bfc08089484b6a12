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


def _padded_spectra(lora: LoraWeights, spectra: dict[str, Tensor]) -> np.ndarray:
    """Singular values of every module's scaled ΔW as ``(M, max rank)`` float64, zero-padded, in module order."""
    out = np.zeros((len(lora), max(m.spec.rank for m in lora)))
    for i, m in enumerate(lora):
        sigma = spectra[m.name].detach().cpu().numpy()
        out[i, : len(sigma)] = sigma
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
    """:func:`fingerprint` of many LoRAs; their spectra come from one batched QR per module shape across them all."""
    return [_fingerprint(lora, spectra) for lora, spectra in zip(loras, many_singular_values(loras), strict=True)]


def _fingerprint(lora: LoraWeights, spectra: dict[str, Tensor]) -> Tensor:
    sigma = _padded_spectra(lora, spectra)  # (M, r_max)
    stats = _spectral_stats(sigma)  # (M, 4 + TOP)
    energies = np.square(sigma).sum(1)  # (M,)
    total_energy = float(energies.sum())
    overall = _spectral_stats(np.sort(sigma.reshape(1, -1), axis=1)[:, ::-1])[0]
    out = [
        math.log(len(lora)),
        0.5 * math.log(total_energy) if total_energy > 0 else 0.0,
        float(overall[1]),
        float(overall[2]),
    ]
    order = sorted(range(len(lora)), key=lambda i: natural_key(lora.modules[i].name))
    roles = np.array([module_role(lora.modules[i].spec) for i in order])
    for role in ROLES:
        members = np.asarray(order)[roles == role]
        out += _role_features(stats[members], energies[members], len(lora), total_energy)
    return torch.tensor(out, dtype=torch.float64)


def _role_features(block: np.ndarray, energy: np.ndarray, n_modules: int, total_energy: float) -> list[float]:
    """The :data:`_PER_ROLE` features of one role's modules, ``block: (n_role, 4 + TOP)`` in name order."""
    if not len(block):
        return [0.0] * len(_PER_ROLE)
    depth = np.linspace(0.0, 1.0, len(block)) if len(block) > 1 else np.zeros(1)
    energy_sum = float(energy.sum())
    weighted_depth = float((energy * depth).sum() / energy_sum) if energy_sum > 0 else 0.0
    return [
        len(block) / n_modules,
        energy_sum / total_energy if total_energy > 0 else 0.0,
        float(block[:, 0].mean()),
        float(block[:, 0].std()),
        float(block[:, 1].mean()),
        float(block[:, 2].mean()),
        float(block[:, 3].mean()),
        *block[:, 4:].mean(0).tolist(),
        weighted_depth,
    ]
