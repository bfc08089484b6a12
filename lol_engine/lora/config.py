"""PEFT ``adapter_config.json`` (and diffusers ``lora_adapter_metadata``): parsed with ``json`` only, size-capped,
with the user-supplied ``rank_pattern`` / ``alpha_pattern`` regexes length-capped and matched under a time budget."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex

from lol_engine.errors import LoraFormatError
from lol_engine.lora.safe_io import ReadLimits

__all__ = ["PeftAdapterConfig", "diffusers_component_configs", "read_adapter_config"]

_CONVERSION_INITS = ("pissa", "olora", "corda", "loftq", "eva")


@dataclass(frozen=True)
class PeftAdapterConfig:
    """The fields of a PEFT LoRA config that decide each module's rank and scale."""

    r: int = 8
    lora_alpha: float = 8.0
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    peft_type: str = "LORA"
    raw: Mapping[str, Any] = field(default_factory=dict)
    limits: ReadLimits = field(default_factory=ReadLimits)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str, limits: ReadLimits | None = None) -> PeftAdapterConfig:
        """Validate the fields that matter; everything else is kept in ``raw`` as information."""
        limits = limits or ReadLimits()
        peft_type = str(raw.get("peft_type") or "LORA").upper()
        if peft_type != "LORA":
            raise LoraFormatError(f"{where}: peft_type is {peft_type!r}; only LORA adapters (ΔW = B A) are read")
        r = _number(raw.get("r", 8), "r", where, integer=True)
        alpha = _number(raw.get("lora_alpha", 8), "lora_alpha", where)
        rank_pattern = _patterns(raw.get("rank_pattern"), "rank_pattern", where, limits, integer=True)
        alpha_pattern = _patterns(raw.get("alpha_pattern"), "alpha_pattern", where, limits, integer=False)
        return cls(
            r=int(r),
            lora_alpha=float(alpha),
            use_rslora=bool(raw.get("use_rslora", False)),
            use_dora=bool(raw.get("use_dora", False)),
            rank_pattern={k: int(v) for k, v in rank_pattern.items()},
            alpha_pattern=alpha_pattern,
            peft_type=peft_type,
            raw=dict(raw),
            limits=limits,
        )

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """The configured ``(r, lora_alpha)`` of ``module``: the first matching pattern key wins, as in PEFT."""
        r = self._lookup(self.rank_pattern, module, self.r)
        alpha = self._lookup(self.alpha_pattern, module, self.lora_alpha)
        return int(r), float(alpha)

    def scale(self, module: str, rank: int) -> tuple[float, float]:
        """``(alpha, scale)`` of a module whose factors have rank ``rank``: ``alpha/r`` or ``alpha/√r`` (rsLoRA)."""
        _, alpha = self.rank_alpha(module)
        return alpha, alpha / (math.sqrt(rank) if self.use_rslora else rank)

    def conversion_warning(self) -> str | None:
        """A warning when the adapter was initialised in a way that also changed the base weights."""
        init = self.raw.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_CONVERSION_INITS):
            return (
                f"init_lora_weights={init!r} also changes the base weights: ΔW is the true update only if the adapter "
                "was saved with path_initial_model_for_weight_conversion"
            )
        return None

    def _lookup(self, patterns: Mapping[str, float], module: str, default: float) -> float:
        for key, value in patterns.items():
            try:
                hit = regex.match(rf"(.*\.)?({key})$", module, timeout=self.limits.pattern_timeout_s)
            except TimeoutError:
                raise LoraFormatError(f"pattern {key!r} took too long to match {module!r}; refusing it") from None
            if hit:
                return value
        return default


def _number(value: Any, name: str, where: str, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise LoraFormatError(f"{where}: {name} must be a number, got {value!r}")
    if integer and (value != int(value) or value < 1):
        raise LoraFormatError(f"{where}: {name} must be a positive integer, got {value!r}")
    return float(value)


def _patterns(value: Any, name: str, where: str, limits: ReadLimits, integer: bool) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LoraFormatError(f"{where}: {name} must be an object, got {type(value).__name__}")
    out = {}
    for key, number in value.items():
        if len(key) > limits.max_pattern_chars:
            raise LoraFormatError(
                f"{where}: {name} key of {len(key)} chars is over the cap of {limits.max_pattern_chars}"
            )
        try:
            regex.compile(key)
        except regex.error as exc:
            raise LoraFormatError(f"{where}: {name} key {key!r} is not a valid regular expression ({exc})") from None
        out[key] = _number(number, f"{name}[{key!r}]", where, integer=integer)
    return out


def read_adapter_config(path: Path, limits: ReadLimits | None = None) -> PeftAdapterConfig:
    """Read ``adapter_config.json`` with ``json`` only, refusing files over ``limits.max_config_bytes``."""
    limits = limits or ReadLimits()
    where = path.name
    size = path.stat().st_size
    if size > limits.max_config_bytes:
        raise LoraFormatError(f"{where}: {size:,} bytes, over the limit of {limits.max_config_bytes:,}")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraFormatError(f"{where}: not valid UTF-8 JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise LoraFormatError(f"{where}: expected a JSON object")
    return PeftAdapterConfig.from_dict(raw, where, limits)


def diffusers_component_configs(
    metadata: Mapping[str, str], where: str, limits: ReadLimits
) -> dict[str, PeftAdapterConfig]:
    """Per-component configs from diffusers' ``lora_adapter_metadata`` (``{"unet.r": 4, "unet.lora_alpha": …}``)."""
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return {}
    try:
        packed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LoraFormatError(f"{where}: lora_adapter_metadata is not valid JSON ({exc.msg})") from None
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
