"""``load_lora`` and ``inspect_lora``: any supported LoRA file or PEFT folder to the canonical form.

Pipeline: locate the file (and ``adapter_config.json``) → validate the header (:mod:`safe_io`) → group keys into
modules (:mod:`keys`) → canonical names → shape checks → scales → read factors → finiteness checks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lol_engine.errors import LoraFormatError
from lol_engine.lora._conventions import ModuleKind
from lol_engine.lora.config import PeftAdapterConfig, diffusers_component_configs, read_adapter_config
from lol_engine.lora.family import detect_family
from lol_engine.lora.keys import ModuleKeys, Role, canonical_name, group_keys
from lol_engine.lora.safe_io import FLOAT_DTYPES, ReadLimits, SafetensorsHeader, file_sha256, read_header, read_tensors
from lol_engine.lora.weights import LoraMetadata, LoraModule, LoraWeights
from lol_engine.spec import LayerSpec, LoraSpec, natural_key

__all__ = ["LoraSummary", "inspect_lora", "load_lora", "locate_lora"]

_ADAPTER_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")
_PICKLE_ADAPTERS = ("adapter_model.bin", "pytorch_lora_weights.bin")


@dataclass(frozen=True)
class _Plan:
    """One module as the header describes it, before factor data is read."""

    spec: LayerSpec
    keys: ModuleKeys
    alpha: float | None
    scale: float


@dataclass(frozen=True, eq=False)
class LoraSummary:
    """What :func:`inspect_lora` learns without reading the factors: spec, scales and metadata."""

    spec: LoraSpec
    scales: tuple[float, ...]
    alphas: tuple[float | None, ...]
    meta: LoraMetadata


def locate_lora(path: str | os.PathLike[str]) -> tuple[Path, Path | None]:
    """Resolve a file or a PEFT/diffusers folder to ``(safetensors file, adapter_config.json or None)``."""
    path = Path(path)
    if not path.exists():
        raise LoraFormatError(f"{path}: no such file or folder")
    if path.is_dir():
        found = [path / name for name in _ADAPTER_FILES if (path / name).is_file()]
        if not found:
            found = sorted(path.glob("*.safetensors"))
        if not found:
            pickles = [name for name in _PICKLE_ADAPTERS if (path / name).exists()]
            hint = f"; {pickles[0]} is a pickle and is never loaded" if pickles else ""
            raise LoraFormatError(f"{path}: folder holds no .safetensors adapter{hint}")
        if len(found) > 1 and found[0].name not in _ADAPTER_FILES:
            raise LoraFormatError(f"{path}: folder holds {len(found)} .safetensors files; name the one to read")
        path = found[0]
    config = path.parent / "adapter_config.json"
    return path, (config if config.is_file() else None)


def inspect_lora(
    path: str | os.PathLike[str], *, limits: ReadLimits | None = None, config: PeftAdapterConfig | None = None
) -> LoraSummary:
    """Spec, scales and metadata of a LoRA, reading the header and the 0-dim alpha tensors only."""
    plans, meta, _ = _prepare(path, limits or ReadLimits(), config)
    return LoraSummary(
        LoraSpec(tuple(p.spec for p in plans)), tuple(p.scale for p in plans), tuple(p.alpha for p in plans), meta
    )


def load_lora(
    path: str | os.PathLike[str], *, limits: ReadLimits | None = None, config: PeftAdapterConfig | None = None
) -> LoraWeights:
    """Read a LoRA file or folder into :class:`LoraWeights` (float32, CPU), or raise :class:`LoraFormatError`.

    ``config`` overrides the ``adapter_config.json`` found next to the file.
    """
    plans, meta, header = _prepare(path, limits or ReadLimits(), config)
    wanted = [
        key for p in plans for role, key in p.keys.keys.items() if role in (Role.A, Role.B, Role.MID, Role.MAGNITUDE)
    ]
    tensors = read_tensors(header, wanted)
    modules = tuple(_build_module(p, tensors, header.path.name) for p in plans)
    return LoraWeights(modules, meta)


def _prepare(
    path: str | os.PathLike[str], limits: ReadLimits, config: PeftAdapterConfig | None
) -> tuple[list[_Plan], LoraMetadata, SafetensorsHeader]:
    file, config_path = locate_lora(path)
    if config is None and config_path is not None:
        config = read_adapter_config(config_path, limits)
    header = read_header(file, limits)
    where = file.name
    groups, _ = group_keys(header.tensors, where)
    _refuse_variants(groups, where)
    low_rank = {stem: g for stem, g in groups.items() if Role.A in g.keys or Role.B in g.keys}
    if not low_rank:
        sample = ", ".join(sorted(header.tensors)[:3]) or "none"
        raise LoraFormatError(f"{where}: no LoRA modules found (unknown key layout; first keys: {sample})")
    warnings = list(header.warnings)
    side = _read_side_tensors(header, low_rank.values())
    names = _names(low_rank, warnings, where)
    configs = {"": config} if config is not None else diffusers_component_configs(header.metadata, where, limits)
    plans = [_plan(group, names[stem], header, side, configs, limits, warnings) for stem, group in low_rank.items()]
    plans.sort(key=lambda p: natural_key(p.spec.name))  # the same modules always come in the same order
    meta = _metadata(file, header, plans, config, warnings)
    return plans, meta, header


def _refuse_variants(groups: dict[str, ModuleKeys], where: str) -> None:
    variants: dict[str, int] = {}
    for group in groups.values():
        for variant in group.variants:
            variants[variant] = variants.get(variant, 0) + 1
    dense_only = {"full (dense diff)", "norm"}
    has_low_rank = any(Role.A in g.keys for g in groups.values())
    refused = {v: n for v, n in variants.items() if v not in dense_only or not has_low_rank}
    if refused:
        found = ", ".join(f"{v} ({n} module{'s' * (n > 1)})" for v, n in sorted(refused.items()))
        raise LoraFormatError(
            f"{where}: not a low-rank B·A adapter: found {found}; only LoRA, LoCon and DoRA files are read"
        )
    for group in groups.values():  # dense norm/diff parts beside LoRA modules: reported, not read
        if group.variants and Role.A not in group.keys:
            group.keys.clear()


def _read_side_tensors(header: SafetensorsHeader, groups: Iterable[ModuleKeys]) -> dict[str, float]:
    keys = [g.keys[role] for g in groups for role in (Role.ALPHA, Role.SCALE) if role in g.keys]
    for key in keys:
        if len(header.tensors[key].shape) > 1 or (header.tensors[key].shape and header.tensors[key].shape[0] != 1):
            raise LoraFormatError(
                f"{header.path.name}: {key!r} should be a scalar, has shape {header.tensors[key].shape}"
            )
    values = read_tensors(header, keys) if keys else {}
    out = {}
    for key, tensor in values.items():
        value = float(tensor.reshape(-1)[0])
        if not torch.isfinite(tensor).all():
            raise LoraFormatError(f"{header.path.name}: {key!r} is not finite ({value})")
        out[key] = value
    return out


def _names(groups: dict[str, ModuleKeys], warnings: list[str], where: str) -> dict[str, tuple[str, str]]:
    """``{stem: (canonical name, source)}``; refuses two stems that resolve to one module."""
    out: dict[str, tuple[str, str]] = {}
    seen: dict[str, str] = {}
    unresolved = []
    for stem, group in groups.items():
        resolved = canonical_name(stem, group.naming)
        if resolved.name in seen:
            raise LoraFormatError(f"{where}: {stem!r} and {seen[resolved.name]!r} both name module {resolved.name!r}")
        seen[resolved.name] = stem
        if resolved.note:
            unresolved.append(stem)
        out[stem] = (resolved.name, f"{group.naming}:{resolved.source}")
    if unresolved:
        warnings.append(
            f"{len(unresolved)} kohya module name(s) are in no known vocabulary and were kept as written "
            f"(first: {unresolved[0]!r})"
        )
    return out


def _config_for(name: str, configs: dict[str, PeftAdapterConfig]) -> tuple[PeftAdapterConfig | None, str]:
    """The config governing module ``name`` and the name relative to that config's model."""
    if "" in configs:
        return configs[""], name
    component, _, rest = name.partition(".")
    if component in configs and component.startswith("text_encoder"):
        return configs[component], rest
    for denoiser in ("unet", "transformer"):
        if denoiser in configs and not name.startswith("text_encoder"):
            return configs[denoiser], name
    return None, name


def _plan(
    group: ModuleKeys,
    resolved: tuple[str, str],
    header: SafetensorsHeader,
    side: dict[str, float],
    configs: dict[str, PeftAdapterConfig],
    limits: ReadLimits,
    warnings: list[str],
) -> _Plan:
    name, source = resolved
    spec = _spec(group, name, header, limits, warnings)
    alpha, scale = _scale(group, spec, side, configs, warnings)
    return _Plan(spec, replace(group, naming=source), alpha, scale)


def _spec(
    group: ModuleKeys, name: str, header: SafetensorsHeader, limits: ReadLimits, warnings: list[str]
) -> LayerSpec:
    where = f"{header.path.name}: module {group.stem!r}"
    for role, other in ((Role.A, Role.B), (Role.B, Role.A)):
        if role not in group.keys:
            raise LoraFormatError(f"{where} has {other.value} ({group.keys[other]!r}) but no {role.value} factor")
    for role in (Role.A, Role.B, Role.MID, Role.MAGNITUDE):
        if role in group.keys and header.tensors[group.keys[role]].dtype not in FLOAT_DTYPES:
            info = header.tensors[group.keys[role]]
            raise LoraFormatError(
                f"{where}: factor {info.name!r} has integer dtype {info.dtype}; factors must be floats"
            )
    a_shape = header.tensors[group.keys[Role.A]].shape
    b_shape = header.tensors[group.keys[Role.B]].shape
    if len(a_shape) < 2 or len(b_shape) < 2:
        raise LoraFormatError(f"{where}: factors must have at least 2 axes, got A {a_shape} and B {b_shape}")
    rank, d_out = a_shape[0], b_shape[0]
    if b_shape[1] != rank:
        raise LoraFormatError(f"{where}: rank mismatch: A {a_shape} has rank {rank} but B {b_shape} has {b_shape[1]}")
    if any(d != 1 for d in b_shape[2:]):
        raise LoraFormatError(f"{where}: B {b_shape} should be (d_out, r, 1, …, 1)")
    if not 1 <= rank <= limits.max_rank:
        raise LoraFormatError(f"{where}: rank {rank} is outside 1..{limits.max_rank}")
    if group.embedding or len(a_shape) == 2:
        if len(b_shape) != 2 or len(a_shape) != 2:
            raise LoraFormatError(f"{where}: A {a_shape} and B {b_shape} mix linear and conv shapes")
        if Role.MID in group.keys:
            mid = header.tensors[group.keys[Role.MID]].shape
            raise LoraFormatError(f"{where}: Tucker lora_mid {mid} next to linear factors A {a_shape} (conv only)")
        kind: ModuleKind = "embedding" if group.embedding else "linear"
        orig: tuple[int, ...] = (a_shape[1], d_out) if group.embedding else (d_out, a_shape[1])
        spec = LayerSpec(name, d_out, a_shape[1], rank, kind, orig)
    else:
        kernel = _conv_kernel(group, header, a_shape, b_shape, where)
        orig = (d_out, a_shape[1], *kernel)
        spec = LayerSpec(name, d_out, a_shape[1] * _prod(kernel), rank, "conv", orig)
    if rank > min(spec.d_out, spec.d_in):
        warnings.append(f"module {name}: rank {rank} exceeds min(d_out, d_in) = {min(spec.d_out, spec.d_in)}")
    return spec


def _conv_kernel(
    group: ModuleKeys, header: SafetensorsHeader, a_shape: tuple[int, ...], b_shape: tuple[int, ...], where: str
) -> tuple[int, ...]:
    if len(b_shape) != len(a_shape):
        raise LoraFormatError(f"{where}: conv factors disagree on axes: A {a_shape}, B {b_shape}")
    if Role.MID not in group.keys:
        return a_shape[2:]
    mid = header.tensors[group.keys[Role.MID]].shape
    rank = a_shape[0]
    if len(mid) != len(a_shape) or mid[:2] != (rank, rank) or any(d != 1 for d in a_shape[2:]):
        raise LoraFormatError(
            f"{where}: Tucker lora_mid {mid} does not fit down {a_shape} (expected ({rank}, {rank}, k…))"
        )
    return mid[2:]


def _prod(values: tuple[int, ...]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _scale(
    group: ModuleKeys,
    spec: LayerSpec,
    side: dict[str, float],
    configs: dict[str, PeftAdapterConfig],
    warnings: list[str],
) -> tuple[float | None, float]:
    """``(alpha, scale)`` by the format's rules (FORMATS.md §10)."""
    rank = spec.rank
    if Role.SCALE in group.keys:  # A1111: an explicit per-module scale overrides alpha / r
        return None, side[group.keys[Role.SCALE]]
    config, relative = _config_for(spec.name, configs)
    if config is not None and group.naming == "ab":
        configured_rank, _ = config.rank_alpha(relative)
        if configured_rank != rank:
            warnings.append(f"module {spec.name}: config says r={configured_rank} but the factors have rank {rank}")
        return config.scale(relative, rank)
    if Role.ALPHA in group.keys:
        alpha = side[group.keys[Role.ALPHA]]
        alpha = float(rank) if alpha == 0 else alpha  # kohya: alpha 0 or missing means alpha = r
        return alpha, alpha / rank
    return float(rank), 1.0


def _build_module(plan: _Plan, tensors: dict[str, Tensor], file: str) -> LoraModule:
    keys, spec = plan.keys.keys, plan.spec
    a, b = tensors[keys[Role.A]], tensors[keys[Role.B]]
    if Role.MID in keys:  # Tucker: A'[a, c, k…] = Σ_b mid[a, b, k…] · down[b, c]
        a = torch.einsum("ab...,bc->ac...", tensors[keys[Role.MID]], a.reshape(spec.rank, -1))
    a = a.reshape(spec.rank, spec.d_in)  # (r, d_in)
    b = b.reshape(spec.d_out, spec.rank)  # (d_out, r)
    for role, tensor in (("A", a), ("B", b)):
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise LoraFormatError(f"{file}: module {spec.name!r}: factor {role} has {bad} NaN/Inf value(s)")
    magnitude, axis = _magnitude(plan, tensors, file)
    return LoraModule(spec, a.contiguous(), b.contiguous(), plan.scale, plan.alpha, magnitude, axis)


def _magnitude(plan: _Plan, tensors: dict[str, Tensor], file: str) -> tuple[Tensor | None, Any]:
    key = plan.keys.keys.get(Role.MAGNITUDE)
    if key is None:
        return None, None
    magnitude = tensors[key]
    spec = plan.spec
    if not torch.isfinite(magnitude).all():
        raise LoraFormatError(f"{file}: module {spec.name!r}: DoRA magnitude has NaN/Inf values")
    in_channels = spec.orig_shape[1] if spec.kind == "conv" else spec.d_in
    if magnitude.numel() == spec.d_out and magnitude.shape[0] == spec.d_out:
        return magnitude.reshape(-1), "out"
    if magnitude.numel() == in_channels:
        return magnitude.reshape(-1), "in"
    raise LoraFormatError(
        f"{file}: module {spec.name!r}: DoRA magnitude {tuple(magnitude.shape)} fits neither d_out {spec.d_out} "
        f"nor d_in {in_channels}"
    )


def _format(plans: list[_Plan], kohya: dict[str, Any]) -> str:
    lycoris = "lycoris" in str(kohya.get("ss_network_module", "")) or any(Role.MID in p.keys.keys for p in plans)
    formats = set()
    for plan in plans:
        naming, _, source = plan.keys.naming.partition(":")
        if naming == "kohya" or source == "kohya":
            formats.add("lycoris" if lycoris else "kohya")
        elif naming == "diffusers":
            formats.add("diffusers")
        else:
            formats.add({"diffusers": "diffusers-peft", "comfyui": "comfyui"}.get(source, "peft"))
    if formats == {"diffusers", "diffusers-peft"}:  # diffusers' own converter leaves non-attention keys as lora_A/B
        return "diffusers"
    return "+".join(sorted(formats))


def _decode_kohya(value: str) -> Any:
    """kohya stores every value as a string: "None", "True", numbers and JSON structures are decoded."""
    if value in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[value]
    if value[:1] in "{[" or value.lstrip("-").replace(".", "", 1).isdigit():
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _metadata(
    file: Path,
    header: SafetensorsHeader,
    plans: list[_Plan],
    config: PeftAdapterConfig | None,
    warnings: list[str],
) -> LoraMetadata:
    kohya = {k: _decode_kohya(v) for k, v in header.metadata.items() if k.startswith("ss_")}
    modelspec = {k.removeprefix("modelspec."): v for k, v in header.metadata.items() if k.startswith("modelspec.")}
    raw_config = dict(config.raw) if config else {}
    family, evidence, family_warnings = detect_family(
        [p.spec for p in plans], kohya, modelspec, raw_config, header.metadata
    )
    fmt = _format(plans, kohya)
    used = {key for p in plans for role, key in p.keys.keys.items() if role is not Role.BIAS}
    skipped = tuple(k for k in header.tensors if k not in used)
    warnings = warnings + family_warnings
    if "+" in fmt:
        warnings.append(f"modules use more than one naming convention ({fmt})")
    if any(Role.BIAS in p.keys.keys for p in plans):
        warnings.append("lora_B.bias tensors (PEFT lora_bias=True) are a bias update outside ΔW = B A; skipped")
    if skipped:
        warnings.append(f"{len(skipped)} tensor(s) are not LoRA factors and were skipped (first: {skipped[0]!r})")
    if config is not None and (note := config.conversion_warning()):
        warnings.append(note)
    if fmt == "peft" and config is None and not any(Role.ALPHA in p.keys.keys for p in plans):
        warnings.append("no adapter_config.json: assumed lora_alpha = r (scale 1)")
    factor_roles = (Role.A, Role.B, Role.MID)
    dtypes = {header.tensors[k].dtype for p in plans for r, k in p.keys.keys.items() if r in factor_roles}
    is_dora = any(Role.MAGNITUDE in p.keys.keys for p in plans) or bool(config and config.use_dora)
    return LoraMetadata(
        format=fmt,
        base_family=family,
        family_evidence=evidence,
        dtype="+".join(sorted(dtypes)),
        sha256=file_sha256(file),
        size_bytes=header.file_size,
        source=str(file),
        is_dora=is_dora,
        safetensors_metadata=dict(header.metadata),
        kohya=kohya,
        modelspec=modelspec,
        adapter_config=raw_config,
        skipped_keys=skipped,
        warnings=tuple(dict.fromkeys(warnings)),
    )
