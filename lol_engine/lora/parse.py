"""``load_lora`` and ``inspect_lora``: any supported LoRA file or adapter folder to the canonical form.

Pipeline: locate the file and its ``adapter_config.json`` (:mod:`locate`) → validate the header (:mod:`safe_io`) →
group keys into modules (:mod:`keys`) → count budgets → canonical names → shapes in the canonical orientation →
scales → read factors → magnitude checks. Format quirks (mlx-lm's transposed factors, cloneofsimo's index-named
modules, every scale rule) end here: what comes out is always ``A: (r, d_in)``, ``B: (d_out, r)``,
``ΔW = scale · B A``.

Work is bounded before it is done (:class:`ReadLimits`): tensors, modules, pattern matches and the reading thread's
CPU time; per-module checks run batched over modules of one shape.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lol_engine.errors import LoraFormatError
from lol_engine.lora import cloneofsimo, locate
from lol_engine.lora.config import (
    AdapterConfig,
    PeftAdapterConfig,
    diffusers_component_configs,
    read_adapter_config,
)
from lol_engine.lora.family import detect_family
from lol_engine.lora.keys import (
    ENCODER_WRAPPERS,
    NAMING_FORMATS,
    ModuleKeys,
    NameOrigin,
    ResolvedName,
    Role,
    canonical_name,
    count_modules,
    group_keys,
)
from lol_engine.lora.metadata import Notes, decode_kohya, format_name, unknown_layout
from lol_engine.lora.safe_io import (
    FLOAT_DTYPES,
    ReadLimits,
    SafetensorsHeader,
    WorkBudget,
    file_sha256,
    read_header,
    read_into,
    read_tensors,
    shown,
)
from lol_engine.lora.scales import MAX_MAGNITUDE, check_magnitudes, module_scale
from lol_engine.lora.weights import LoraMetadata, LoraModule, LoraWeights
from lol_engine.spec import LayerSpec, LoraSpec, ModuleKind, natural_key

__all__ = ["LoraSummary", "inspect_lora", "load_lora"]

_MLX_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|tok_embeddings|word_embeddings)$")


@dataclass(frozen=True)
class _Plan:
    """One module as the header describes it, before factor data is read."""

    spec: LayerSpec
    keys: ModuleKeys
    alpha: float | None
    scale: float
    origin: NameOrigin  # where the canonical name came from


@dataclass(frozen=True, eq=False)
class LoraSummary:
    """What :func:`inspect_lora` learns without reading the factors: spec, scales and metadata."""

    spec: LoraSpec
    scales: tuple[float, ...]
    alphas: tuple[float | None, ...]
    meta: LoraMetadata


def inspect_lora(
    path: str | os.PathLike[str], *, limits: ReadLimits | None = None, config: AdapterConfig | None = None
) -> LoraSummary:
    """Spec, scales and metadata of a LoRA, reading the header and the 0-dim alpha tensors only."""
    plans, meta, _, _ = _prepare(path, limits or ReadLimits(), config)
    return LoraSummary(
        LoraSpec(tuple(p.spec for p in plans)), tuple(p.scale for p in plans), tuple(p.alpha for p in plans), meta
    )


def load_lora(
    path: str | os.PathLike[str], *, limits: ReadLimits | None = None, config: AdapterConfig | None = None
) -> LoraWeights:
    """Read a LoRA file or folder into :class:`LoraWeights` (float32, CPU), or raise :class:`LoraFormatError`.

    ``config`` overrides the ``adapter_config.json`` found next to the file. The file is read once: its bytes are
    hashed (the id, and the kohya/A1111 hash of the data buffer) as they are converted, and the factors of modules of
    one shape land in one stacked buffer (each module's ``a``/``b`` is a view of it), which batched work over modules
    of one shape (:mod:`lol_engine.symmetry`) uses without copying.
    """
    limits = limits or ReadLimits()
    plans, meta, header, budget = _prepare(path, limits, config, hash_file=False)
    groups, loose, targets = _targets(plans, header)
    full, data = read_into(header, targets)
    budget.check("reading the factors")
    file = header.path.name
    modules: list[LoraModule] = []
    for group in groups:
        for i, p in enumerate(group.plans):
            magnitude, axis = _magnitude(p, targets, file)
            modules.append(LoraModule(p.spec, group.a[i], group.b[i], p.scale, p.alpha, magnitude, axis))
    loose_modules = tuple(_build_module(p, targets, file) for p in loose)
    by_name = {m.name: m for m in (*modules, *loose_modules)}
    del targets
    _check_factors(groups, by_name, loose_modules, file)
    budget.check("checking the factors")
    meta = replace(meta, sha256=full, data_sha256=data)
    return LoraWeights(tuple(by_name[p.spec.name] for p in plans), meta)


@dataclass(frozen=True)
class _Group:
    """Plain modules of one ``(rank, d_out, d_in)``, in plan order: their factors in one stacked buffer each."""

    plans: list[_Plan]
    a: Tensor  # (N, r, d_in)
    b: Tensor  # (N, d_out, r)


def _targets(plans: list[_Plan], header: SafetensorsHeader) -> tuple[list[_Group], list[_Plan], dict[str, Tensor]]:
    """Where each wanted tensor is read to: a slot of its shape group's stacked buffer, or a tensor of its own.

    mlx-lm factors (transposed) and Tucker ``lora_mid`` modules are read on their own and built by
    :func:`_build_module`; DoRA magnitudes are read on their own.
    """
    by_shape: dict[tuple[int, int, int], list[_Plan]] = {}
    loose: list[_Plan] = []
    targets: dict[str, Tensor] = {}
    for p in plans:
        keys = p.keys.keys
        if p.keys.naming == "mlx" or Role.MID in keys:
            loose.append(p)
            for role in (Role.A, Role.B, Role.MID):
                if role in keys:
                    targets[keys[role]] = torch.empty(header.tensors[keys[role]].shape)
        else:
            by_shape.setdefault((p.spec.rank, p.spec.d_out, p.spec.d_in), []).append(p)
        if Role.MAGNITUDE in keys:
            targets[keys[Role.MAGNITUDE]] = torch.empty(header.tensors[keys[Role.MAGNITUDE]].shape)
    groups = []
    for (rank, d_out, d_in), members in by_shape.items():
        group = _Group(members, torch.empty(len(members), rank, d_in), torch.empty(len(members), d_out, rank))
        for i, p in enumerate(members):
            targets[p.keys.keys[Role.A]] = group.a[i]  # (r, d_in): conv kernels flattened
            targets[p.keys.keys[Role.B]] = group.b[i]  # (d_out, r)
        groups.append(group)
    return groups, loose, targets


# Fewer factor entries than this per checked chunk: bounds the temporaries of the reference check.
_CHECK_CHUNK = 2**24


def _check_factors(
    groups: list[_Group], by_name: dict[str, LoraModule], loose: tuple[LoraModule, ...], file: str
) -> None:
    """:func:`~lol_engine.lora.scales.check_magnitudes` with a fast path over the stacked groups.

    One pass per factor computes ``‖A‖_F`` and ``‖B‖_F`` (NaN/Inf propagate into them). A module passes at once
    when both are finite and ``‖A‖_F``, ``‖B‖_F`` and ``|s|·‖A‖_F·‖B‖_F`` stay 1 % under the limit: these bound the
    largest entries and ``‖s·B A‖_F`` that the reference check computes. Any other chunk goes to the reference check,
    which refuses it with its exact message.
    """
    bound = 0.99 * MAX_MAGNITUDE
    for group in groups:
        n, rank, d_in = group.a.shape
        step = max(1, _CHECK_CHUNK // (rank * (d_in + group.b.shape[1])))
        for start in range(0, n, step):  # whole groups of small modules in one step (no slicing: fewer torch calls)
            a, b = (group.a, group.b) if step >= n else (group.a[start : start + step], group.b[start : start + step])
            plans = group.plans[start : start + step]
            a_norm = torch.linalg.vector_norm(a.view(len(a), -1), dim=1).tolist()  # ‖A‖_F; NaN, Inf stay
            b_norm = torch.linalg.vector_norm(b.view(len(b), -1), dim=1).tolist()  # ‖B‖_F
            fine = all(  # NaN compares False
                x <= bound and y <= bound and x * y * abs(p.scale) <= bound
                for x, y, p in zip(a_norm, b_norm, plans, strict=True)
            )
            if not fine:
                check_magnitudes(tuple(by_name[p.spec.name] for p in plans), file)
    if loose:
        check_magnitudes(loose, file)


def _prepare(
    path: str | os.PathLike[str], limits: ReadLimits, config: AdapterConfig | None, hash_file: bool = True
) -> tuple[list[_Plan], LoraMetadata, SafetensorsHeader, WorkBudget]:
    found = locate.locate_lora(path)
    file = found.weights
    where = file.name
    budget = WorkBudget(limits, where)
    if config is None and found.config is not None:
        config = read_adapter_config(found.config, limits)
    header = read_header(file, limits, precheck=lambda entries: _count_modules(entries, limits, where))
    groups, _ = group_keys(header.tensors, where)
    _refuse_variants(groups, where)
    low_rank = {stem: g for stem, g in groups.items() if Role.A in g.keys or Role.B in g.keys}
    if not low_rank:
        raise LoraFormatError(unknown_layout(list(header.tensors), where))
    configs = _configs(config, header.metadata, where, limits)
    pairs = sum(c.n_patterns for c in configs.values() if isinstance(c, PeftAdapterConfig)) * len(low_rank)
    if pairs > limits.max_pattern_pairs:
        raise LoraFormatError(
            f"{where}: matching every rank_pattern/alpha_pattern key against every module takes {pairs:,} regex "
            f"matches, over the limit of {limits.max_pattern_pairs:,}"
        )
    budget.check("grouping keys")
    notes = Notes()
    notes.lines += header.warnings
    side = _read_side_tensors(header, low_rank.values())
    names = _names(low_rank, header, notes, where)
    plans = []
    for stem, group in low_rank.items():
        resolved = names[stem]
        spec = _spec(group, resolved.name, header, limits, notes)
        # PEFT matched rank_pattern/alpha_pattern keys against the name inside the tool's wrapper (bert.…)
        as_wrapped = replace(spec, name=resolved.wrapped_name) if resolved.wrapper else spec
        alpha, scale = module_scale(group, as_wrapped, side, configs, notes)
        plans.append(_Plan(spec, group, alpha, scale, NameOrigin(group.naming, resolved.source, resolved.wrapper)))
    plans.sort(key=lambda p: natural_key(p.spec.name))  # the same modules always come in the same order
    _check_work([p.spec for p in plans], limits, where)
    budget.check("planning modules")
    meta = _metadata(file, header, plans, config, notes, limits, hash_file)
    return plans, meta, header, budget


def _count_modules(keys: Iterable[str], limits: ReadLimits, where: str) -> None:
    """Refuse a file with more modules than ``limits.max_modules``, counting its A keys before any is validated."""
    n = count_modules(keys)
    if n > limits.max_modules:
        raise LoraFormatError(
            f"{where}: {n:,} modules, over the limit of {limits.max_modules:,} "
            "(an SDXL LoRA has about 1,000; raise ReadLimits.max_modules to read it)"
        )


def _check_work(specs: list[LayerSpec], limits: ReadLimits, where: str) -> None:
    """Refuse factors whose canonical form would not fit memory, or whose exact spectra would take minutes.

    Counted from the header before any factor is read: a Tucker ``lora_mid`` expands A to ``r·c·kh·kw`` values, so an
    18 MB file can ask for hundreds of GB.
    """
    values = sum(s.rank * (s.d_in + s.d_out) for s in specs)
    if values > limits.max_factor_values:
        raise LoraFormatError(
            f"{where}: its factors expand to {values:,} values ({values * 4 / 2**30:,.1f} GiB as float32), over the "
            f"limit of {limits.max_factor_values:,}"
        )
    work = sum(float(s.rank) ** 2 * (s.d_in + s.d_out) for s in specs)
    if work > limits.max_spectrum_work:
        raise LoraFormatError(
            f"{where}: exact spectra of its modules cost {work:.3g} operations (Σ r²·(d_in + d_out)), over the "
            f"limit of {limits.max_spectrum_work:.3g}"
        )


def _configs(
    config: AdapterConfig | None, metadata: dict[str, str], where: str, limits: ReadLimits
) -> dict[str, AdapterConfig]:
    """``{"": adapter_config.json}``, else diffusers' per-component configs (``unet``, ``text_encoder``, …)."""
    if config is not None:
        return {"": config}
    return dict(diffusers_component_configs(metadata, where, limits))


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
        shape = header.tensors[key].shape
        if len(shape) > 1 or (shape and shape[0] != 1):
            raise LoraFormatError(f"{header.path.name}: {shown(key)} should be a scalar, has shape {shape}")
    values = read_tensors(header, keys) if keys else {}
    out = {}
    for key, tensor in values.items():
        value = float(tensor.reshape(-1)[0])
        if not torch.isfinite(tensor).all() or abs(value) > MAX_MAGNITUDE:
            raise LoraFormatError(f"{header.path.name}: {shown(key)} is {value:g}; it must be finite and below 1e15")
        out[key] = value
    return out


def _names(
    groups: dict[str, ModuleKeys], header: SafetensorsHeader, notes: Notes, where: str
) -> dict[str, ResolvedName]:
    """``{stem: canonical name and its source}``; refuses two stems that resolve to one module."""
    indexed = {}
    for stem, group in groups.items():
        if group.naming == "cloneofsimo":
            a_shape, b_shape = _oriented(group, header, f"{where}: {cloneofsimo.FORMAT} module {shown(stem)}")
            indexed[stem] = (a_shape[1] if len(a_shape) > 1 else 0, b_shape[0])
    by_index = cloneofsimo.resolve(indexed, header.metadata, where) if indexed else {}
    out: dict[str, ResolvedName] = {}
    seen: dict[str, str] = {}
    unresolved = []
    for stem, group in groups.items():
        if stem in by_index:
            resolved = ResolvedName(by_index[stem], "cloneofsimo")
        else:
            resolved = canonical_name(stem, group.naming)
            if resolved.note:
                unresolved.append(stem)
        name = resolved.name
        if name in seen:
            raise LoraFormatError(f"{where}: {shown(stem)} and {shown(seen[name])} both name module {shown(name)}")
        seen[name] = stem
        out[stem] = resolved
    if unresolved:
        notes.lines.append(
            f"{len(unresolved)} kohya module name(s) are in no known vocabulary and were kept as written "
            f"(first: {shown(unresolved[0])})"
        )
    return out


def _oriented(group: ModuleKeys, header: SafetensorsHeader, where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of A and B in the canonical orientation (mlx-lm stores ``lora_a: (d_in, r)``, ``lora_b: (r, d_out)``)."""
    for role, other in ((Role.A, Role.B), (Role.B, Role.A)):
        if role not in group.keys:
            raise LoraFormatError(f"{where} has {other.value} ({shown(group.keys[other])}) but no {role.value} factor")
    a_shape = header.tensors[group.keys[Role.A]].shape
    b_shape = header.tensors[group.keys[Role.B]].shape
    if group.naming != "mlx":
        return a_shape, b_shape
    if len(a_shape) == 3 and len(b_shape) == 3:
        raise LoraFormatError(
            f"{where}: mlx-lm LoRASwitchLinear (mixture-of-experts) factors lora_a {a_shape}, lora_b {b_shape} hold "
            "one LoRA per expert; expert LoRAs are not read yet"
        )
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise LoraFormatError(f"{where}: mlx-lm factors must be 2-D, got lora_a {a_shape} and lora_b {b_shape}")
    return a_shape[::-1], b_shape[::-1]


def _spec(group: ModuleKeys, name: str, header: SafetensorsHeader, limits: ReadLimits, notes: Notes) -> LayerSpec:
    """The module's spec in the canonical orientation; checks ranks, shapes and factor dtypes."""
    fmt = NAMING_FORMATS.get(group.naming, group.naming)
    where = f"{header.path.name}: {fmt} module {shown(group.stem)}"
    for role in (Role.A, Role.B, Role.MID, Role.MAGNITUDE):
        if role in group.keys and header.tensors[group.keys[role]].dtype not in FLOAT_DTYPES:
            info = header.tensors[group.keys[role]]
            raise LoraFormatError(
                f"{where}: factor {shown(info.name)} has integer dtype {info.dtype}; factors must be floats"
            )
    a_shape, b_shape = _oriented(group, header, where)
    embedding = group.embedding or (group.naming == "mlx" and bool(_MLX_EMBEDDING.search(name)))
    if len(a_shape) < 2 or len(b_shape) < 2:
        raise LoraFormatError(f"{where}: factors must have at least 2 axes, got A {a_shape} and B {b_shape}")
    rank, d_out = a_shape[0], b_shape[0]
    if len(a_shape) > 2 and 0 < b_shape[1] < rank and rank % b_shape[1] == 0 and d_out % (rank // b_shape[1]) == 0:
        raise LoraFormatError(  # peft on a grouped conv: lora_B is a grouped 1x1 conv, lora_A a full conv
            f"{where}: a grouped-conv LoRA (B {b_shape} is a 1x1 conv with {rank // b_shape[1]} groups, A {a_shape} a "
            "full conv): its update is a full conv beside the grouped layer, no ΔW of that layer; not read"
        )
    if b_shape[1] != rank:
        raise LoraFormatError(f"{where}: rank mismatch: A {a_shape} has rank {rank} but B {b_shape} has {b_shape[1]}")
    if any(d != 1 for d in b_shape[2:]):
        raise LoraFormatError(f"{where}: B {b_shape} should be (d_out, r, 1, …, 1)")
    if not 1 <= rank <= limits.max_rank:
        raise LoraFormatError(f"{where}: rank {rank} is outside 1..{limits.max_rank}")
    if min(d_out, *a_shape[1:]) < 1:
        raise LoraFormatError(f"{where}: empty factors A {a_shape}, B {b_shape}")
    if embedding or len(a_shape) == 2:
        if len(b_shape) != 2 or len(a_shape) != 2:
            raise LoraFormatError(f"{where}: A {a_shape} and B {b_shape} mix linear and conv shapes")
        if Role.MID in group.keys:
            mid = header.tensors[group.keys[Role.MID]].shape
            raise LoraFormatError(f"{where}: Tucker lora_mid {mid} next to linear factors A {a_shape} (conv only)")
        kind: ModuleKind = "embedding" if embedding else "linear"
        orig: tuple[int, ...] = (a_shape[1], d_out) if embedding else (d_out, a_shape[1])
        spec = LayerSpec(name, d_out, a_shape[1], rank, kind, orig)
    else:
        kernel = _conv_kernel(group, header, a_shape, b_shape, where)
        orig = (d_out, a_shape[1], *kernel)
        spec = LayerSpec(name, d_out, a_shape[1] * math.prod(kernel), rank, "conv", orig)
    if rank > min(spec.d_out, spec.d_in):
        notes.module(f"rank {rank} exceeds min(d_out, d_in) = {min(spec.d_out, spec.d_in)}", name)
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


def _build_module(plan: _Plan, tensors: dict[str, Tensor], file: str) -> LoraModule:
    keys, spec = plan.keys.keys, plan.spec
    a, b = tensors[keys[Role.A]], tensors[keys[Role.B]]
    if plan.keys.naming == "mlx":  # lora_a: (d_in, r) → A: (r, d_in); lora_b: (r, d_out) → B: (d_out, r)
        a, b = a.T, b.T
    if Role.MID in keys:  # Tucker: A'[a, c, k…] = Σ_b mid[a, b, k…] · down[b, c]
        a = torch.einsum("ab...,bc->ac...", tensors[keys[Role.MID]], a.reshape(spec.rank, -1))
    if a.shape != (spec.rank, spec.d_in):
        a = a.reshape(spec.rank, spec.d_in)  # (r, d_in): conv kernels flattened
    if b.shape != (spec.d_out, spec.rank):
        b = b.reshape(spec.d_out, spec.rank)  # (d_out, r)
    a, b = a.contiguous(), b.contiguous()
    magnitude, axis = _magnitude(plan, tensors, file)
    return LoraModule(spec, a, b, plan.scale, plan.alpha, magnitude, axis)


def _magnitude(plan: _Plan, tensors: dict[str, Tensor], file: str) -> tuple[Tensor | None, Any]:
    key = plan.keys.keys.get(Role.MAGNITUDE)
    if key is None:
        return None, None
    magnitude = tensors[key]
    spec = plan.spec
    if not torch.isfinite(magnitude).all():
        raise LoraFormatError(f"{file}: module {shown(spec.name)}: DoRA magnitude has NaN/Inf values")
    in_channels = spec.orig_shape[1] if spec.kind == "conv" else spec.d_in
    if magnitude.numel() == spec.d_out and magnitude.shape[0] == spec.d_out:
        return magnitude.reshape(-1), "out"
    if magnitude.numel() == in_channels:
        return magnitude.reshape(-1), "in"
    raise LoraFormatError(
        f"{file}: module {shown(spec.name)}: DoRA magnitude {tuple(magnitude.shape)} fits neither d_out {spec.d_out} "
        f"nor d_in {in_channels}"
    )


def _metadata(
    file: Path,
    header: SafetensorsHeader,
    plans: list[_Plan],
    config: AdapterConfig | None,
    notes: Notes,
    limits: ReadLimits,
    hash_file: bool = True,
) -> LoraMetadata:
    warnings = notes.fold()
    kohya = {k: decode_kohya(k, v, limits, warnings) for k, v in header.metadata.items() if k.startswith("ss_")}
    modelspec = {k.removeprefix("modelspec."): v for k, v in header.metadata.items() if k.startswith("modelspec.")}
    raw_config = dict(config.raw) if config else {}
    family, evidence, family_warnings = detect_family(
        [p.spec for p in plans], kohya, modelspec, raw_config, header.metadata
    )
    wrappers = dict(ENCODER_WRAPPERS)
    for wrapper in sorted({p.origin.wrapper for p in plans} - {""}):
        evidence += (f"module names: wrapper prefix {wrapper!r} resolved ({wrappers[wrapper]})",)
    fmt = format_name({p.origin for p in plans}, kohya, any(Role.MID in p.keys.keys for p in plans))
    used = {key for p in plans for role, key in p.keys.keys.items() if role is not Role.BIAS}
    skipped = tuple(k for k in header.tensors if k not in used)
    warnings += family_warnings
    if "+" in fmt:
        warnings.append(f"modules use more than one naming convention ({fmt})")
    if any(Role.BIAS in p.keys.keys for p in plans):
        warnings.append("lora_B.bias tensors (PEFT lora_bias=True) are a bias update outside ΔW = B A; skipped")
    if skipped:
        warnings.append(f"{len(skipped)} tensor(s) are not LoRA factors and were skipped (first: {shown(skipped[0])})")
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
        sha256=file_sha256(file) if hash_file else "",  # load_lora hashes the bytes as it reads them
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
