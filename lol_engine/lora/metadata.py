"""What a LoRA file says about itself, besides its factors: the format's name, decoded kohya ``ss_*`` and
``modelspec.*`` metadata, and what an unreadable key layout looks like instead.

Everything here is information: junk in it (a 5,000-digit ``ss_network_dim``, an ``ss_tag_frequency`` nested 10⁵
levels deep) is kept as text with a warning, never a reason to refuse the LoRA.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from lol_engine.errors import LoraFormatError
from lol_engine.lora.keys import NameOrigin
from lol_engine.lora.safe_io import ReadLimits, parse_json

__all__ = [
    "Notes",
    "decode_kohya",
    "format_name",
    "one_line",
    "training_parameters",
    "trigger_words",
    "unknown_layout",
]


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


# ------------------------------------------------------------------------------------ what Civitai-style cards show
MAX_TAG_ENTRIES = 20_000  # (folder, tag) pairs of ss_tag_frequency walked; a real one has hundreds to a few thousand
MAX_TAG_CHARS = 200  # longer "tags" are skipped (captions pasted whole, junk)
MAX_VALUE_CHARS = 200  # a training parameter's shown value
TOP_TAGS = 20


def _count(value: Any) -> int | None:
    """A tag count as kohya writes it (a non-negative int), or None for anything else (bools, floats, huge)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    return None


def trigger_words(kohya: Mapping[str, Any], modelspec: Mapping[str, Any], warnings: list[str]) -> dict[str, Any]:
    """The words people prompt a LoRA with: kohya's ``ss_tag_frequency`` tags, most frequent first, and its names.

    ``ss_tag_frequency`` is ``{dataset folder: {tag: count}}`` (already JSON-decoded, depth-capped, by
    :func:`decode_kohya`); the folders are merged, at most :data:`MAX_TAG_ENTRIES` pairs are walked and tags over
    :data:`MAX_TAG_CHARS` characters are skipped, each with a warning. Junk never raises.
    """
    raw = kohya.get("ss_tag_frequency")
    counts: dict[str, int] = {}
    walked = skipped = 0
    if isinstance(raw, dict):
        for folder in raw.values():
            if not isinstance(folder, dict):
                skipped += 1
                continue
            for tag, value in folder.items():
                walked += 1
                if walked > MAX_TAG_ENTRIES:
                    break
                n = _count(value)
                text = tag.strip()
                if n is None or not text or len(text) > MAX_TAG_CHARS:
                    skipped += 1
                    continue
                counts[text] = counts.get(text, 0) + n
            if walked > MAX_TAG_ENTRIES:
                warnings.append(
                    f"metadata ss_tag_frequency lists more than {MAX_TAG_ENTRIES:,} tags; only the first were counted"
                )
                break
        if skipped:
            warnings.append(
                f"metadata ss_tag_frequency: {skipped:,} entries are not a tag of at most {MAX_TAG_CHARS} characters "
                "with a whole-number count; skipped"
            )
    elif raw is not None and not isinstance(raw, str):  # text: decode_kohya has already warned that it is junk
        warnings.append("metadata ss_tag_frequency is not a {folder: {tag: count}} object; no tags shown")
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_TAGS]
    output_name = kohya.get("ss_output_name")
    phrase = modelspec.get("trigger_phrase")
    return {
        "output_name": one_line(output_name) if output_name is not None else None,
        "trigger_phrase": one_line(phrase) if phrase else None,
        "top_tags": [{"tag": tag, "count": n} for tag, n in top],
        "n_tags": len(counts),
    }


def _utc(value: Any) -> str | None:
    """A Unix time (kohya's ``time.time()``) as a UTC date, or None if it is not a plausible one."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 2**34:
        return None
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def one_line(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """A metadata value as one line of at most ``limit`` characters (structures as compact JSON)."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict | list):
        text = json.dumps(value, separators=(",", ":"), default=str)[: limit + 1]
    else:
        text = str(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# (metadata key, readable name, what it means). Keys absent from a file are not listed.
_KOHYA_PARAMETERS = (
    ("ss_output_name", "output name", "the name the LoRA was saved under (often its trigger word)"),
    ("ss_sd_model_name", "base checkpoint", "the checkpoint it was trained on"),
    ("ss_base_model_version", "base model version", "kohya's name for the base architecture"),
    ("ss_network_module", "network module", "the adapter code (networks.lora = plain LoRA; lycoris.kohya = LyCORIS)"),
    ("ss_network_dim", "network dim", "the LoRA rank r"),
    ("ss_network_alpha", "network alpha", "α: the update is scaled by α / r"),
    ("ss_network_args", "network args", "extra adapter arguments (conv_dim, algo, …)"),
    ("ss_num_train_images", "training images", "images seen per epoch, repeats included"),
    ("ss_num_reg_images", "regularisation images", "class images used against overfitting"),
    ("ss_num_epochs", "epochs", "passes over the data planned"),
    ("ss_epoch", "epoch saved", "the epoch this file was saved at"),
    ("ss_max_train_steps", "max train steps", "optimiser steps planned"),
    ("ss_steps", "steps done", "optimiser steps done when this file was saved"),
    ("ss_batch_size_per_device", "batch size", "images per step and device"),
    ("ss_gradient_accumulation_steps", "gradient accumulation", "steps summed before each update"),
    ("ss_learning_rate", "learning rate", "the base learning rate"),
    ("ss_unet_lr", "UNet learning rate", "learning rate of the denoiser's LoRA modules"),
    ("ss_text_encoder_lr", "text encoder learning rate", "learning rate of the text encoder's modules"),
    ("ss_optimizer", "optimizer", "the optimiser and its arguments"),
    ("ss_lr_scheduler", "LR scheduler", "how the learning rate changes over training"),
    ("ss_lr_warmup_steps", "warm-up steps", "steps of learning-rate warm-up"),
    ("ss_resolution", "resolution", "training image size"),
    ("ss_mixed_precision", "mixed precision", "the precision of training arithmetic"),
    ("ss_clip_skip", "CLIP skip", "text-encoder layers skipped from the end (use the same when generating)"),
    ("ss_noise_offset", "noise offset", "extra noise for darker/brighter images"),
    ("ss_min_snr_gamma", "min-SNR γ", "loss weighting by signal-to-noise ratio"),
    ("ss_max_grad_norm", "max grad norm", "gradient clipping"),
    ("ss_caption_dropout_rate", "caption dropout", "share of captions dropped"),
    ("ss_shuffle_caption", "shuffle caption", "tags shuffled in each caption"),
    ("ss_keep_tokens", "keep tokens", "leading tags never shuffled"),
    ("ss_flip_aug", "flip augmentation", "images mirrored at random"),
    ("ss_seed", "seed", "the training seed"),
    ("ss_training_started_at", "training started", "when training started (UTC)"),
    ("ss_training_finished_at", "training finished", "when this file was saved (UTC)"),
    ("ss_training_comment", "training comment", "free text written by the trainer"),
)
_PEFT_PARAMETERS = (
    ("peft_type", "PEFT type", "the adapter kind"),
    ("task_type", "task type", "the model head it was trained for"),
    ("base_model_name_or_path", "base model", "the model it was trained on"),
    ("r", "r", "the LoRA rank"),
    ("lora_alpha", "lora_alpha", "α: the update is scaled by α / r (α / √r with rsLoRA)"),
    ("use_rslora", "rsLoRA", "scale α / √r instead of α / r"),
    ("use_dora", "DoRA", "weight-decomposed LoRA (a magnitude vector besides A, B)"),
    ("target_modules", "target modules", "the base modules that got a LoRA"),
    ("lora_dropout", "dropout", "dropout on the LoRA branch during training"),
    ("modules_to_save", "modules to save", "modules trained in full besides the LoRA"),
)


def training_parameters(kohya: Mapping[str, Any], adapter_config: Mapping[str, Any]) -> list[dict[str, str]]:
    """A readable table of how the LoRA was trained: kohya ``ss_*`` fields and PEFT config fields that are present.

    Each row is ``{"key", "name", "value", "meaning"}``; values are bounded one-line text, times are UTC dates.
    """
    rows = []
    for source, table in ((kohya, _KOHYA_PARAMETERS), (adapter_config, _PEFT_PARAMETERS)):
        for key, name, meaning in table:
            value = source.get(key)
            if value is None or value == "":
                continue
            shown = _utc(value) if key.endswith(("_started_at", "_finished_at")) else None
            rows.append({"key": key, "name": name, "value": shown or one_line(value), "meaning": meaning})
    return rows
