"""Round trips, scale rules, conv/Tucker/embedding/DoRA layouts, family detection and metadata."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lora_files import factors, kohya, pair, peft, save, write_config

from lol_engine import LoraFormatError, inspect_lora, load_lora

LLM = "base_model.model.model.layers.{}.self_attn.{}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["F32", "F16", "BF16"])
def test_round_trip_every_float_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    a, b = factors(4, 16, 12)
    a, b = a.to(dtype), b.to(dtype)
    stem = LLM.format(0, "q_proj")
    lora = load_lora(save(tmp_path / "x.safetensors", pair(stem, ".lora_A.weight", ".lora_B.weight", a, b)))
    module = lora["model.layers.0.self_attn.q_proj"]
    assert module.a.dtype == torch.float32
    torch.testing.assert_close(module.a, a.float(), rtol=0, atol=0)
    torch.testing.assert_close(module.b, b.float(), rtol=0, atol=0)
    assert lora.meta.dtype == {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]


def test_modules_are_in_natural_order(tmp_path: Path) -> None:
    tensors = {}
    for layer in (10, 2, 1):
        tensors |= peft(LLM.format(layer, "q_proj"), seed=layer)
    lora = load_lora(save(tmp_path / "x.safetensors", tensors))
    assert [n.split(".")[2] for n in lora.names] == ["1", "2", "10"]


@pytest.mark.parametrize(
    ("alpha", "extra", "expected_scale", "expected_alpha"),
    [
        (2.0, {}, 0.5, 2.0),  # alpha / r
        (None, {}, 1.0, 4.0),  # missing alpha means alpha = r
        (0.0, {}, 1.0, 4.0),  # alpha 0 means alpha = r too
        (8.0, {"scale": 0.3}, 0.3, None),  # A1111: an explicit .scale overrides alpha / r
    ],
)
def test_kohya_scale_rules(tmp_path: Path, alpha, extra, expected_scale, expected_alpha) -> None:
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = kohya(stem, rank=4, alpha=alpha)
    if "scale" in extra:
        tensors[stem + ".scale"] = torch.tensor(extra["scale"])
    module = load_lora(save(tmp_path / "x.safetensors", tensors))[0]
    assert module.scale == pytest.approx(expected_scale)
    assert module.alpha == (None if expected_alpha is None else pytest.approx(expected_alpha))
    torch.testing.assert_close(module.delta_weight(), expected_scale * module.b @ module.a)


def _peft_folder(tmp_path: Path, **config) -> Path:
    tensors = peft(LLM.format(0, "q_proj"), rank=4) | peft(LLM.format(0, "v_proj"), rank=2, d_out=4, seed=1)
    save(tmp_path / "adapter_model.safetensors", tensors)
    write_config(tmp_path, **config)
    return tmp_path


def test_peft_config_scale_and_folder(tmp_path: Path) -> None:
    folder = _peft_folder(tmp_path, r=4, lora_alpha=16, rank_pattern={"v_proj": 2})
    lora = load_lora(folder)
    assert lora.meta.format == "peft"
    assert lora.scales == (16 / 4, 16 / 2)
    assert lora.meta.adapter_config["lora_alpha"] == 16
    assert not lora.meta.warnings


def test_peft_config_found_next_to_file(tmp_path: Path) -> None:
    _peft_folder(tmp_path, r=4, lora_alpha=8, rank_pattern={"v_proj": 2})
    assert load_lora(tmp_path / "adapter_model.safetensors").scales == (2.0, 4.0)


def test_peft_rslora(tmp_path: Path) -> None:
    lora = load_lora(_peft_folder(tmp_path, r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 2}))
    assert lora.scales == pytest.approx((8 / math.sqrt(4), 8 / math.sqrt(2)))


def test_peft_alpha_pattern_first_match_wins(tmp_path: Path) -> None:
    config = dict(
        r=4, lora_alpha=4, rank_pattern={"v_proj": 2}, alpha_pattern={"layers.0.self_attn.v_proj": 6, "v_proj": 1}
    )
    lora = load_lora(_peft_folder(tmp_path, **config))
    assert lora.scales == (1.0, 3.0)


def test_peft_config_rank_mismatch_is_flagged(tmp_path: Path) -> None:
    lora = load_lora(_peft_folder(tmp_path, r=4, lora_alpha=4))  # v_proj has rank 2, config says 4
    assert any("config says r=4 but the factors have rank 2" in w for w in lora.meta.warnings)


def test_peft_without_config_assumes_scale_one(tmp_path: Path) -> None:
    lora = load_lora(save(tmp_path / "adapter_model.safetensors", peft(LLM.format(0, "q_proj"))))
    assert lora.scales == (1.0,)
    assert any("no adapter_config.json" in w for w in lora.meta.warnings)


def test_peft_conversion_init_is_flagged(tmp_path: Path) -> None:
    lora = load_lora(_peft_folder(tmp_path, r=4, lora_alpha=4, rank_pattern={"v_proj": 2}, init_lora_weights="pissa"))
    assert any("pissa" in w for w in lora.meta.warnings)


def test_diffusers_adapter_metadata_scales(tmp_path: Path) -> None:
    stem_u = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    stem_t = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "text_encoder.r": 4, "text_encoder.lora_alpha": 2}
    tensors = peft(stem_u, rank=4) | peft(stem_t, rank=4, seed=1)
    lora = load_lora(
        save(tmp_path / "pytorch_lora_weights.safetensors", tensors, {"lora_adapter_metadata": json.dumps(meta)})
    )
    assert dict(zip(lora.names, lora.scales, strict=True)) == {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2.0,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": 0.5,
    }


def test_conv_locon_is_flattened(tmp_path: Path) -> None:
    stem = "lora_unet_down_blocks_0_resnets_0_conv1"
    a, b = factors(4, 5, 6, kernel=(3, 3))  # down (4, 5, 3, 3), up (6, 4, 1, 1)
    tensors = pair(stem, ".lora_down.weight", ".lora_up.weight", a, b) | {stem + ".alpha": torch.tensor(2.0)}
    module = load_lora(save(tmp_path / "x.safetensors", tensors))[0]
    assert (module.spec.kind, module.spec.d_in, module.spec.d_out, module.spec.orig_shape) == (
        "conv",
        45,
        6,
        (6, 5, 3, 3),
    )
    expected = 0.5 * torch.einsum("or,rchw->ochw", b[:, :, 0, 0], a)  # ΔW of the conv, computed directly
    torch.testing.assert_close(module.delta_weight(reshape=True), expected)


def test_tucker_lora_mid_is_contracted(tmp_path: Path) -> None:
    stem = "lora_unet_up_blocks_1_resnets_0_conv2"
    gen = torch.Generator().manual_seed(3)
    down, mid, up = (
        torch.randn(3, 5, 1, 1, generator=gen),
        torch.randn(3, 3, 3, 3, generator=gen),
        torch.randn(7, 3, 1, 1, generator=gen),
    )
    tensors = {stem + ".lora_down.weight": down, stem + ".lora_mid.weight": mid, stem + ".lora_up.weight": up}
    lora = load_lora(save(tmp_path / "x.safetensors", tensors))
    module = lora[0]
    assert lora.meta.format == "lycoris"
    assert module.spec.orig_shape == (7, 5, 3, 3)
    # ΔW[o, c, h, w] = Σ_a Σ_b up[o, a] mid[a, b, h, w] down[b, c]: down → mid (k×k conv) → up
    expected = torch.einsum("oa,abhw,bc->ochw", up[:, :, 0, 0], mid, down[:, :, 0, 0])
    torch.testing.assert_close(module.delta_weight(reshape=True), expected)


def test_peft_embedding_layout(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 50, generator=gen), torch.randn(8, 2, generator=gen)  # A (r, num_embeddings), B (dim, r)
    stem = "base_model.model.embed_tokens"
    tensors = {stem + ".lora_embedding_A": a, stem + ".lora_embedding_B": b}
    module = load_lora(save(tmp_path / "x.safetensors", tensors))[0]
    assert (module.spec.kind, module.spec.orig_shape) == ("embedding", (50, 8))
    torch.testing.assert_close(module.delta_weight(reshape=True), (b @ a).T)


def test_peft_dora_magnitude(tmp_path: Path) -> None:
    stem = LLM.format(0, "q_proj")
    tensors = peft(stem, rank=2, d_in=8, d_out=6) | {stem + ".lora_magnitude_vector": torch.rand(6) + 0.5}
    lora = load_lora(save(tmp_path / "x.safetensors", tensors))
    assert lora.meta.is_dora
    assert lora[0].magnitude_axis == "out" and lora[0].magnitude.shape == (6,)


def test_kohya_dora_scale_on_input_axis(tmp_path: Path) -> None:
    stem = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    tensors = kohya(stem, rank=2, d_in=8, d_out=6) | {stem + ".dora_scale": torch.rand(1, 8)}
    lora = load_lora(save(tmp_path / "x.safetensors", tensors))
    assert lora.meta.is_dora and lora[0].magnitude_axis == "in"


def test_modules_to_save_and_norms_are_skipped_and_reported(tmp_path: Path) -> None:
    tensors = peft(LLM.format(0, "q_proj")) | {"base_model.model.score.weight": torch.randn(3, 16)}
    tensors |= {"lora_unet_mid_block_attentions_0_norm.w_norm": torch.randn(12)}
    lora = load_lora(save(tmp_path / "x.safetensors", tensors))
    assert len(lora) == 1
    assert set(lora.meta.skipped_keys) == {
        "base_model.model.score.weight",
        "lora_unet_mid_block_attentions_0_norm.w_norm",
    }
    assert any("2 tensor(s) are not LoRA factors" in w for w in lora.meta.warnings)


def test_lora_bias_is_reported_not_read(tmp_path: Path) -> None:
    stem = LLM.format(0, "q_proj")
    lora = load_lora(save(tmp_path / "x.safetensors", peft(stem) | {stem + ".lora_B.bias": torch.randn(12)}))
    assert lora.meta.skipped_keys == (stem + ".lora_B.bias",)
    assert any("lora_bias" in w for w in lora.meta.warnings)


def test_metadata_is_extracted(tmp_path: Path) -> None:
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "None",
        "ss_v2": "False",
        "ss_tag_frequency": json.dumps({"10_cat": {"cat": 12, "sofa": 3}}),
        "ss_base_model_version": "sdxl_base_v1-0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.title": "my cat",
    }
    stem = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    lora = load_lora(save(tmp_path / "x.safetensors", kohya(stem, d_in=2048), metadata))
    meta = lora.meta
    assert (
        meta.kohya["ss_network_dim"] == 4 and meta.kohya["ss_network_alpha"] is None and meta.kohya["ss_v2"] is False
    )
    assert meta.kohya["ss_tag_frequency"] == {"10_cat": {"cat": 12, "sofa": 3}}
    assert meta.modelspec == {"architecture": "stable-diffusion-xl-v1-base/lora", "title": "my cat"}
    assert meta.base_family == "sdxl"
    assert len(meta.sha256) == 64 and meta.size_bytes == (tmp_path / "x.safetensors").stat().st_size


SD_ATTN2_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.mark.parametrize(
    ("tensors", "metadata", "family"),
    [
        (kohya(SD_ATTN2_K, d_in=768, d_out=320), None, "sd1"),
        (kohya(SD_ATTN2_K, d_in=1024, d_out=320), None, "sd2"),
        (kohya("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", d_in=2048), None, "sdxl"),
        (kohya("lora_unet_double_blocks_0_img_attn_qkv"), None, "flux"),
        (kohya("lora_unet_joint_blocks_0_x_block_attn_qkv"), None, "sd3"),
        (peft(LLM.format(0, "q_proj")), None, "llm-decoder"),
        (peft("base_model.model.encoder.layer.0.attention.self.query"), None, "bert-encoder"),
        (kohya("lora_te2_text_model_encoder_layers_0_self_attn_q_proj"), None, "sdxl"),
        (kohya("lora_te_text_model_encoder_layers_0_self_attn_q_proj", d_in=768), None, "sd1"),
        (kohya("lora_unet_some_block"), {"ss_base_model_version": "flux1"}, "flux"),
        (peft("base_model.model.thing"), None, "unknown"),
    ],
    ids=["sd1", "sd2", "sdxl", "flux", "sd3", "llm", "bert", "sdxl-te", "sd1-te", "metadata", "unknown"],
)
def test_family_detection(tmp_path: Path, tensors, metadata, family: str) -> None:
    lora = load_lora(save(tmp_path / "x.safetensors", tensors, metadata))
    assert lora.meta.base_family == family
    assert lora.meta.family_evidence


def test_family_metadata_disagreement_is_warned(tmp_path: Path) -> None:
    lora = load_lora(
        save(tmp_path / "x.safetensors", kohya(SD_ATTN2_K, d_in=768), {"ss_base_model_version": "sdxl_base_v1-0"})
    )
    assert lora.meta.base_family == "sdxl"
    assert any("metadata says sdxl but the modules look like sd1" in w for w in lora.meta.warnings)


def test_inspect_reads_no_factor_data(tmp_path: Path) -> None:
    """inspect_lora sees spec and scales; it never reads the factors, so NaN factors go unnoticed there."""
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors = kohya(stem, rank=4, alpha=1.0)
    tensors[stem + ".lora_down.weight"][0, 0] = float("nan")
    path = save(tmp_path / "x.safetensors", tensors)
    summary = inspect_lora(path)
    assert summary.spec.ranks == (4,) and summary.scales == (0.25,)
    with pytest.raises(LoraFormatError, match="NaN/Inf"):
        load_lora(path)


def test_deterministic_writer_round_trips(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from lol_engine.lora.safe_io import read_header, write_safetensors

    tensors = {
        "b.weight": torch.randn(3, 2).to(torch.bfloat16),
        "a.weight": torch.randn(2, 5).half(),
        "alpha": torch.tensor(4, dtype=torch.int64),
        "z": torch.randn(4, 2, 1, 1, dtype=torch.float64),
    }
    meta_one = {"b": "2", "a": "1", "c": "3"}
    meta_two = {"c": "3", "a": "1", "b": "2"}
    write_safetensors(tensors, tmp_path / "one.safetensors", meta_one)
    write_safetensors(dict(reversed(tensors.items())), tmp_path / "two.safetensors", meta_two)
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    back = load_file(str(tmp_path / "one.safetensors"))
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor)
    assert read_header(tmp_path / "one.safetensors").metadata == meta_one
