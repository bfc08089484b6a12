"""What a LoRA file says about itself, besides its factors: the format's name, decoded kohya ``ss_*`` and
``modelspec.*`` metadata, and what an unreadable key layout looks like instead.

Everything here is information: junk in it (a 5,000-digit ``ss_network_dim``, an ``ss_tag_frequency`` nested 10⁵
levels deep) is kept as text with a warning, never a reason to refuse the LoRA.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from lol_engine.errors import LoraFormatError
from lol_engine.lora.keys import NameOrigin
from lol_engine.lora.safe_io import ReadLimits, parse_json

__all__ = ["Notes", "decode_kohya", "format_name", "unknown_layout"]


class Notes:
    """Warnings about many modules, folded into one line per kind (a 20,000-module file gives a few lines)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._modules: dict[str, list[str]] = {}

    def module(self, kind: str, name: str) -> None:
        self._modules.setdefault(kind, []).append(name)

    def fold(self) -> list[str]:
        out = list(self.lines)
        for kind, names in self._modules.items():
            more = f" (and {len(names) - 1:,} more)" if len(names) > 1 else ""
            out.append(f"module {names[0]}: {kind}{more}")
        return out


def format_name(origins: Iterable[NameOrigin], kohya: Mapping[str, Any], has_mid: bool) -> str:
    """The file's format from where its modules' names came from, e.g. ``"kohya"``."""
    lycoris = "lycoris" in str(kohya.get("ss_network_module", "")) or has_mid
    formats = set()
    for origin in origins:
        if origin.naming == "kohya" or origin.source == "kohya":
            formats.add("lycoris" if lycoris else "kohya")
        elif origin.naming in ("diffusers", "cloneofsimo"):
            formats.add(origin.naming)
        elif origin.naming == "mlx":
            formats.add("mlx-lm")
        else:
            formats.add({"diffusers": "diffusers-peft", "comfyui": "comfyui"}.get(origin.source, "peft"))
    if formats == {"diffusers", "diffusers-peft"}:  # diffusers' own converter leaves non-attention keys as lora_A/B
        return "diffusers"
    return "+".join(sorted(formats))


def _finite(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict | list):
            stack.extend(item.values() if isinstance(item, dict) else item)
    return True


_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?")


def decode_kohya(key: str, value: str, limits: ReadLimits, warnings: list[str]) -> Any:
    """kohya stores every ``ss_*`` value as a string: "None", "True", numbers and JSON structures are decoded.

    A value that does not decode cleanly (too deep, a number too long, a non-finite number) stays text, with a
    warning.
    """
    if value in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[value]
    if not (value[:1] in "{[" or _NUMBER.fullmatch(value)):
        return value
    try:
        decoded = parse_json(value, f"metadata {key}", limits)
    except LoraFormatError as exc:
        if value[:1] in "{[":  # a structure kohya wrote: worth a warning when it is junk
            warnings.append(f"{exc}; kept as text")
        elif _NUMBER.fullmatch(value):
            warnings.append(f"metadata {key} is a number of {len(value):,} characters; kept as text")
        return value
    if not _finite(decoded):
        warnings.append(f"metadata {key} holds a non-finite or over-long number; kept as text")
        return value
    return decoded


# Files that are safetensors but no LoRA, recognised by their keys.
_NOT_LORA = (
    (
        re.compile(r"^(model\.diffusion_model|first_stage_model|cond_stage_model|conditioner)\."),
        "a full Stable Diffusion checkpoint",
    ),
    (re.compile(r"^(emb_params|string_to_param|clip_l|clip_g|<[^>]+>)$"), "a textual-inversion embedding"),
    (re.compile(r"^(model\.)?(layers|h|blocks)\.\d+\..*\.(weight|bias)$"), "a full model's weights"),
)


def unknown_layout(keys: list[str], where: str) -> str:
    """The refusal for a file in which no key is a LoRA factor: what it looks like, or which suffixes are known."""
    sample = ", ".join(repr(k[:80]) for k in sorted(keys)[:3]) or "none"
    for pattern, what in _NOT_LORA:
        if keys and all(pattern.search(k) for k in keys[:1000]):
            return f"{where}: no LoRA modules: this looks like {what} (keys such as {sample}), not a LoRA"
    return (
        f"{where}: no LoRA modules found (unknown key layout: none of the {len(keys):,} keys ends in a known LoRA "
        "suffix such as .lora_A.weight, .lora_down.weight, .lora.down.weight, .lora_linear_layer.down.weight, "
        f".lora_a (mlx-lm) or :down (cloneofsimo); first keys: {sample})"
    )
