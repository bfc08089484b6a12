"""An architecture-agnostic, GL-invariant fingerprint of a LoRA: spectral summaries per module role.

Every LoRA, whatever its base model, maps to the same :data:`FINGERPRINT_NAMES`-long vector, so LoRAs of different
bases can share one map. Each entry is a function of the spectra of the ``ΔW_i`` and of module names only, hence
invariant under every ``(A_i, B_i) ↦ (G_i A_i, B_i G_i⁻¹)``.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from lol_engine.lora.weights import LoraWeights
from lol_engine.spec import LayerSpec, natural_key
from lol_engine.symmetry import lora_singular_values

__all__ = ["FINGERPRINT_NAMES", "ROLES", "fingerprint", "module_role"]

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
    if spec.kind == "conv" and math.prod(spec.orig_shape[2:]) > 1:
        return "conv"
    for role, pattern in _ROLE_PATTERNS:
        if re.search(pattern, spec.name):
            return role
    return "other"


def _spectral_stats(sigma: Tensor) -> Tensor:
    """(log ‖ΔW‖, log effective rank, top-1 energy, log stable rank, σ_2..σ_5 over σ_1) of one spectrum."""
    energy = sigma.square()
    total = energy.sum()
    if total <= 0:
        return torch.zeros(4 + _TOP, dtype=sigma.dtype)
    p = energy / total
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()
    ratios = torch.zeros(_TOP, dtype=sigma.dtype)
    tail = sigma[1 : 1 + _TOP] / sigma[0]
    ratios[: tail.numel()] = tail
    return torch.cat([torch.stack([0.5 * torch.log(total), entropy, p[0], torch.log(total / energy[0])]), ratios])


def fingerprint(lora: LoraWeights) -> Tensor:
    """The fixed-length GL-invariant fingerprint (float64, length ``len(FINGERPRINT_NAMES)``).

    >>> lora = LoraWeights.from_factors({"layers.0.q_proj": (torch.randn(2, 6), torch.randn(5, 2))})
    >>> fingerprint(lora).shape == (len(FINGERPRINT_NAMES),)
    True
    """
    spectra = {name: s.to(torch.float64).cpu() for name, s in lora_singular_values(lora).items()}
    roles = {m.name: module_role(m.spec) for m in lora}
    stats = {name: _spectral_stats(s) for name, s in spectra.items()}
    energies = {name: float(s.square().sum()) for name, s in spectra.items()}
    total_energy = sum(energies.values())
    all_sigma = torch.sort(torch.cat(list(spectra.values())), descending=True).values
    out = [
        math.log(len(lora)),
        0.5 * math.log(total_energy) if total_energy > 0 else 0.0,
        float(_spectral_stats(all_sigma)[1]),
        float(_spectral_stats(all_sigma)[2]),
    ]
    for role in ROLES:
        names = sorted((n for n in spectra if roles[n] == role), key=natural_key)
        out += _role_features(names, stats, energies, len(lora), total_energy)
    return torch.tensor(out, dtype=torch.float64)


def _role_features(
    names: list[str], stats: dict[str, Tensor], energies: dict[str, float], n_modules: int, total_energy: float
) -> list[float]:
    if not names:
        return [0.0] * len(_PER_ROLE)
    block = torch.stack([stats[n] for n in names])  # (n_role, 4 + TOP)
    energy = torch.tensor([energies[n] for n in names], dtype=torch.float64)
    depth = (
        torch.linspace(0.0, 1.0, len(names), dtype=torch.float64)
        if len(names) > 1
        else torch.zeros(1, dtype=torch.float64)
    )
    weighted_depth = float((energy * depth).sum() / energy.sum()) if energy.sum() > 0 else 0.0
    return [
        len(names) / n_modules,
        float(energy.sum()) / total_energy if total_energy > 0 else 0.0,
        float(block[:, 0].mean()),
        float(block[:, 0].std(unbiased=False)),
        float(block[:, 1].mean()),
        float(block[:, 2].mean()),
        float(block[:, 3].mean()),
        *block[:, 4:].mean(0).tolist(),
        weighted_depth,
    ]
