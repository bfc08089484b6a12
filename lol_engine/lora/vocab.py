"""Module vocabularies of known base architectures, for resolving kohya names without splitting on ``_``.

kohya writes ``lora_name = (prefix + "." + module_path).replace(".", "_")``. Module paths contain underscores
(``transformer_blocks``, ``to_q``), so the mapping back is a lookup: generate every module path of each known
architecture, map ``path.replace(".", "_") -> path`` and look each stem up (ComfyUI's loaders work the same way).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import NamedTuple

__all__ = ["KOHYA_PREFIXES", "KohyaPrefix", "resolve_kohya_name", "vocabulary"]


class KohyaPrefix(NamedTuple):
    prefix: str  # e.g. "lora_te2_"
    component: str  # canonical name prefix, "" for the denoiser
    vocabularies: tuple[str, ...]  # names of vocabularies to look the rest up in


# Longest prefixes first, so "lora_te1_" wins over "lora_te_".
KOHYA_PREFIXES: tuple[KohyaPrefix, ...] = (
    KohyaPrefix("lora_prior_unet_", "prior.", ()),
    KohyaPrefix("lora_prior_te_", "text_encoder.", ("clip",)),
    KohyaPrefix("lora_unet_", "", ("sd_unet", "sgm_unet", "flux", "sd3")),
    KohyaPrefix("lora_te1_", "text_encoder.", ("clip",)),
    KohyaPrefix("lora_te2_", "text_encoder_2.", ("clip",)),
    KohyaPrefix("lora_te3_", "text_encoder_3.", ("t5",)),
    KohyaPrefix("lora_te_", "text_encoder.", ("clip",)),
)


def _transformer_2d(prefix: str, n_blocks: int = 10) -> Iterator[str]:
    """Children of a diffusers Transformer2DModel / SGM SpatialTransformer."""
    yield f"{prefix}.proj_in"
    yield f"{prefix}.proj_out"
    for t in range(n_blocks):
        block = f"{prefix}.transformer_blocks.{t}"
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                yield f"{block}.{attn}.{proj}"
        yield f"{block}.ff.net.0.proj"
        yield f"{block}.ff.net.2"


def _resnet_diffusers(prefix: str) -> Iterator[str]:
    for child in ("conv1", "conv2", "time_emb_proj", "conv_shortcut"):
        yield f"{prefix}.{child}"


def _sd_unet() -> Iterator[str]:
    """diffusers UNet2DConditionModel (SD1, SD2, SDXL in diffusers naming)."""
    for i in range(4):
        for j in range(3):
            yield from _transformer_2d(f"down_blocks.{i}.attentions.{j}")
            yield from _resnet_diffusers(f"down_blocks.{i}.resnets.{j}")
            yield from _transformer_2d(f"up_blocks.{i}.attentions.{j}")
            yield from _resnet_diffusers(f"up_blocks.{i}.resnets.{j}")
        yield f"down_blocks.{i}.downsamplers.0.conv"
        yield f"up_blocks.{i}.upsamplers.0.conv"
    yield from _transformer_2d("mid_block.attentions.0")
    for j in range(2):
        yield from _resnet_diffusers(f"mid_block.resnets.{j}")
    yield from ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
    yield from ("add_embedding.linear_1", "add_embedding.linear_2")


def _resnet_sgm(prefix: str) -> Iterator[str]:
    for child in ("in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection"):
        yield f"{prefix}.{child}"


def _sgm_unet() -> Iterator[str]:
    """SGM / LDM UNet (SDXL as kohya names it; also original SD1 checkpoints)."""
    yield "input_blocks.0.0"
    for i in range(12):
        yield from _resnet_sgm(f"input_blocks.{i}.0")
        yield f"input_blocks.{i}.0.op"
        yield from _transformer_2d(f"input_blocks.{i}.1")
        yield from _resnet_sgm(f"output_blocks.{i}.0")
        yield from _transformer_2d(f"output_blocks.{i}.1")
        yield f"output_blocks.{i}.1.conv"
        yield f"output_blocks.{i}.2.conv"
    yield from _resnet_sgm("middle_block.0")
    yield from _transformer_2d("middle_block.1")
    yield from _resnet_sgm("middle_block.2")
    yield from ("out.2", "time_embed.0", "time_embed.2", "label_emb.0.0", "label_emb.0.2")


def _flux() -> Iterator[str]:
    """Black Forest Labs' Flux DiT naming, as kohya's networks.lora_flux uses it."""
    for i in range(19):
        for stream in ("img", "txt"):
            for child in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2", "mod.lin"):
                yield f"double_blocks.{i}.{stream}_{child}"
    for i in range(38):
        for child in ("linear1", "linear2", "modulation.lin"):
            yield f"single_blocks.{i}.{child}"
    yield from ("img_in", "txt_in", "final_layer.linear", "final_layer.adaLN_modulation.1")
    for emb in ("time_in", "vector_in", "guidance_in"):
        yield f"{emb}.in_layer"
        yield f"{emb}.out_layer"


def _sd3() -> Iterator[str]:
    """SD3 MMDiT naming, as kohya's networks.lora_sd3 uses it."""
    for i in range(38):
        for stream in ("x_block", "context_block"):
            for child in (
                "attn.qkv",
                "attn.proj",
                "attn2.qkv",
                "attn2.proj",
                "mlp.fc1",
                "mlp.fc2",
                "adaLN_modulation.1",
            ):
                yield f"joint_blocks.{i}.{stream}.{child}"
    yield from ("x_embedder.proj", "context_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2")
    yield from ("y_embedder.mlp.0", "y_embedder.mlp.2", "final_layer.linear", "final_layer.adaLN_modulation.1")


def _clip() -> Iterator[str]:
    """CLIP text transformers (CLIP-L, OpenCLIP-H, OpenCLIP-bigG) in transformers naming."""
    for i in range(32):
        layer = f"text_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield f"{layer}.self_attn.{proj}"
        yield f"{layer}.mlp.fc1"
        yield f"{layer}.mlp.fc2"
    yield "text_projection"


def _t5() -> Iterator[str]:
    """T5 encoders (T5-XXL in SD3 and Flux) in transformers naming."""
    for i in range(24):
        for proj in ("q", "k", "v", "o"):
            yield f"encoder.block.{i}.layer.0.SelfAttention.{proj}"
        for proj in ("wi", "wi_0", "wi_1", "wo"):
            yield f"encoder.block.{i}.layer.1.DenseReluDense.{proj}"


_GENERATORS = {"sd_unet": _sd_unet, "sgm_unet": _sgm_unet, "flux": _flux, "sd3": _sd3, "clip": _clip, "t5": _t5}


@cache
def vocabulary(name: str) -> dict[str, str]:
    """``{underscored_path: path}`` for one architecture vocabulary; raises if two paths collide."""
    table: dict[str, str] = {}
    for path in _GENERATORS[name]():
        key = path.replace(".", "_")
        if table.setdefault(key, path) != path:
            raise AssertionError(f"vocabulary {name}: {path!r} and {table[key]!r} share the kohya name {key!r}")
    return table


def resolve_kohya_name(stem: str) -> tuple[str, str | None] | None:
    """Map a kohya stem such as ``lora_te1_text_model_encoder_layers_0_mlp_fc1`` to a canonical module name.

    Returns ``(canonical_name, vocabulary_name)``, with ``vocabulary_name`` None when the prefix is known but the
    module is in no vocabulary (the name is then kept as written, minus the prefix). Returns None when the stem has
    no kohya prefix.

    >>> resolve_kohya_name("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0")
    ('down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0', 'sd_unet')
    >>> resolve_kohya_name("lora_unet_double_blocks_3_img_attn_qkv")
    ('double_blocks.3.img_attn.qkv', 'flux')
    """
    for kp in KOHYA_PREFIXES:
        if stem.startswith(kp.prefix):
            rest = stem[len(kp.prefix) :]
            for vocab in kp.vocabularies:
                path = vocabulary(vocab).get(rest)
                if path is not None:
                    return kp.component + path, vocab
            return kp.component + rest, None
    return None
