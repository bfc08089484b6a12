"""A JSON-ready description of a loaded LoRA: what ``lol inspect --json`` prints and the app shows."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lol_engine.errors import LoraFormatError
from lol_engine.lora.metadata import TOP_TAGS, one_line, training_parameters, trigger_words
from lol_engine.lora.safe_io import ReadLimits, safetensors_hashes
from lol_engine.lora.weights import LoraMetadata, LoraWeights
from lol_engine.symmetry import lora_singular_values

__all__ = ["CARD_FACTS_VERSION", "ENERGY_LEVELS", "block_of", "card_facts", "describe", "effective_rank"]

_MAX_TEXT = 2000  # metadata strings longer than this are shortened in reports (thumbnails, tag lists)


def _short(value: Any) -> Any:
    """Metadata made fit for a report: long strings shortened, non-finite numbers as text (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str) and len(value) > _MAX_TEXT:
        return value[:_MAX_TEXT] + f"…[{len(value) - _MAX_TEXT:,} more chars]"
    if isinstance(value, dict):
        return {str(k): _short(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_short(v) for v in value]
    return value


ENERGY_LEVELS = (0.9, 0.99)  # effective rank: the smallest k holding this share of Σσ²
EFFECTIVE_RANK_CRITERION = (
    "effective_rank_90 / _99: the smallest k with σ₁² + … + σ_k² ≥ 0.90 (0.99) · Σσ², the share of ‖ΔW‖_F² kept "
    "by the best rank-k approximation; kohya resize_lora.py --dynamic_method sv_fro with --dynamic_param √0.90 "
    "(√0.99) picks the same k, except that it never keeps all r (sv_fro keeps a share of ‖ΔW‖_F, not of its square)"
)


def effective_rank(singular_values: Sequence[float], energy: float) -> int:
    """The smallest ``k`` whose top-``k`` singular values hold at least ``energy`` of ``Σσ²`` (0 for ΔW = 0).

    >>> effective_rank([3.0, 1.0, 0.0], 0.9), effective_rank([3.0, 1.0, 0.0], 0.99), effective_rank([0.0], 0.9)
    (1, 2, 0)
    """
    squares = sorted((float(s) ** 2 for s in singular_values), reverse=True)
    total = sum(squares)
    if not total > 0:
        return 0
    kept = 0.0
    for k, square in enumerate(squares, start=1):
        kept += square
        if kept >= energy * total * (1 - 1e-12):  # rounding must not push a full spectrum past its own rank
            return k
    return len(squares)


# Blocks of the canonical module names (lora/keys.py, lora/vocab.py), first match wins: (pattern, order). The block
# is the matched prefix; ``order`` puts text encoders first, then a UNet's down, mid and up blocks in depth order.
_BLOCK_RULES: tuple[tuple[re.Pattern[str], int], ...] = tuple(
    (re.compile(pattern), order)
    for pattern, order in (
        (r"^(text_encoder(?:_\d)?)\.(?:.*?\.)?(?:layers|layer|block)\.(\d+)\.", 0),
        (r"^(text_encoder(?:_\d)?)\.", 0),
        (r"^(down_blocks|input_blocks)\.(\d+)\.", 1),
        (r"^(mid_block|middle_block)\.", 2),
        (r"^(up_blocks|output_blocks)\.(\d+)\.", 3),
        (r"^(double_blocks|joint_blocks|transformer_blocks)\.(\d+)\.", 4),
        (r"^(single_blocks|single_transformer_blocks)\.(\d+)\.", 5),
        (r"^((?:.*?\.)?(?:layers|layer|h|blocks|block))\.(\d+)\.", 6),  # LLMs and encoders: model.layers.3
    )
)


def block_of(name: str) -> tuple[str, tuple[int, str, int]]:
    """The block a canonical module name belongs to, and a sort key (text encoders, down, mid, up, layers…).

    >>> block_of("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")[0]
    'down_blocks.1'
    >>> block_of("text_encoder.text_model.encoder.layers.11.mlp.fc1")[0], block_of("model.layers.3.mlp.up_proj")[0]
    ('text_encoder.layers.11', 'model.layers.3')
    """
    for pattern, order in _BLOCK_RULES:
        match = pattern.match(name)
        if match:
            groups = match.groups()
            if len(groups) == 1:
                return groups[0], (order, groups[0], -1)
            label = f"{groups[0]}.layers.{groups[1]}" if order == 0 else f"{groups[0]}.{groups[1]}"
            return label, (order, groups[0], int(groups[1]))
    head = name.split(".", 1)[0]
    return head, (7, head, -1)


def _block_strength(names: Sequence[str], norms: Mapping[str, float]) -> list[dict[str, Any]]:
    """‖ΔW‖_F per block: the norm of all its modules' updates together, √(Σ ‖ΔW_m‖_F²)."""
    blocks: dict[str, tuple[tuple[int, str, int], list[float]]] = {}
    for name in names:
        label, key = block_of(name)
        blocks.setdefault(label, (key, []))[1].append(float(norms[name]))
    ordered = sorted(blocks.items(), key=lambda item: item[1][0])
    return [
        {"block": label, "n_modules": len(values), "delta_fro_norm": math.sqrt(sum(v * v for v in values))}
        for label, (_, values) in ordered
    ]


_HEX = re.compile(r"[0-9a-fA-F]{8,128}")


def _hashes(meta: LoraMetadata, limits: ReadLimits, warnings: list[str]) -> dict[str, Any]:
    """The hashes LoRAs are looked up by: AutoV2 (Civitai, A1111) and the kohya/A1111 hash of the tensor bytes.

    The addnet hash is the one :func:`~lol_engine.lora.parse.load_lora` computed over the bytes it read; else (a LoRA
    read some other way) it is computed here, in one more streamed pass over the file, which must still be the bytes
    that were read (its sha256 is checked). ``sshs_model_hash`` (written by kohya at save time over the same bytes) is
    compared with it.
    """
    addnet = meta.data_sha256 or None  # load_lora hashed the data buffer as it read it
    source = Path(meta.source) if meta.source and addnet is None else None
    if source is not None and source.is_file() and meta.sha256:
        try:
            full, data = safetensors_hashes(source, limits.max_file_bytes)
        except (LoraFormatError, OSError) as exc:
            warnings.append(f"the kohya/A1111 LoRA hash could not be computed ({exc})")
        else:
            if full == meta.sha256:
                addnet = data
            else:
                warnings.append("the file changed after it was read; its kohya/A1111 LoRA hash is not shown")
    stored = meta.safetensors_metadata.get("sshs_model_hash")
    stored_hex = stored.strip().lower() if isinstance(stored, str) and _HEX.fullmatch(stored.strip()) else None
    matches = None if stored_hex is None or addnet is None else stored_hex == addnet
    if matches is False:
        warnings.append(
            f"metadata sshs_model_hash {stored_hex[:16] if stored_hex else ''}… is not the hash of this file's tensor "
            f"data ({addnet[:16] if addnet else ''}…): the weights changed after kohya saved them, or the metadata "
            "came from another file"
        )
    legacy = meta.safetensors_metadata.get("sshs_legacy_hash")
    return {
        "autov2": meta.sha256[:10] if meta.sha256 else None,
        "addnet_sha256": addnet,
        "addnet_shorthash": addnet[:12] if addnet else None,
        "sshs_model_hash": stored_hex,
        "sshs_legacy_hash": legacy if isinstance(legacy, str) and _HEX.fullmatch(legacy.strip()) else None,
        "sshs_model_hash_matches": matches,
    }


def describe(lora: LoraWeights, limits: ReadLimits | None = None) -> dict[str, Any]:
    """Everything ``lol inspect`` reports. Norms and singular values are of the *scaled* update ``scale·B·A``.

    Besides the spectra and metadata: the lookup hashes (``autov2``, ``addnet_sha256``: from the read, else one more
    pass over the file at ``lora.meta.source``, bounded by ``limits.max_file_bytes``), ``trigger_words``,
    ``training_parameters``, each module's ``effective_rank_90`` / ``effective_rank_99`` and ``block_strength``.
    """
    spectra = lora_singular_values(lora)
    modules: list[dict[str, Any]] = []
    norms: dict[str, float] = {}
    for m in lora:
        sigma = spectra[m.name].tolist()
        norms[m.name] = math.sqrt(math.fsum(s * s for s in sigma))  # ‖ΔW‖_F² = Σ σ², from the spectra already made
        modules.append(
            {
                "name": m.name,
                "kind": m.spec.kind,
                "rank": m.spec.rank,
                "alpha": m.alpha,
                "scale": m.scale,
                "d_in": m.spec.d_in,
                "d_out": m.spec.d_out,
                "orig_shape": list(m.spec.orig_shape),
                "delta_fro_norm": float(norms[m.name]),
                "singular_values": sigma,
                "dora_magnitude": m.magnitude_axis,
                **{f"effective_rank_{round(level * 100)}": effective_rank(sigma, level) for level in ENERGY_LEVELS},
            }
        )
    total = sum(float(n) ** 2 for n in norms.values()) ** 0.5
    meta = lora.meta
    warnings = list(meta.warnings)
    hashes = _hashes(meta, limits or ReadLimits(), warnings)
    triggers = trigger_words(meta.kohya, meta.modelspec, warnings)
    return {
        "source": meta.source,
        "format": meta.format,
        "base_family": meta.base_family,
        "evidence": list(meta.family_evidence),
        "dtype": meta.dtype,
        "n_modules": len(lora),
        "ranks": sorted({m.spec.rank for m in lora}),
        "is_dora": meta.is_dora,
        "modules": modules,
        "total_delta_fro_norm": total,
        "sha256": meta.sha256,
        "size_bytes": meta.size_bytes,
        "skipped_keys": list(meta.skipped_keys),
        "kohya_metadata": _short(dict(meta.kohya)),
        "modelspec": _short(dict(meta.modelspec)),
        "adapter_config": _short(dict(meta.adapter_config)),
        **hashes,
        "trigger_words": triggers,
        "training_parameters": training_parameters(meta.kohya, meta.adapter_config),
        "effective_rank_criterion": EFFECTIVE_RANK_CRITERION,
        "block_strength": _block_strength([m.name for m in lora], {k: float(v) for k, v in norms.items()}),
        "warnings": list(dict.fromkeys(warnings)),
    }


# ------------------------------------------------------------------------------------------- what a card keeps
CARD_FACTS_VERSION = 1
MAX_OTHER_METADATA = 96  # ss_*, modelspec.* and adapter_config fields besides the parameters table
MAX_BLOCKS = 256  # blocks of block_strength kept (a hostile file may name 20,000 "layers")
MAX_LINES = 50  # evidence and warnings kept
_KEY_CHARS, _VALUE_CHARS, _LINE_CHARS = 100, 200, 300
_HASH_KEYS = (
    "sha256",
    "autov2",
    "addnet_sha256",
    "addnet_shorthash",
    "sshs_model_hash",
    "sshs_legacy_hash",
    "sshs_model_hash_matches",
)


def _datasets(value: list[Any]) -> str:
    """kohya's ``ss_datasets`` (one object per dataset, its tag counts included) as a line: images, resolution,
    batch size and subsets of each."""
    parts = []
    for dataset in value[:8]:
        if not isinstance(dataset, dict):
            continue
        fields = (
            ("num_train_images", "{} images"),
            ("resolution", "resolution {}"),
            ("batch_size_per_device", "batch {}"),
            ("num_reg_images", "{} regularisation images"),
        )
        bits = [form.format(one_line(dataset[key], 40)) for key, form in fields if dataset.get(key) not in (None, 0)]
        if isinstance(dataset.get("subsets"), list):
            bits.append(f"{len(dataset['subsets'])} subset(s)")
        parts.append(", ".join(bits) or "?")
    return f"{len(value)} dataset(s): " + "; ".join(parts)


def _readable(key: str, value: Any) -> Any:
    """kohya's structured fields as a line a person reads (never a dump of nested objects); others as they are."""
    if key == "ss_dataset_dirs" and isinstance(value, dict):
        return "; ".join(
            f"{folder}: {d.get('n_repeats', '?')} repeats × {d.get('img_count', '?')} images"
            for folder, d in list(value.items())[:32]
            if isinstance(d, dict)
        )
    if key == "ss_datasets" and isinstance(value, list):
        return _datasets(value)
    if key == "ss_bucket_info" and isinstance(value, dict):
        buckets = value.get("buckets")
        error = value.get("mean_img_ar_error")
        n = f"{len(buckets)} aspect-ratio buckets" if isinstance(buckets, dict) else "aspect-ratio buckets"
        return n + (f", mean aspect error {error:.3g}" if isinstance(error, int | float) else "")
    if key == "modelspec.thumbnail":  # an image as a data URI: not text to show
        return "(an image; not kept)"
    return value


def _other_metadata(report: Mapping[str, Any]) -> list[dict[str, str]]:
    """``ss_*``, ``modelspec.*`` and ``adapter_config`` fields that the parameters table and trigger words leave out,
    as ``{"key", "value"}`` one-line texts (at most :data:`MAX_OTHER_METADATA`; structures summarised by
    :func:`_readable`, else compact JSON; a thumbnail is not kept)."""
    tabled = {p["key"] for p in report.get("training_parameters", [])} | {"ss_tag_frequency"}
    pairs: list[tuple[str, Any]] = [
        (str(k), v) for k, v in sorted(report.get("kohya_metadata", {}).items()) if k not in tabled
    ]
    pairs += [(f"modelspec.{k}", v) for k, v in sorted(report.get("modelspec", {}).items())]
    pairs += [
        (f"adapter_config.{k}", v)
        for k, v in sorted(report.get("adapter_config", {}).items())
        if k not in tabled and v not in (None, "", [], {})
    ]
    return [
        {"key": one_line(key, _KEY_CHARS), "value": one_line(_readable(key, value), _VALUE_CHARS)}
        for key, value in pairs[:MAX_OTHER_METADATA]
    ]


def _scales(report: Mapping[str, Any]) -> list[float]:
    values = [float(m["scale"]) for m in report.get("modules", [])]
    return [min(values), max(values)] if values else list(report.get("scales", []))


def card_facts(report: Mapping[str, Any]) -> dict[str, Any]:
    """What a LoRA's card shows about its file, taken from its :func:`describe` report: bounded, strict JSON.

    Everything but the per-module spectra: format, base family and its evidence, dtype, modules, ranks, the range of
    scales, size, DoRA, ‖ΔW‖_F, the lookup hashes, trigger words (top tags with their counts), the training
    parameters (``{"key", "value"}``: :func:`lol_engine.lora.metadata.training_parameters` names them), strength
    per block (at most :data:`MAX_BLOCKS`) and the other ``ss_*`` / ``modelspec.*`` / ``adapter_config`` fields (at
    most :data:`MAX_OTHER_METADATA`, one line of at most 200 characters each). The store keeps it, so that a stored
    LoRA's card needs no file. Its size is bounded whatever the file holds (about 100 kB at most); every text in it
    is the file's, untrusted.

    A dict made by :func:`card_facts` gives the same dict again (the store's copy can be passed back in).
    """
    words = report.get("trigger_words") or {}
    blocks = list(report.get("block_strength", []))
    total = report.get("total_delta_fro_norm")
    facts: dict[str, Any] = {
        "version": CARD_FACTS_VERSION,
        "format": one_line(report.get("format", "unknown"), _KEY_CHARS),
        "base_family": one_line(report.get("base_family", "unknown"), _KEY_CHARS),
        "evidence": [one_line(e, _LINE_CHARS) for e in list(report.get("evidence", []))[:MAX_LINES]],
        "dtype": one_line(report.get("dtype", ""), _KEY_CHARS),
        "n_modules": int(report.get("n_modules", 0)),
        "ranks": [int(r) for r in report.get("ranks", [])][:MAX_BLOCKS],
        "scales": _scales(report),
        "size_bytes": int(report.get("size_bytes", 0)),
        "is_dora": bool(report.get("is_dora", False)),
        "total_delta_fro_norm": None if total is None else float(total),
        **{key: report.get(key) for key in _HASH_KEYS},
        "trigger_words": {
            "output_name": None if words.get("output_name") is None else one_line(words["output_name"], _VALUE_CHARS),
            "trigger_phrase": None
            if not words.get("trigger_phrase")
            else one_line(words["trigger_phrase"], _VALUE_CHARS),
            "top_tags": [
                {"tag": one_line(t["tag"], _VALUE_CHARS), "count": int(t["count"])}
                for t in list(words.get("top_tags", []))[:TOP_TAGS]
            ],
            "n_tags": int(words.get("n_tags", 0)),
        },
        "training_parameters": [  # key and value: the names and meanings are lol_engine.lora.metadata's
            {"key": one_line(p["key"], _KEY_CHARS), "value": one_line(p["value"], _VALUE_CHARS)}
            for p in list(report.get("training_parameters", []))[:MAX_OTHER_METADATA]
        ],
        "block_strength": [
            {
                "block": one_line(b["block"], _KEY_CHARS),
                "n_modules": int(b["n_modules"]),
                "delta_fro_norm": float(b["delta_fro_norm"]),
            }
            for b in blocks[:MAX_BLOCKS]
        ],
        "n_blocks": int(report.get("n_blocks", len(blocks))),
        "other_metadata": list(report["other_metadata"]) if "other_metadata" in report else _other_metadata(report),
        "warnings": [one_line(w, _LINE_CHARS) for w in list(report.get("warnings", []))[:MAX_LINES]],
    }
    return facts
