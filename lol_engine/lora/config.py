"""Adapter configs: PEFT ``adapter_config.json``, diffusers ``lora_adapter_metadata`` and mlx-lm's
``adapter_config.json``. Parsed with ``json`` only, size-, depth- and digit-capped; the user-supplied
``rank_pattern`` / ``alpha_pattern`` regexes are length- and count-capped and matched by RE2, whose matching time is
linear in the module name, so no pattern can run away and no wall-clock timeout is needed."""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import re2

from lol_engine.errors import LoraFormatError
from lol_engine.lora.safe_io import HugeNumber, ReadLimits, parse_json, shown

__all__ = [
    "AdapterConfig",
    "MlxAdapterConfig",
    "PatternTable",
    "PeftAdapterConfig",
    "diffusers_component_configs",
    "read_adapter_config",
]

_CONVERSION_INITS = ("pissa", "olora", "corda", "loftq", "eva")
_SET_SIZE = 32  # patterns per RE2 set: small sets keep each set's automaton small
_SET_OPTIONS = re2.Options()
_SET_OPTIONS.max_mem = 64 << 20
_SET_OPTIONS.log_errors = False


class PatternTable:
    r"""PEFT's ``rank_pattern`` / ``alpha_pattern``: keys tried in order as ``(.*\.)?(key)$``, the first match wins.

    Matching is exact PEFT semantics for every key that both Python's ``re`` and RE2 accept (:meth:`parse` refuses
    lookarounds and backreferences). A module name is matched against all keys in a few passes of RE2 sets of
    :data:`_SET_SIZE` keys each, every pass linear in the name's length: no key can make matching run away.

    >>> table = PatternTable.parse({"layers\\.0\\.q_proj": 16, "q_proj": 4}, "rank_pattern", "cfg", ReadLimits())
    >>> table.lookup("model.layers.0.q_proj"), table.lookup("model.layers.1.q_proj"), table.lookup("k_proj")
    (16.0, 4.0, None)
    """

    def __init__(self, values: Mapping[str, float] | None = None) -> None:
        self.values: dict[str, float] = dict(values or {})
        self.keys = tuple(self.values)

    @classmethod
    def parse(cls, raw: Any, name: str, where: str, limits: ReadLimits, integer: bool = False) -> PatternTable:
        """Validate a pattern object from a config: key lengths, regex syntax and values."""
        if not isinstance(raw, dict):
            raise LoraFormatError(f"{where}: {name} must be an object, got {type(raw).__name__}")
        values = {}
        for key, number in raw.items():
            if len(key) > limits.max_pattern_chars:
                raise LoraFormatError(
                    f"{where}: {name} key of {len(key):,} chars is over the cap of {limits.max_pattern_chars}"
                )
            _compile_check(key, name, where)
            values[key] = _number(number, f"{name}[{shown(key, 60)}]", where, integer=integer)
        return cls(values)

    def __len__(self) -> int:
        return len(self.keys)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PatternTable) and list(self.values.items()) == list(other.values.items())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PatternTable({self.values!r})"

    @cached_property
    def _sets(self) -> list[tuple[int, Any]]:
        sets = []
        for start in range(0, len(self.keys), _SET_SIZE):
            matcher = re2.Set.FullMatchSet(_SET_OPTIONS)
            for key in self.keys[start : start + _SET_SIZE]:
                matcher.Add(rf"(?:.*\.)?(?:{key})")
            matcher.Compile()
            sets.append((start, matcher))
        return sets

    def lookup(self, module: str) -> float | None:
        """The value of the first key matching ``module``, or None."""
        for start, matcher in self._sets:
            hits = matcher.Match(module)
            if hits:
                return self.values[self.keys[start + min(hits)]]
        return None


def _compile_check(key: str, name: str, where: str) -> None:
    """Refuse a key that Python's ``re`` (PEFT's matcher) or RE2 (ours, linear-time) cannot compile."""
    try:
        re.compile(key)
    except (re.error, RecursionError, OverflowError) as exc:
        raise LoraFormatError(
            f"{where}: {name} key {shown(key, 60)} is not a valid regular expression ({exc})"
        ) from None
    try:
        re2.compile(rf"(?:.*\.)?(?:{key})")
    except re2.error:
        raise LoraFormatError(
            f"{where}: {name} key {shown(key, 60)} uses regex syntax that cannot be matched in linear time "
            "(lookaround, backreference, atomic group or a pattern too large); refusing it"
        ) from None


@dataclass(frozen=True)
class PeftAdapterConfig:
    """The fields of a PEFT LoRA config that decide each module's rank and scale."""

    r: int = 8
    lora_alpha: float = 8.0
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: PatternTable = field(default_factory=PatternTable)
    alpha_pattern: PatternTable = field(default_factory=PatternTable)
    peft_type: str = "LORA"
    raw: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str, limits: ReadLimits | None = None) -> PeftAdapterConfig:
        """Validate the fields that matter; everything else is kept in ``raw`` as information."""
        limits = limits or ReadLimits()
        peft_type = raw.get("peft_type") or "LORA"
        if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
            raise LoraFormatError(
                f"{where}: peft_type is {shown(peft_type, 40)}; only LORA adapters (ΔW = B A) are read"
            )
        r = _number(raw.get("r", 8), "r", where, integer=True)
        alpha = _number(raw.get("lora_alpha", 8), "lora_alpha", where)
        ranks = PatternTable.parse(raw.get("rank_pattern") or {}, "rank_pattern", where, limits, integer=True)
        alphas = PatternTable.parse(raw.get("alpha_pattern") or {}, "alpha_pattern", where, limits)
        if len(ranks) + len(alphas) > limits.max_patterns:
            raise LoraFormatError(
                f"{where}: {len(ranks) + len(alphas):,} rank_pattern/alpha_pattern keys, over the limit of "
                f"{limits.max_patterns:,}"
            )
        rslora, dora = bool(raw.get("use_rslora", False)), bool(raw.get("use_dora", False))
        return cls(int(r), float(alpha), rslora, dora, ranks, alphas, peft_type="LORA", raw=dict(raw))

    @property
    def n_patterns(self) -> int:
        """How many ``rank_pattern`` and ``alpha_pattern`` keys every module is matched against."""
        return len(self.rank_pattern) + len(self.alpha_pattern)

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """The configured ``(r, lora_alpha)`` of ``module``: the first matching pattern key wins, as in PEFT."""
        r = self.rank_pattern.lookup(module) if self.rank_pattern.keys else None
        alpha = self.alpha_pattern.lookup(module) if self.alpha_pattern.keys else None
        return int(self.r if r is None else r), float(self.lora_alpha if alpha is None else alpha)

    def scale(self, module: str, rank: int) -> tuple[float, float]:
        """``(alpha, scale)`` of a module whose factors have rank ``rank``: ``alpha/r`` or ``alpha/√r`` (rsLoRA)."""
        _, alpha = self.rank_alpha(module)
        return alpha, alpha / (math.sqrt(rank) if self.use_rslora else rank)

    def conversion_warning(self) -> str | None:
        """A warning when the adapter was initialised in a way that also changed the base weights."""
        init = self.raw.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_CONVERSION_INITS):
            return (
                f"init_lora_weights={shown(init, 40)} also changes the base weights: ΔW is the true update only if "
                "the adapter was saved with path_initial_model_for_weight_conversion"
            )
        return None


@dataclass(frozen=True)
class MlxAdapterConfig:
    """mlx-lm's ``adapter_config.json``: one ``lora_parameters.scale`` for every module.

    mlx-lm multiplies the update by ``scale`` itself (default 20), not by ``alpha / r``. Its releases before June 2024
    also stored ``lora_parameters.alpha`` and used ``scale · alpha / rank``; such configs are read that way.
    """

    rank: int = 8
    scale: float = 20.0
    fine_tune_type: str = "lora"
    raw: Mapping[str, Any] = field(default_factory=dict)
    use_dora: bool = False
    alpha: float | None = None  # the pre-June-2024 lora_parameters.alpha, when present

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str) -> MlxAdapterConfig:
        """Validate ``fine_tune_type`` and ``lora_parameters``; everything else is kept in ``raw``."""
        kind = raw.get("fine_tune_type", "lora")
        if kind not in ("lora", "dora"):
            raise LoraFormatError(
                f"{where}: mlx-lm adapter with fine_tune_type {shown(kind, 30)}: only lora and dora adapters are "
                "low-rank (a full fine-tune stores whole weights)"
            )
        params = raw.get("lora_parameters")
        if not isinstance(params, dict):
            raise LoraFormatError(f"{where}: mlx-lm adapter config has no lora_parameters object (rank, scale)")
        rank = int(_number(params.get("rank", 8), "lora_parameters.rank", where, integer=True))
        scale = _number(params.get("scale", 20.0), "lora_parameters.scale", where)
        alpha = None
        if "alpha" in params:
            alpha = _number(params["alpha"], "lora_parameters.alpha", where)
            scale = scale * alpha / rank
        return cls(rank, scale, kind, dict(raw), use_dora=kind == "dora", alpha=alpha)

    def conversion_warning(self) -> str | None:
        """mlx-lm has no initialisation that changes the base weights."""
        return None


AdapterConfig = PeftAdapterConfig | MlxAdapterConfig


def _number(value: Any, name: str, where: str, integer: bool = False) -> float:
    if isinstance(value, HugeNumber):
        raise LoraFormatError(f"{where}: {name} must be a number of reasonable size, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LoraFormatError(f"{where}: {name} must be a number, got {shown(value, 40)}")
    if (isinstance(value, int) and abs(value) > 2**53) or not math.isfinite(value):
        raise LoraFormatError(f"{where}: {name} must be a finite number of reasonable size, got {shown(value, 40)}")
    if integer and (value != int(value) or value < 1):
        raise LoraFormatError(f"{where}: {name} must be a positive integer, got {shown(value, 40)}")
    return float(value)


def is_mlx_config(raw: Mapping[str, Any]) -> bool:
    """Whether a parsed ``adapter_config.json`` is mlx-lm's (``lora_parameters`` and no ``peft_type``)."""
    return "peft_type" not in raw and ("lora_parameters" in raw or "fine_tune_type" in raw)


def read_adapter_config(path: Path, limits: ReadLimits | None = None) -> AdapterConfig:
    """Read a PEFT or mlx-lm ``adapter_config.json`` with ``json`` only, refusing files over the size cap."""
    limits = limits or ReadLimits()
    where = path.name
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limits.max_config_bytes:
            raise LoraFormatError(f"{where}: {size:,} bytes, over the limit of {limits.max_config_bytes:,}")
        text = fh.read(limits.max_config_bytes + 1)
    if len(text) > limits.max_config_bytes:  # it grew after the size check
        raise LoraFormatError(f"{where}: over the limit of {limits.max_config_bytes:,} bytes")
    return _parsed_config(text, where, limits)


@functools.lru_cache(maxsize=64)
def _parsed_config(text: bytes, where: str, limits: ReadLimits) -> AdapterConfig:
    """The config that ``text`` holds, parsed once per distinct text: the adapters of one training run share one
    config, and a shared config compiles its rank/alpha pattern sets once. Configs are frozen (their ``raw`` is
    copied into each LoRA's metadata); a refused text raises each time (exceptions are not cached)."""
    raw = parse_json(text, where, limits)
    if not isinstance(raw, dict):
        raise LoraFormatError(f"{where}: expected a JSON object")
    if is_mlx_config(raw):
        return MlxAdapterConfig.from_dict(raw, where)
    return PeftAdapterConfig.from_dict(raw, where, limits)


def diffusers_component_configs(
    metadata: Mapping[str, str], where: str, limits: ReadLimits
) -> dict[str, PeftAdapterConfig]:
    """Per-component configs from diffusers' ``lora_adapter_metadata`` (``{"unet.r": 4, "unet.lora_alpha": …}``).

    diffusers' ``save_lora_weights(unet_lora_adapter_metadata=…, text_encoder_lora_adapter_metadata=…)`` prefixes each
    LoraConfig field with its component (``unet``, ``transformer``, ``text_encoder``, ``text_encoder_2``…).
    """
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return {}
    packed = parse_json(text, f"{where}: lora_adapter_metadata", limits)
    if not isinstance(packed, dict):
        raise LoraFormatError(f"{where}: lora_adapter_metadata is not a JSON object")
    components: dict[str, dict[str, Any]] = {}
    for key, value in packed.items():
        component, _, field_name = str(key).partition(".")
        if field_name:
            components.setdefault(component, {})[field_name] = value
    return {
        c: PeftAdapterConfig.from_dict(raw, f"{where} ({c} lora_adapter_metadata)", limits)
        for c, raw in components.items()
    }
