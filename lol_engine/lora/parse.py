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
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

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
from lol_engine.lora.family import detect_family, module_family
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
    DTYPE_SIZES,
    FLOAT_DTYPES,
    SCALE_METADATA,
    ReadLimits,
    Run,
    SafetensorsHeader,
    WorkBudget,
    file_sha256,
    read_header,
    read_into,
    read_runs,
    read_tensors,
    shown,
)
from lol_engine.lora.scales import MAX_MAGNITUDE, check_magnitudes, module_scale
from lol_engine.lora.weights import LoraMetadata, LoraModule, LoraWeights
from lol_engine.spec import LayerSpec, LoraSpec, ModuleKind, natural_key

__all__ = ["LoraSummary", "inspect_lora", "load_lora"]

_MLX_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|tok_embeddings|word_embeddings)$")
_WHOLE_FILE_BYTES = 2**20  # load_lora reads smaller files in one call (header, factors and hashes from one buffer)
_K = TypeVar("_K")
_V = TypeVar("_V")


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
    limits = limits or ReadLimits()
    plan, header, config, _ = _prepare(path, limits, config)
    meta = _metadata(header, plan, config, limits, file_sha256(header.path))
    plans = plan.plans
    return LoraSummary(
        LoraSpec(tuple(p.spec for p in plans)), tuple(p.scale for p in plans), tuple(p.alpha for p in plans), meta
    )


def load_lora(
    path: str | os.PathLike[str] | locate.LoraLocation,
    *,
    limits: ReadLimits | None = None,
    config: AdapterConfig | None = None,
) -> LoraWeights:
    """Read a LoRA file or folder into :class:`LoraWeights` (float32, CPU), or raise :class:`LoraFormatError`.

    ``path`` may also be a :class:`~lol_engine.lora.locate.LoraLocation` that a folder walk found
    (:func:`~lol_engine.lora.locate.find_loras`): its file and config are read without locating them again.

    ``config`` overrides the ``adapter_config.json`` found next to the file. The file is read once: its bytes are
    hashed (the id, and the kohya/A1111 hash of the data buffer) as they are converted, and the factors of modules of
    one shape land in one stacked buffer (each module's ``a``/``b`` is a view of it), which batched work over modules
    of one shape (:mod:`lol_engine.symmetry`) uses without copying. Files alike in everything but their factors and
    informational metadata (the adapters of one training run) share one plan of their modules (:class:`_ModulePlan`).
    """
    limits = limits or ReadLimits()
    plan, header, config, budget = _prepare(path, limits, config, whole_under=_WHOLE_FILE_BYTES)
    arena = torch.empty(plan.arena_size) if plan.groups else None  # every group's stacks, in one buffer
    views = _views(arena, plan)
    if header.content is not None and plan.runs is not None and arena is not None:
        full, data = read_runs(header, arena, plan.runs)  # a small plain file: a few conversions from one buffer
        targets: dict[str, Tensor] = {}
    else:
        targets = _targets(plan, header, views)
        full, data = read_into(header, targets)
    budget.check("reading the factors")
    file = header.path.name
    modules: list[LoraModule] = []
    for p, a, b in views:
        magnitude, axis = _magnitude(p, targets, file) if plan.has_magnitude else (None, None)
        modules.append(LoraModule(p.spec, a, b, p.scale, p.alpha, magnitude, axis))
    loose_modules = tuple(_build_module(p, targets, file) for p in plan.loose)
    by_name = {m.name: m for m in (*modules, *loose_modules)}
    del targets
    _check_factors(arena, plan.fast_check, tuple(modules), loose_modules, file)
    budget.check("checking the factors")
    meta = _metadata(header, plan, config, limits, full, data)
    return LoraWeights(tuple(by_name[p.spec.name] for p in plan.plans), meta)


def _views(arena: Tensor | None, plan: _ModulePlan) -> list[tuple[_Plan, Tensor, Tensor]]:
    """``(plan, A (r, d_in), B (d_out, r))`` of each stacked module: views of the arena where the plan lays them out
    (the A factors of a group back to back, then its B factors: :func:`lol_engine.symmetry.stacked` takes them as
    the group's stacks without a copy)."""
    if arena is None:
        return []
    return [
        (
            p,
            arena.as_strided((p.spec.rank, p.spec.d_in), (p.spec.d_in, 1), a_at),
            arena.as_strided((p.spec.d_out, p.spec.rank), (p.spec.rank, 1), b_at),
        )
        for p, a_at, b_at in plan.views
    ]


def _targets(
    plan: _ModulePlan, header: SafetensorsHeader, views: list[tuple[_Plan, Tensor, Tensor]]
) -> dict[str, Tensor]:
    """Where each wanted tensor is read to: its slot in the arena, or a tensor of its own.

    mlx-lm factors (transposed) and Tucker ``lora_mid`` modules are read on their own and built by
    :func:`_build_module`; DoRA magnitudes are read on their own.
    """
    targets: dict[str, Tensor] = {}
    for p in plan.loose:
        for role in (Role.A, Role.B, Role.MID):
            if role in p.keys.keys:
                targets[p.keys.keys[role]] = torch.empty(header.tensors[p.keys.keys[role]].shape)
    if plan.has_magnitude:
        for p in plan.plans:
            if Role.MAGNITUDE in p.keys.keys:
                key = p.keys.keys[Role.MAGNITUDE]
                targets[key] = torch.empty(header.tensors[key].shape)
    for p, a, b in views:
        targets[p.keys.keys[Role.A]] = a  # (r, d_in): conv kernels flattened
        targets[p.keys.keys[Role.B]] = b  # (d_out, r)
    return targets


def _arena_layout(
    groups: tuple[tuple[_Plan, ...], ...], header: SafetensorsHeader
) -> tuple[int, tuple[tuple[_Plan, int, int], ...], tuple[Run, ...]]:
    """Where each group's stacks lie in one float32 arena, and the runs that fill it from the data buffer.

    Returns ``(arena size, [(plan, A offset, B offset) per module, group by group], runs)``. Stacks are laid out
    in the order of their first tensor in the file, so that the factors of one-module groups (A then B, as the file
    stores them) follow each other as in the file; consecutive tensors of one dtype that sit back to back in both
    become one :class:`~lol_engine.lora.safe_io.Run` (a small adapter whose every shape occurs once is one run).
    """
    slots = []  # (file offset of the first tensor, group index, role, tensors in stack order)
    for index, members in enumerate(groups):
        for role in (Role.A, Role.B):
            infos = [header.tensors[p.keys.keys[role]] for p in members]
            slots.append((infos[0].begin, index, role, infos))
    slots.sort(key=lambda slot: slot[0])
    at: dict[tuple[int, Role], int] = {}
    runs: list[Run] = []
    size = 0
    for _, index, role, infos in slots:
        at[index, role] = size
        for info in infos:
            count = math.prod(info.shape)
            last = runs[-1] if runs else None
            if (
                last is not None
                and last.dtype == info.dtype
                and last.begin + last.count * DTYPE_SIZES[info.dtype] == info.begin
                and last.at + last.count == size
            ):
                runs[-1] = replace(last, count=last.count + count)
            else:
                runs.append(Run(info.begin, info.dtype, count, size))
            size += count
    views = []
    for index, members in enumerate(groups):
        for i, p in enumerate(members):
            rank, d_in, d_out = p.spec.rank, p.spec.d_in, p.spec.d_out
            views.append((p, at[index, Role.A] + i * rank * d_in, at[index, Role.B] + i * d_out * rank))
    return size, tuple(views), tuple(runs)


def _check_factors(
    arena: Tensor | None, fast_check: float, stacked: tuple[LoraModule, ...], loose: tuple[LoraModule, ...], file: str
) -> None:
    """:func:`~lol_engine.lora.scales.check_magnitudes` with a fast path over the stacked modules' arena.

    One pass over the arena finds its extreme entries (NaN propagates into them). When neither passes the
    plan's ``fast_check`` (:func:`_fast_check`) in size, every largest entry and every ``|s|·‖B‖_F·‖A‖_F ≥ ‖s·B A‖_F``
    stays 1 % under the limit, and the modules pass at once; otherwise the reference check runs and refuses with its
    exact message (or passes a large update that cancels).
    """
    if arena is not None:
        low, high = torch.aminmax(arena)  # one pass (the inf-norm takes several)
        if not (-float(low) <= fast_check and float(high) <= fast_check):  # NaN compares False
            check_magnitudes(stacked, file)
    if loose:
        check_magnitudes(loose, file)


def _fast_check(plans: Iterable[_Plan]) -> float:
    """The largest factor entry under which :func:`check_magnitudes` passes every one of ``plans`` for certain.

    ``‖s·B A‖_F ≤ |s|·‖B‖_F·‖A‖_F ≤ |s|·m²·√(n_A·n_B)`` for entries of size at most ``m``, so
    ``m ≤ √(bound / (|s|·√(n_A·n_B)))`` with ``bound`` 1 % under the limit keeps both checks clear.
    """
    bound = 0.99 * MAX_MAGNITUDE
    out = bound
    for p in plans:
        spec = p.spec
        product = abs(p.scale) * math.sqrt(spec.rank * spec.d_in) * math.sqrt(spec.d_out * spec.rank)
        if product > 0:
            out = min(out, math.sqrt(bound / product))
    return out


def _prepare(
    path: str | os.PathLike[str] | locate.LoraLocation,
    limits: ReadLimits,
    config: AdapterConfig | None,
    whole_under: int = 0,
) -> tuple[_ModulePlan, SafetensorsHeader, AdapterConfig | None, WorkBudget]:
    """The file's header (read whole under ``whole_under`` bytes), its module plan and its config."""
    found = path if isinstance(path, locate.LoraLocation) else locate.locate_lora(path)
    file = found.weights
    where = file.name
    budget = WorkBudget(limits, where)
    if config is None and found.config is not None:
        config = read_adapter_config(found.config, limits)
    header = read_header(
        file,
        limits,
        precheck=lambda entries: _count_modules(entries, limits, where),
        whole_under=whole_under,
    )
    plan = _module_plan(header, config, limits, budget)
    budget.check("planning modules")
    return plan, header, config, budget


@dataclass(frozen=True, eq=False)
class _Layout:
    """What a file's tensor table (names, dtypes, shapes, offsets) alone determines: its modules' keys, and the plans
    made for it."""

    low_rank: dict[str, ModuleKeys]  # stem → keys of the modules with factors; read-only once made
    side_keys: tuple[str, ...]  # the 0-dim alpha/scale tensors, whose values the scales depend on
    cloneofsimo: frozenset[str]  # components of cloneofsimo stems: the metadata keys that name their modules
    plans: _Lru[tuple[Any, ...], _ModulePlan]


@dataclass(frozen=True, eq=False)
class _ModulePlan:
    """Every module of a file before its factors are read, with what the modules alone say about the file.

    Made by :func:`_plan_modules` from the tensor table, the adapter config, the limits, the alpha/scale values and
    the metadata keys that set scales or names, and from nothing else: files alike in those share one (the adapters
    of one training run differ only in their factors and informational metadata).
    """

    plans: tuple[_Plan, ...]  # in natural name order
    groups: tuple[tuple[_Plan, ...], ...]  # plain modules by (rank, d_out, d_in): one stacked buffer each
    loose: tuple[_Plan, ...]  # mlx-lm (transposed) and Tucker modules: read on their own
    notes: tuple[str, ...]  # warnings of the planning, folded
    structure: tuple[str, tuple[str, ...]]  # the family the module names and widths suggest, with evidence
    wrappers: tuple[str, ...]  # evidence lines: encoder wrapper prefixes resolved
    origins: frozenset[NameOrigin]
    skipped: tuple[str, ...]  # tensors that are no LoRA factors
    dtype: str  # source dtypes of the factors, e.g. "F16"
    has_mid: bool
    has_bias: bool
    has_alpha: bool
    has_magnitude: bool
    arena_size: int  # float32 values of every group's stacks together
    views: tuple[tuple[_Plan, int, int], ...]  # each stacked module's A and B offsets in the arena
    runs: tuple[Run, ...] | None  # how the arena fills from the data buffer; None with loose modules or magnitudes
    fast_check: float  # factors whose entries all stay at or below this pass the magnitude checks at once
    config: AdapterConfig | None  # the config the plans were made with (its id is part of the cache key)


class _Lru(Generic[_K, _V]):
    """A small least-recently-used map, safe to share between threads."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[_K, _V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: _K) -> _V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: _K, value: _V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


_LAYOUTS: _Lru[tuple[tuple[str, str, tuple[int, ...], int], ...], _Layout] = _Lru(16)
_PLANS_PER_LAYOUT = 8


def _module_plan(
    header: SafetensorsHeader, config: AdapterConfig | None, limits: ReadLimits, budget: WorkBudget
) -> _ModulePlan:
    """The file's :class:`_ModulePlan`: made once per distinct input, then shared (a small cache of each)."""
    table = tuple((t.name, t.dtype, t.shape, t.begin) for t in header.tensors.values())
    layout = _LAYOUTS.get(table)
    if layout is None:
        layout = _layout(header)
        _LAYOUTS.put(table, layout)
    side = _read_side_tensors(header, layout.side_keys)
    keyed = SCALE_METADATA | layout.cloneofsimo
    metadata = {k: v for k, v in header.metadata.items() if k in keyed}
    key = (id(config), limits, tuple(side.items()), tuple(metadata.items()))
    plan = layout.plans.get(key)
    if plan is None or plan.config is not config:
        plan = _plan_modules(layout, header, metadata, side, config, limits, budget)
        layout.plans.put(key, plan)
    return plan


def _layout(header: SafetensorsHeader) -> _Layout:
    """Group the file's keys into modules; refuse layouts that are no low-rank adapter."""
    where = header.path.name
    groups, _ = group_keys(header.tensors, where)
    _refuse_variants(groups, where)
    low_rank = {stem: g for stem, g in groups.items() if Role.A in g.keys or Role.B in g.keys}
    if not low_rank:
        raise LoraFormatError(unknown_layout(list(header.tensors), where))
    side_keys = tuple(g.keys[role] for g in low_rank.values() for role in (Role.ALPHA, Role.SCALE) if role in g.keys)
    components = frozenset(stem.partition(":")[0] for stem, g in low_rank.items() if g.naming == "cloneofsimo")
    return _Layout(low_rank, side_keys, components, _Lru(_PLANS_PER_LAYOUT))


def _plan_modules(
    layout: _Layout,
    header: SafetensorsHeader,
    metadata: dict[str, str],
    side: dict[str, float],
    config: AdapterConfig | None,
    limits: ReadLimits,
    budget: WorkBudget,
) -> _ModulePlan:
    """Name, shape and scale every module; ``metadata`` holds only the keys that set scales or names."""
    where = header.path.name
    low_rank = layout.low_rank
    configs = _configs(config, metadata, where, limits)
    pairs = sum(c.n_patterns for c in configs.values() if isinstance(c, PeftAdapterConfig)) * len(low_rank)
    if pairs > limits.max_pattern_pairs:
        raise LoraFormatError(
            f"{where}: matching every rank_pattern/alpha_pattern key against every module takes {pairs:,} regex "
            f"matches, over the limit of {limits.max_pattern_pairs:,}"
        )
    budget.check("grouping keys")
    notes = Notes()
    names = _names(low_rank, header, metadata, notes, where)
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
    by_shape: dict[tuple[int, int, int], list[_Plan]] = {}
    loose = []
    for p in plans:
        if p.keys.naming == "mlx" or Role.MID in p.keys.keys:
            loose.append(p)
        else:
            by_shape.setdefault((p.spec.rank, p.spec.d_out, p.spec.d_in), []).append(p)
    wrappers = dict(ENCODER_WRAPPERS)
    used = {key for p in plans for role, key in p.keys.keys.items() if role is not Role.BIAS}
    factor_roles = (Role.A, Role.B, Role.MID)
    dtypes = {header.tensors[k].dtype for p in plans for r, k in p.keys.keys.items() if r in factor_roles}
    groups = tuple(tuple(members) for members in by_shape.values())
    arena_size, views, runs = _arena_layout(groups, header)
    has_magnitude = any(Role.MAGNITUDE in p.keys.keys for p in plans)
    return _ModulePlan(
        plans=tuple(plans),
        groups=groups,
        loose=tuple(loose),
        notes=tuple(notes.fold()),
        structure=module_family([p.spec for p in plans]),
        wrappers=tuple(
            f"module names: wrapper prefix {w!r} resolved ({wrappers[w]})"
            for w in sorted({p.origin.wrapper for p in plans} - {""})
        ),
        origins=frozenset(p.origin for p in plans),
        skipped=tuple(k for k in header.tensors if k not in used),
        dtype="+".join(sorted(dtypes)),
        has_mid=any(Role.MID in p.keys.keys for p in plans),
        has_bias=any(Role.BIAS in p.keys.keys for p in plans),
        has_alpha=any(Role.ALPHA in p.keys.keys for p in plans),
        has_magnitude=has_magnitude,
        arena_size=arena_size,
        views=views,
        runs=None if loose or has_magnitude else runs,
        fast_check=_fast_check(p for members in by_shape.values() for p in members),
        config=config,
    )


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


def _read_side_tensors(header: SafetensorsHeader, keys: tuple[str, ...]) -> dict[str, float]:
    for key in keys:
        shape = header.tensors[key].shape
        if len(shape) > 1 or (shape and shape[0] != 1):
            raise LoraFormatError(f"{header.path.name}: {shown(key)} should be a scalar, has shape {shape}")
    values = read_tensors(header, list(keys)) if keys else {}
    out = {}
    for key, tensor in values.items():
        value = float(tensor.reshape(-1)[0])
        if not torch.isfinite(tensor).all() or abs(value) > MAX_MAGNITUDE:
            raise LoraFormatError(f"{header.path.name}: {shown(key)} is {value:g}; it must be finite and below 1e15")
        out[key] = value
    return out


def _names(
    groups: dict[str, ModuleKeys], header: SafetensorsHeader, metadata: dict[str, str], notes: Notes, where: str
) -> dict[str, ResolvedName]:
    """``{stem: canonical name and its source}``; refuses two stems that resolve to one module."""
    indexed = {}
    for stem, group in groups.items():
        if group.naming == "cloneofsimo":
            a_shape, b_shape = _oriented(group, header, f"{where}: {cloneofsimo.FORMAT} module {shown(stem)}")
            indexed[stem] = (a_shape[1] if len(a_shape) > 1 else 0, b_shape[0])
    by_index = cloneofsimo.resolve(indexed, metadata, where) if indexed else {}
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
    header: SafetensorsHeader,
    plan: _ModulePlan,
    config: AdapterConfig | None,
    limits: ReadLimits,
    sha256: str,
    data_sha256: str = "",
) -> LoraMetadata:
    warnings = [*header.warnings, *plan.notes]
    kohya = {k: decode_kohya(k, v, limits, warnings) for k, v in header.metadata.items() if k.startswith("ss_")}
    modelspec = {k.removeprefix("modelspec."): v for k, v in header.metadata.items() if k.startswith("modelspec.")}
    raw_config = dict(config.raw) if config else {}
    family, evidence, family_warnings = detect_family(
        [p.spec for p in plan.plans], kohya, modelspec, raw_config, header.metadata, structure=plan.structure
    )
    evidence += plan.wrappers
    fmt = format_name(plan.origins, kohya, plan.has_mid)
    warnings += family_warnings
    if "+" in fmt:
        warnings.append(f"modules use more than one naming convention ({fmt})")
    if plan.has_bias:
        warnings.append("lora_B.bias tensors (PEFT lora_bias=True) are a bias update outside ΔW = B A; skipped")
    if plan.skipped:
        warnings.append(
            f"{len(plan.skipped)} tensor(s) are not LoRA factors and were skipped (first: {shown(plan.skipped[0])})"
        )
    if config is not None and (note := config.conversion_warning()):
        warnings.append(note)
    if fmt == "peft" and config is None and not plan.has_alpha:
        warnings.append("no adapter_config.json: assumed lora_alpha = r (scale 1)")
    return LoraMetadata(
        format=fmt,
        base_family=family,
        family_evidence=evidence,
        dtype=plan.dtype,
        sha256=sha256,
        data_sha256=data_sha256,
        size_bytes=header.file_size,
        source=str(header.path),
        is_dora=plan.has_magnitude or bool(config and config.use_dora),
        safetensors_metadata=dict(header.metadata),
        kohya=kohya,
        modelspec=modelspec,
        adapter_config=raw_config,
        skipped_keys=plan.skipped,
        warnings=tuple(dict.fromkeys(warnings)),
    )
