"""Base-model family detection with evidence: metadata first, then block vocabulary, then widths."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from lol_engine.spec import LayerSpec

__all__ = ["FAMILIES", "detect_family", "module_family"]

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux", "llm-decoder", "bert-encoder", "unknown")

_KOHYA_VERSIONS = (("sdxl", "sdxl"), ("sd_v1", "sd1"), ("sd_v2", "sd2"), ("sd3", "sd3"), ("flux", "flux"))
_ARCHITECTURES: tuple[tuple[str, str], ...] = (
    ("stable-diffusion-xl", "sdxl"),
    ("stable-diffusion-v1", "sd1"),
    ("stable-diffusion-v2", "sd2"),
    ("stable-diffusion-3", "sd3"),
    ("flux", "flux"),
)
_MODEL_NAMES = (
    (r"xl|sdxl", "sdxl"),
    (r"stable-diffusion-v1|sd-?1[._-]?[45]|stable-diffusion-v-?1", "sd1"),
    (r"stable-diffusion-2|sd-?2", "sd2"),
    (r"stable-diffusion-3|sd-?3", "sd3"),
    (r"flux", "flux"),
    (r"qwen|llama|mistral|gemma|phi|gpt|opt-|falcon|smollm|pythia|tinyllama|deepseek", "llm-decoder"),
    (r"bert|minilm|roberta|mpnet|electra|e5-|bge-", "bert-encoder"),
)


def _from_metadata(
    kohya: Mapping[str, Any], modelspec: Mapping[str, str], config: Mapping[str, Any], lol: Mapping[str, str]
) -> tuple[str, str] | None:
    if lol.get("lol.base_family"):  # written by lol-explorer's own zoo generator
        return lol["lol.base_family"], f"metadata lol.base_family={lol['lol.base_family']} (lol-explorer zoo)"
    version = str(kohya.get("ss_base_model_version") or "").lower()
    for needle, family in _KOHYA_VERSIONS:
        if version.startswith(needle):
            return family, f"metadata ss_base_model_version={version}"
    architecture = str(modelspec.get("architecture") or "").lower()
    for needle, family in _ARCHITECTURES:
        if architecture.startswith(needle):
            return family, f"metadata modelspec.architecture={architecture}"
    if kohya.get("ss_v2") is True:
        return "sd2", "metadata ss_v2=True"
    field = "base_model_name_or_path" if config.get("base_model_name_or_path") else "model"  # mlx-lm: "model"
    base = str(config.get(field) or "").lower()[:200]
    for pattern, family in _MODEL_NAMES:
        if base and re.search(pattern, base):
            return family, f"adapter_config {field}={base}"
    return None


def module_family(layers: Sequence[LayerSpec]) -> tuple[str, tuple[str, ...]]:
    """The family the module names and widths alone suggest, with evidence; ``"unknown"`` when none does."""
    family, evidence = _from_structure(layers)
    return family, tuple(evidence)


def _from_structure(layers: Sequence[LayerSpec]) -> tuple[str, list[str]]:
    names = [layer.name for layer in layers]
    by_suffix = {layer.name: layer for layer in layers}
    text = "\n".join(n.replace("\n", " ") for n in names)  # one line per module: one search per pattern

    def any_has(pattern: str) -> bool:
        return re.search(pattern, text, re.MULTILINE) is not None

    cross = [layer.d_in for n, layer in by_suffix.items() if re.search(r"attn2\.to_[kv]$", n)]
    width = f"cross-attention attn2.to_k/to_v d_in = {cross[0]}" if cross else ""
    if any_has(r"^(input_blocks|middle_block|output_blocks)\."):
        family = "sdxl" if not cross or cross[0] == 2048 else {768: "sd1", 1024: "sd2"}.get(cross[0], "sdxl")
        return family, ["module names: input_blocks/middle_block/output_blocks (SGM UNet naming)"] + (
            [width] if width else []
        )
    if any_has(r"^(down_blocks|mid_block|up_blocks)\."):
        evidence = ["module names: down_blocks/mid_block/up_blocks (diffusers UNet naming)"]
        if cross:
            return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(cross[0], "unknown"), [*evidence, width]
        proj_in = [layer for layer in layers if layer.name.endswith("proj_in")]
        if proj_in:
            conv = proj_in[0].kind == "conv"
            return ("sd1" if conv else "sd2"), [
                *evidence,
                f"proj_in is {'a 1x1 conv (SD1)' if conv else 'linear (SD2+)'}",
            ]
        return "sd1", [*evidence, "no cross-attention or proj_in module to tell SD1 from SD2; assuming SD1"]
    if any_has(r"^(double_blocks|single_blocks)\.") or (
        any_has(r"^transformer_blocks\.") and any_has(r"^single_transformer_blocks\.")
    ):
        return "flux", ["module names: double/single blocks (Flux DiT)"]
    if any_has(r"^joint_blocks\."):
        return "sd3", ["module names: joint_blocks (SD3 MMDiT)"]
    if any_has(r"encoder\.layer\.\d+\.attention\.self\.(query|key|value)$"):
        return "bert-encoder", ["module names: encoder.layer.N.attention.self.{query,key,value} (BERT-like)"]
    if any_has(r"^text_encoder_2\."):
        return "sdxl", ["module names: text_encoder and text_encoder_2 only (SDXL text encoders)"]
    te = [
        layer.d_in for layer in layers if re.search(r"^text_encoder\..*(self_attn\.[qkv]_proj|mlp\.fc1)$", layer.name)
    ]
    if te:
        return {768: "sd1", 1024: "sd2"}.get(te[0], "unknown"), [f"text encoder only, hidden width {te[0]}"]
    if any_has(r"(^|\.)layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$"):
        return "llm-decoder", ["module names: layers.N.self_attn.{q,k,v,o}_proj / mlp (decoder LLM)"]
    return "unknown", ["no known module vocabulary"]


def detect_family(
    layers: Sequence[LayerSpec],
    kohya: Mapping[str, Any],
    modelspec: Mapping[str, str],
    config: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
    *,
    structure: tuple[str, tuple[str, ...]] | None = None,
) -> tuple[str, tuple[str, ...], list[str]]:
    """Return ``(family, evidence, warnings)``. Metadata wins; a disagreeing structure is reported as a warning.

    ``structure``: :func:`module_family` of ``layers``, when already known.
    """
    structural, evidence = structure if structure is not None else module_family(layers)
    meta = _from_metadata(kohya, modelspec, config, metadata or {})
    if meta is None:
        return structural, tuple(evidence), []
    family, why = meta
    warnings = []
    if structural not in ("unknown", family):
        warnings.append(f"metadata says {family} but the modules look like {structural} ({'; '.join(evidence)})")
    return family, (why, *evidence), warnings
