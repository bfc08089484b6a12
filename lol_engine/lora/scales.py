"""Each module's scale by its format's rules, and the magnitude checks of the scaled update.

Scale rules: an A1111 ``.scale`` key overrides everything; cloneofsimo bakes the scale into ``up``
(1); mlx-lm takes ``lora_parameters.scale`` (default 20); PEFT and every diffusers layout take ``lora_alpha / r``
(rsLoRA ``/ √r``) from ``adapter_config.json`` or the component's ``lora_adapter_metadata``, patterns included;
kohya-style ``alpha`` keys give ``alpha / r`` (0 or missing: ``alpha = r``); with nothing stored the scale is 1.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lol_engine.errors import LoraFormatError
from lol_engine.lora.config import AdapterConfig, MlxAdapterConfig, PeftAdapterConfig
from lol_engine.lora.keys import ModuleKeys, Role
from lol_engine.lora.metadata import Notes
from lol_engine.lora.safe_io import shown
from lol_engine.lora.weights import LoraModule
from lol_engine.spec import LayerSpec

__all__ = ["MAX_MAGNITUDE", "MLX_DEFAULT_SCALE", "check_magnitudes", "config_for", "module_scale"]

MLX_DEFAULT_SCALE = 20.0  # mlx-lm's LoRALinear default and CONFIG_DEFAULTS["lora_parameters"]["scale"]
MAX_MAGNITUDE = 1e15  # |factor entries|, |scale| and ‖ΔW‖_F: float32 Grams and spectra stay finite below it


def config_for(name: str, configs: dict[str, AdapterConfig]) -> tuple[AdapterConfig | None, str]:
    """The config governing module ``name`` and the name relative to that config's model.

    A diffusers file's metadata configures each component on its own: a text-encoder module never borrows the
    UNet's ``r`` or ``lora_alpha``.
    """
    if "" in configs:
        return configs[""], name
    component, _, rest = name.partition(".")
    if component.startswith("text_encoder"):
        return configs.get(component), rest
    for denoiser in ("unet", "transformer"):
        if denoiser in configs:
            return configs[denoiser], name
    return None, name


def module_scale(
    group: ModuleKeys,
    spec: LayerSpec,
    side: dict[str, float],
    configs: dict[str, AdapterConfig],
    notes: Notes,
) -> tuple[float | None, float]:
    """``(alpha, scale)`` by the format's rules (see the module docstring)."""
    rank = spec.rank
    if Role.SCALE in group.keys:  # A1111: an explicit per-module scale overrides alpha / r
        return None, side[group.keys[Role.SCALE]]
    if group.naming == "cloneofsimo":  # realize_as_lora multiplied up by the layer's scale before saving
        return None, 1.0
    config, relative = config_for(spec.name, configs)
    if group.naming == "mlx":
        return _mlx_scale(config, rank, notes)
    if isinstance(config, PeftAdapterConfig) and group.naming in ("ab", "diffusers"):
        configured_rank, _ = config.rank_alpha(relative)
        if configured_rank != rank:
            notes.module(f"the config says r={configured_rank} but the factors have rank {rank}", spec.name)
        return config.scale(relative, rank)
    if Role.ALPHA in group.keys:
        alpha = side[group.keys[Role.ALPHA]]
        alpha = float(rank) if alpha == 0 else alpha  # kohya: alpha 0 or missing means alpha = r
        return alpha, alpha / rank
    return float(rank), 1.0


def _mlx_scale(config: AdapterConfig | None, rank: int, notes: Notes) -> tuple[float | None, float]:
    if not isinstance(config, MlxAdapterConfig):
        notes.lines.append(
            f"no mlx-lm adapter_config.json: assumed mlx-lm's default scale {MLX_DEFAULT_SCALE:g} for every module"
        )
        return None, MLX_DEFAULT_SCALE
    if config.rank != rank:
        notes.lines.append(f"adapter_config.json says rank {config.rank} but the factors have rank {rank}")
    return config.alpha, config.scale


def _chunks(modules: tuple[LoraModule, ...], max_elements: int = 2**24) -> Iterator[list[LoraModule]]:
    """Modules of one shape, in batches of at most ``max_elements`` factor entries."""
    buckets: dict[tuple[int, int, int], list[LoraModule]] = {}
    for m in modules:
        buckets.setdefault((m.spec.rank, m.spec.d_out, m.spec.d_in), []).append(m)
    for bucket in buckets.values():
        size = bucket[0].a.numel() + bucket[0].b.numel()
        step = max(1, max_elements // size)
        for start in range(0, len(bucket), step):
            yield bucket[start : start + step]


def check_magnitudes(modules: tuple[LoraModule, ...], file: str) -> None:
    """Refuse NaN/Inf factors, and updates so large that float32 work on them would overflow.

    Batched over modules of one shape. ``‖s·B A‖_F`` is computed from Grams of the factors divided by their largest
    entries, so the check itself cannot overflow whatever the file holds.
    """
    for chunk in _chunks(modules):
        a = torch.stack([m.a for m in chunk])  # (N, r, d_in)
        b = torch.stack([m.b for m in chunk])  # (N, d_out, r)
        a_max = a.abs().amax((1, 2))  # (N,): NaN propagates, inf stays inf
        b_max = b.abs().amax((1, 2))
        scale = torch.tensor([abs(m.scale) for m in chunk], dtype=torch.float64)
        non_finite = torch.nonzero(~torch.isfinite(a_max) | ~torch.isfinite(b_max)).flatten().tolist()
        if non_finite:
            i = non_finite[0]
            which, t = ("A", a[i]) if not torch.isfinite(a_max[i]) else ("B", b[i])
            bad = int((~torch.isfinite(t)).sum())
            raise LoraFormatError(f"{file}: module {shown(chunk[i].name)}: factor {which} has {bad} NaN/Inf value(s)")
        a_unit = a / a_max.clamp_min(1e-30)[:, None, None]
        b_unit = b / b_max.clamp_min(1e-30)[:, None, None]
        unit = ((b_unit.mT @ b_unit) * (a_unit @ a_unit.mT)).sum((1, 2)).clamp_min(0).sqrt()  # ‖B A‖ / (max|A| max|B|)
        norm = unit.double() * a_max.double() * b_max.double() * scale
        too_big = (a_max.double() > MAX_MAGNITUDE) | (b_max.double() > MAX_MAGNITUDE) | (norm > MAX_MAGNITUDE)
        if too_big.any():
            i = int(torch.nonzero(too_big)[0])
            raise LoraFormatError(
                f"{file}: module {shown(chunk[i].name)}: factor entries up to {max(a_max[i], b_max[i]):.3g} and "
                f"‖ΔW‖_F = {norm[i]:.3g}: too large for float32 arithmetic (it would overflow); the limit is 1e15"
            )
