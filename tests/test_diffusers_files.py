"""Files written by diffusers' own writers and converters, from a tiny UNet built from a config (no downloads).

The same adapter is saved three ways (diffusers-PEFT with ``lora_adapter_metadata``, diffusers' kohya conversion and
its "new diffusers" conversion); every reading must give the same canonical modules and peft's own ΔW.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

from lol_engine import load_lora  # noqa: E402

RANK, ALPHA = 2, 6


def _tiny_unet() -> Any:
    """A tiny SD-style UNet from a config (cross-attention width 12), built with the current torch seed."""
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=2,
        norm_num_groups=4,
    )


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = _tiny_unet()
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False)
    model.add_adapter(config)
    return model


@pytest.fixture(scope="module")
def expected(unet) -> dict[str, torch.Tensor]:
    """peft's own unscaled ΔW per module: get_delta_weight / scaling = B A in the base weight's shape."""
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer):
            out[name] = (module.get_delta_weight("default") / module.scaling["default"]).detach()
    return out


def _check(path: Path, expected: dict[str, torch.Tensor], scale: float, fmt: str) -> None:
    lora = load_lora(path)
    assert lora.meta.format == fmt
    assert set(lora.names) == set(expected)
    for module in lora:
        assert module.scale == pytest.approx(scale), module.name
        torch.testing.assert_close(
            module.delta_weight(reshape=True), scale * expected[module.name], atol=1e-5, rtol=1e-4
        )
    kinds = {m.name.rsplit(".", 1)[-1]: m.spec.kind for m in lora}
    assert kinds["conv1"] == "conv" and kinds["proj_in"] == "conv" and kinds["to_q"] == "linear"


def test_diffusers_save_lora_weights_with_metadata(tmp_path: Path, unet, expected) -> None:
    layers = get_peft_model_state_dict(unet)
    metadata = {"r": RANK, "lora_alpha": ALPHA}
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata
    )
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    _check(tmp_path, expected, ALPHA / RANK, "diffusers-peft")


def test_diffusers_kohya_conversion(tmp_path: Path, unet, expected) -> None:
    layers = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    kohya = convert_state_dict_to_kohya(layers)
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in kohya)
    save_file(kohya, tmp_path / "kohya.safetensors")
    _check(tmp_path / "kohya.safetensors", expected, 1.0, "kohya")  # diffusers writes alpha = r


def test_diffusers_new_format_conversion(tmp_path: Path, unet, expected) -> None:
    layers = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    converted = convert_state_dict_to_diffusers(layers)
    assert any(k.endswith(".lora.down.weight") for k in converted)
    save_file(converted, tmp_path / "d.safetensors")
    _check(tmp_path / "d.safetensors", expected, 1.0, "diffusers")


# ---------------------------------------------------------------- per-component scales from lora_adapter_metadata
UNET_R, UNET_ALPHA, TE_R, TE_ALPHA = 4, 8, 2, 1  # scales 2 and 0.5: a module that borrows the other's is off by 4×


@pytest.fixture(scope="module")
def pipeline_parts():
    """A tiny UNet (r=4, α=8) and CLIP text encoder (r=2, α=1) with LoRA layers, as diffusers' training scripts
    build them (``add_adapter``), and peft's own ΔW of every module (``get_delta_weight``, scaling included)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    unet = _tiny_unet()
    unet_config = peft.LoraConfig(
        r=UNET_R, lora_alpha=UNET_ALPHA, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    unet.add_adapter(unet_config)
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            hidden_size=12,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=30,
            max_position_embeddings=8,
        )
    )
    te_config = peft.LoraConfig(
        r=TE_R, lora_alpha=TE_ALPHA, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], init_lora_weights=False
    )
    text_encoder = peft.inject_adapter_in_model(te_config, text_encoder)  # what add_adapter does, with any peft
    expected = {}
    for prefix, model in (("", unet), ("text_encoder.", text_encoder)):
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                expected[prefix + name] = (module.get_delta_weight("default").detach(), module.scaling["default"])
    return unet, text_encoder, unet_config, te_config, expected


@pytest.mark.parametrize("layout", ["diffusers-peft", "diffusers"], ids=["lora_A-B", "lora.down-lora_linear_layer"])
@pytest.mark.parametrize("covered", ["both", "unet only"])
def test_adapter_metadata_scales_every_layout(tmp_path: Path, pipeline_parts, layout: str, covered: str) -> None:
    """Written as diffusers' training scripts write it: ``get_peft_model_state_dict`` (→
    ``convert_state_dict_to_diffusers`` for the older layout) → ``save_lora_weights(…_lora_adapter_metadata=…)``.

    Each component's ``r`` and ``lora_alpha`` apply to its own modules only; with metadata for the UNet alone, the
    text-encoder modules keep scale 1 (they do not borrow the UNet's α).
    """
    unet, text_encoder, unet_config, te_config, expected = pipeline_parts
    layers = [get_peft_model_state_dict(unet), get_peft_model_state_dict(text_encoder)]
    if layout == "diffusers":
        layers = [convert_state_dict_to_diffusers(x) for x in layers]
        assert any(k.endswith(".lora.down.weight") for k in layers[0])
        assert any(k.endswith(".lora_linear_layer.down.weight") for k in layers[1])
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=layers[0],
        text_encoder_lora_layers=layers[1],
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict() if covered == "both" else None,
    )
    lora = load_lora(tmp_path)
    assert lora.meta.format == layout
    assert set(lora.names) == set(expected)
    for module in lora:
        delta, peft_scaling = expected[module.name]
        is_te = module.name.startswith("text_encoder.")
        scale = (TE_ALPHA / TE_R if covered == "both" else 1.0) if is_te else UNET_ALPHA / UNET_R
        assert module.scale == pytest.approx(scale), module.name
        torch.testing.assert_close(
            module.delta_weight(reshape=True), delta * (scale / peft_scaling), atol=1e-5, rtol=1e-4
        )
