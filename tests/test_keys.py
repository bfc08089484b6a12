"""Real key names of every supported format → canonical module name, format and factors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_files import factors, pair, save

from lol_engine import LoraFormatError, load_lora
from lol_engine.lora.keys import classify_key
from lol_engine.lora.vocab import KOHYA_PREFIXES, vocabulary

SD = "down_blocks.0.attentions.0.transformer_blocks.0"

# (case id, stem, A suffix, B suffix, metadata, expected canonical name, expected format)
CASES = [
    ("peft-llm", "base_model.model.model.layers.0.self_attn.q_proj", ".lora_A.weight", ".lora_B.weight", None,
     "model.layers.0.self_attn.q_proj", "peft"),
    ("peft-bert", "base_model.model.encoder.layer.0.attention.self.query", ".lora_A.weight", ".lora_B.weight",
     None, "encoder.layer.0.attention.self.query", "peft"),
    ("peft-bert-head", "base_model.model.bert.encoder.layer.0.attention.self.query", ".lora_A.weight",
     ".lora_B.weight", None, "encoder.layer.0.attention.self.query", "peft"),
    ("peft-bert-head-pooler", "base_model.model.bert.pooler.dense", ".lora_A.weight", ".lora_B.weight", None,
     "pooler.dense", "peft"),
    ("st-whole", "base_model.model.0.model.encoder.layer.5.intermediate.dense", ".lora_A.weight", ".lora_B.weight",
     None, "encoder.layer.5.intermediate.dense", "peft"),
    ("st-whole-before-6", "base_model.model.0.auto_model.encoder.layer.5.output.dense", ".lora_A.weight",
     ".lora_B.weight", None, "encoder.layer.5.output.dense", "peft"),
    ("st-transformer-module", "base_model.model.model.encoder.layer.1.attention.output.dense", ".lora_A.weight",
     ".lora_B.weight", None, "encoder.layer.1.attention.output.dense", "peft"),
    ("st-transformer-module-before-6", "base_model.model.auto_model.encoder.layer.1.attention.self.value",
     ".lora_A.weight", ".lora_B.weight", None, "encoder.layer.1.attention.self.value", "peft"),
    ("bart-kept", "base_model.model.model.encoder.layers.0.self_attn.q_proj", ".lora_A.weight", ".lora_B.weight",
     None, "model.encoder.layers.0.self_attn.q_proj", "peft"),
    ("vit-kept", "base_model.model.vit.encoder.layer.0.attention.attention.query", ".lora_A.weight",
     ".lora_B.weight", None, "vit.encoder.layer.0.attention.attention.query", "peft"),
    ("vit-under-model-kept", "base_model.model.model.encoder.layer.0.attention.attention.query", ".lora_A.weight",
     ".lora_B.weight", None, "model.encoder.layer.0.attention.attention.query", "peft"),
    ("bert-head-classifier-kept", "base_model.model.classifier", ".lora_A.weight", ".lora_B.weight", None,
     "classifier", "peft"),
    ("bert-wrapper-twice-kept", "base_model.model.bert.bert.encoder.layer.0.attention.self.query", ".lora_A.weight",
     ".lora_B.weight", None, "bert.bert.encoder.layer.0.attention.self.query", "peft"),
    ("mobilenet-under-model-kept", "base_model.model.model.features.2.conv.0.0", ".lora_A.weight", ".lora_B.weight",
     None, "model.features.2.conv.0.0", "peft"),
    ("peft-unstripped-adapter-name", "base_model.model.model.layers.1.mlp.down_proj", ".lora_A.default.weight",
     ".lora_B.default.weight", None, "model.layers.1.mlp.down_proj", "peft"),
    ("peft-no-weight-suffix", "base_model.model.model.layers.1.mlp.up_proj", ".lora_A", ".lora_B", None,
     "model.layers.1.mlp.up_proj", "peft"),
    ("kohya-sd1-unet", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", ".lora_down.weight",
     ".lora_up.weight", None, f"{SD}.attn1.to_q", "kohya"),
    ("kohya-sd1-to_out", "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0",
     ".lora_down.weight", ".lora_up.weight", None, "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0",
     "kohya"),
    ("kohya-sd1-ff", "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj", ".lora_down.weight",
     ".lora_up.weight", None, "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj", "kohya"),
    ("kohya-sd1-te", "lora_te_text_model_encoder_layers_0_self_attn_q_proj", ".lora_down.weight", ".lora_up.weight",
     None, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "kohya"),
    ("kohya-sdxl-unet", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", ".lora_down.weight",
     ".lora_up.weight", None, "input_blocks.4.1.transformer_blocks.0.attn1.to_q", "kohya"),
    ("kohya-sdxl-te1", "lora_te1_text_model_encoder_layers_11_mlp_fc2", ".lora_down.weight", ".lora_up.weight",
     None, "text_encoder.text_model.encoder.layers.11.mlp.fc2", "kohya"),
    ("kohya-sdxl-te2", "lora_te2_text_model_encoder_layers_31_mlp_fc1", ".lora_down.weight", ".lora_up.weight",
     None, "text_encoder_2.text_model.encoder.layers.31.mlp.fc1", "kohya"),
    ("kohya-flux-double", "lora_unet_double_blocks_0_img_attn_qkv", ".lora_down.weight", ".lora_up.weight", None,
     "double_blocks.0.img_attn.qkv", "kohya"),
    ("kohya-flux-single", "lora_unet_single_blocks_37_linear2", ".lora_down.weight", ".lora_up.weight", None,
     "single_blocks.37.linear2", "kohya"),
    ("kohya-flux-t5", "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0", ".lora_down.weight",
     ".lora_up.weight", None, "text_encoder_3.encoder.block.0.layer.1.DenseReluDense.wi_0", "kohya"),
    ("kohya-names-with-lora_A", "lora_unet_down_blocks_0_attentions_0_proj_in", ".lora_A.weight", ".lora_B.weight",
     None, "down_blocks.0.attentions.0.proj_in", "kohya"),
    ("lycoris-locon", "lora_unet_down_blocks_0_attentions_0_proj_out", ".lora_down.weight", ".lora_up.weight",
     {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "locon"}'},
     "down_blocks.0.attentions.0.proj_out", "lycoris"),
    ("diffusers-peft-unet", f"unet.{SD}.attn2.to_k", ".lora_A.weight", ".lora_B.weight", None, f"{SD}.attn2.to_k",
     "diffusers-peft"),
    ("diffusers-peft-te", "text_encoder.text_model.encoder.layers.2.self_attn.v_proj", ".lora_A.weight",
     ".lora_B.weight", None, "text_encoder.text_model.encoder.layers.2.self_attn.v_proj", "diffusers-peft"),
    ("diffusers-peft-te2", "text_encoder_2.text_model.encoder.layers.2.self_attn.out_proj", ".lora_A.weight",
     ".lora_B.weight", None, "text_encoder_2.text_model.encoder.layers.2.self_attn.out_proj", "diffusers-peft"),
    ("diffusers-peft-flux", "transformer.single_transformer_blocks.0.attn.to_q", ".lora_A.weight",
     ".lora_B.weight", None, "single_transformer_blocks.0.attn.to_q", "diffusers-peft"),
    ("diffusers-processor", f"unet.{SD}.attn1.processor.to_q", "_lora.down.weight", "_lora.up.weight", None,
     f"{SD}.attn1.to_q", "diffusers"),
    ("diffusers-processor-to_out", f"unet.{SD}.attn1.processor.to_out", "_lora.down.weight", "_lora.up.weight",
     None, f"{SD}.attn1.to_out.0", "diffusers"),
    ("diffusers-processor-te", "text_encoder.text_model.encoder.layers.0.self_attn.to_q", "_lora.down.weight",
     "_lora.up.weight", None, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "diffusers"),
    ("diffusers-new", "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v", ".lora.down.weight",
     ".lora.up.weight", None, "mid_block.attentions.0.transformer_blocks.0.attn2.to_v", "diffusers"),
    ("diffusers-new-te", "text_encoder.text_model.encoder.layers.0.self_attn.k_proj",
     ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight", None,
     "text_encoder.text_model.encoder.layers.0.self_attn.k_proj", "diffusers"),
    ("comfyui-diffusion_model", "diffusion_model.blocks.0.self_attn.q", ".lora_A.weight", ".lora_B.weight", None,
     "blocks.0.self_attn.q", "comfyui"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("stem", "a_suffix", "b_suffix", "metadata", "name", "fmt"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_key_table(
    tmp_path: Path, stem: str, a_suffix: str, b_suffix: str, metadata: dict | None, name: str, fmt: str
) -> None:
    a, b = factors(3, 10, 7, seed=1)
    path = save(tmp_path / "x.safetensors", pair(stem, a_suffix, b_suffix, a, b), metadata)
    lora = load_lora(path)
    assert lora.names == (name,)
    assert lora.meta.format == fmt
    module = lora[name]
    torch.testing.assert_close(module.a, a)  # lora_down / lora_A is A: (r, d_in), unchanged
    torch.testing.assert_close(module.b, b)  # lora_up / lora_B is B: (d_out, r)
    assert (module.spec.rank, module.spec.d_in, module.spec.d_out) == (3, 10, 7)


def test_kohya_and_diffusers_names_agree(tmp_path: Path) -> None:
    """The same SD1 module written by kohya and by diffusers gets one canonical name."""
    a, b = factors(2, 8, 6)
    stem = "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0"
    k = load_lora(save(tmp_path / "k.safetensors", pair(stem, ".lora_down.weight", ".lora_up.weight", a, b)))
    d_stem = "unet.down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0"
    d = load_lora(save(tmp_path / "d.safetensors", pair(d_stem, ".lora_A.weight", ".lora_B.weight", a, b)))
    assert k.names == d.names


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("lora_unet_x.lora_down.weight", ("lora_unet_x", ".lora_down.weight")),
        ("a.b.lora_A.default.weight", ("a.b", ".lora_A.default.weight")),
        ("a.to_q_lora.down.weight", ("a.to_q", "_lora.down.weight")),
        ("diffusion_model.x.weight", None),  # 'diff' inside a prefix is not the LyCORIS '.diff' key
        ("x.hada_w1_a", ("x", ".hada_w1_a")),
        ("base_model.model.classifier.weight", None),
    ],
)
def test_classify_key_matches_whole_trailing_components(key: str, expected: tuple[str, str] | None) -> None:
    assert classify_key(key) == expected


def test_vocabularies_have_no_collisions_and_cover_prefixes() -> None:
    for kp in KOHYA_PREFIXES:
        for name in kp.vocabularies:
            assert len(vocabulary(name)) > 100  # generating raises on a collision


def test_unknown_kohya_module_kept_with_warning(tmp_path: Path) -> None:
    a, b = factors(2, 8, 6)
    path = save(
        tmp_path / "x.safetensors", pair("lora_unet_some_new_block_proj", ".lora_down.weight", ".lora_up.weight", a, b)
    )
    lora = load_lora(path)
    assert lora.names == ("some_new_block_proj",)
    assert any("no known vocabulary" in w for w in lora.meta.warnings)


def test_wrapped_and_plain_bert_module_in_one_file_is_refused(tmp_path: Path) -> None:
    """``bert.encoder.…`` and ``encoder.…`` both resolve to one module: refused, never silently merged."""
    a, b = factors(2, 8, 8)
    stem = "encoder.layer.0.attention.self.query"
    tensors = pair(f"base_model.model.bert.{stem}", ".lora_A.weight", ".lora_B.weight", a, b)
    tensors |= pair(f"base_model.model.{stem}", ".lora_A.weight", ".lora_B.weight", a.clone(), b.clone())
    with pytest.raises(LoraFormatError, match="both name module"):
        load_lora(save(tmp_path / "x.safetensors", tensors))
