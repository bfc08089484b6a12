"""cloneofsimo/lora ("safeloras") files: index-named modules mapped to SD 1.x module names.

The expected order is derived independently, from diffusers' and transformers' real SD 1.5 architectures built on the
meta device (no weights), walked the way ``lora_diffusion``'s ``_find_modules_v2`` walks them: every module whose
class is a target, in ``model.modules()`` order, then its ``nn.Linear`` descendants.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_files import save

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from lol_engine import LoraFormatError, load_lora  # noqa: E402
from lol_engine.lora import cloneofsimo  # noqa: E402

UNET_TARGETS = ["GEGLU", "CrossAttention", "Attention"]  # lora_diffusion's UNET_DEFAULT_TARGET_REPLACE
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}


def _find_modules(model: torch.nn.Module, targets: set[str]) -> list[tuple[str, int, int]]:
    """``[(name, d_in, d_out)]`` of the Linear layers lora_diffusion injects into, in its order."""
    out = []
    for ancestor_name, ancestor in model.named_modules():
        if type(ancestor).__name__ in targets:
            for name, module in ancestor.named_modules():
                if isinstance(module, torch.nn.Linear):
                    out.append((f"{ancestor_name}.{name}", module.in_features, module.out_features))
    return out


@pytest.fixture(scope="module")
def sd15_order() -> dict[str, list[tuple[str, int, int]]]:
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**SD15_UNET)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_L))
    te = [
        (f"text_encoder.text_model.{n.removeprefix('text_model.')}", i, o)
        for n, i, o in _find_modules(text, {"CLIPAttention"})
    ]  # transformers 5 drops text_model.
    return {"unet": _find_modules(unet, set(UNET_TARGETS)), "text_encoder": te}


def test_sd1_orders_match_the_real_architectures(sd15_order) -> None:
    ours = cloneofsimo.unet_orders(frozenset(UNET_TARGETS))
    assert ours["diffusers ≥ 0.13 (attn1, attn2, ff)"] == sd15_order["unet"]
    assert len(sd15_order["unet"]) == 144
    assert cloneofsimo.text_encoder_order() == sd15_order["text_encoder"]


def _safeloras(path: Path, order: dict[str, list[tuple[str, int, int]]], rank: int = 2) -> dict[str, torch.Tensor]:
    """A file as ``save_safeloras_with_embeds`` writes it; returns the expected ΔW (up @ down) by module name."""
    gen = torch.Generator().manual_seed(0)
    tensors, metadata, expected = {}, {}, {}
    for component, modules in order.items():
        metadata[component] = json.dumps(UNET_TARGETS if component == "unet" else ["CLIPAttention"])
        for i, (name, d_in, d_out) in enumerate(modules):
            down, up = torch.randn(rank, d_in, generator=gen), torch.randn(d_out, rank, generator=gen)
            tensors[f"{component}:{i}:down"], tensors[f"{component}:{i}:up"] = down.half(), up.half()
            metadata[f"{component}:{i}:rank"] = str(rank)
            expected[name] = up.half().float() @ down.half().float()
    tensors["<s1>"] = torch.randn(768, generator=gen)  # a textual-inversion token, flagged in the metadata
    metadata["<s1>"] = "<embed>"
    save(path, tensors, metadata)
    return expected


def test_safeloras_file_is_read_with_module_names(tmp_path: Path, sd15_order) -> None:
    expected = _safeloras(tmp_path / "lora.safetensors", sd15_order)
    lora = load_lora(tmp_path / "lora.safetensors")
    assert lora.meta.format == "cloneofsimo" and lora.meta.base_family == "sd1"
    assert set(lora.names) == set(expected) and len(lora) == 144 + 48
    for module in lora:
        assert module.scale == 1.0 and module.alpha is None  # realize_as_lora baked the scale into up
        torch.testing.assert_close(module.delta_weight(), expected[module.name], rtol=1e-5, atol=1e-5)
    assert "<s1>" in lora.meta.skipped_keys


def test_safeloras_from_diffusers_before_0_13(tmp_path: Path, sd15_order) -> None:
    """diffusers < 0.13 registered ff before attn2 in a transformer block: the shapes tell the orders apart."""
    old = []
    for start in range(0, len(sd15_order["unet"]), 9):
        block = sd15_order["unet"][start : start + 9]  # attn1 ×4, attn2 ×4, ff
        old += block[:4] + block[8:] + block[4:8]
    expected = _safeloras(tmp_path / "old.safetensors", {"unet": old})
    lora = load_lora(tmp_path / "old.safetensors")
    for module in lora:
        torch.testing.assert_close(module.delta_weight(), expected[module.name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("sd2", r"unet modules match no SD 1\.x module order.* unet:5 is 1024→320"),
        ("extended", r"UNet targets .*ResnetBlock2D.* only the attention targets"),
        ("vae", r"component 'vae'"),
        ("missing", r"lacks module unet:3"),
    ],
)
def test_safeloras_that_cannot_be_named_are_refused(tmp_path: Path, sd15_order, change: str, message: str) -> None:
    order = {"unet": list(sd15_order["unet"])}
    if change == "sd2":  # SD 2.x cross-attends to 1024-wide OpenCLIP features
        order["unet"] = [(n, 1024 if n.endswith(("attn2.to_k", "attn2.to_v")) else i, o) for n, i, o in order["unet"]]
    if change == "vae":
        order["vae"] = order.pop("unet")
    path = tmp_path / "x.safetensors"
    _safeloras(path, order)
    if change in ("extended", "missing"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(path)
        metadata = {"unet": json.dumps([*UNET_TARGETS, "ResnetBlock2D"])}
        if change == "missing":
            del tensors["unet:3:down"], tensors["unet:3:up"]
            metadata = {}
        save_file(tensors, path, metadata)
    with pytest.raises(LoraFormatError, match=message) as info:
        load_lora(path)
    assert "cloneofsimo/lora" in str(info.value)


def test_safeloras_targets_are_read_per_file(tmp_path: Path, sd15_order) -> None:
    """Two files with the same tensors: the target list in the second's metadata is read, not the first's plan."""
    from safetensors.torch import load_file, save_file

    good = tmp_path / "good.safetensors"
    _safeloras(good, sd15_order)
    assert len(load_lora(good)) == 144 + 48
    extended = tmp_path / "extended.safetensors"
    save_file(load_file(good), extended, {"unet": json.dumps([*UNET_TARGETS, "ResnetBlock2D"])})
    with pytest.raises(LoraFormatError, match=r"UNet targets .*ResnetBlock2D"):
        load_lora(extended)
