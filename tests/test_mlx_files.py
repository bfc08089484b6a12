"""Adapters written by mlx-lm itself: a tiny Llama on mlx's CPU backend, LoRA / DoRA / embedding layers from
``linear_to_lora_layers``, saved the way ``mlx_lm lora`` saves them (``mx.save_safetensors`` of the trainable
parameters, ``save_config`` for ``adapter_config.json``). Every ΔW must equal mlx-lm's own fused update."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.tuner.dora import DoRALinear  # noqa: E402
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402
from mlx_lm.utils import save_config  # noqa: E402

from lol_engine import LoraFormatError, load_lora  # noqa: E402
from lol_engine.report import describe  # noqa: E402

RANK, SCALE = 4, 7.5


def _adapter(folder: Path, kind: str = "lora", keys: list[str] | None = None, config: bool = True) -> dict:
    """Write an mlx-lm adapter folder; return ``{module name: (ΔW as numpy, magnitude or None)}`` from mlx-lm."""
    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=48,
        num_attention_heads=4,
        rms_norm_eps=1e-5,
        vocab_size=40,
        num_key_value_heads=2,
    )
    model = llama.Model(args)
    model.freeze()
    parameters = {"rank": RANK, "scale": SCALE, "dropout": 0.0} | ({"keys": keys} if keys else {})
    linear_to_lora_layers(model, 2, parameters, use_dora=kind == "dora")
    expected = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear | DoRALinear | LoRAEmbedding):
            module.lora_b = mx.random.normal(module.lora_b.shape) * 0.1  # training moves lora_b off its zero start
            if isinstance(module, LoRALinear):
                delta = module.fuse().weight - module.linear.weight  # mlx-lm's own merge
            elif isinstance(module, LoRAEmbedding):
                delta = module.fuse().weight - module.embedding.weight  # the (num_embeddings, dim) table
            else:  # DoRA's fuse renormalises rows: compare the low-rank part it adds first
                delta = (module.scale * module.lora_b.T) @ module.lora_a.T
            magnitude = np.array(module.m) if isinstance(module, DoRALinear) else None
            expected[name] = (np.array(delta), magnitude)
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    mx.save_safetensors(str(folder / "0000100_adapters.safetensors"), weights)  # a checkpoint beside the final file
    if config:
        save_config(
            {
                "model": "mlx-community/Llama-3.2-1B-Instruct-4bit",
                "fine_tune_type": kind,
                "num_layers": 2,
                "lora_parameters": parameters,
            },
            folder / "adapter_config.json",
        )
    return expected


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_mlx_lm_adapters_read_with_their_scale(tmp_path: Path, kind: str) -> None:
    expected = _adapter(tmp_path, kind)
    lora = load_lora(tmp_path)
    assert lora.meta.format == "mlx-lm" and lora.meta.base_family == "llm-decoder"
    assert lora.meta.is_dora == (kind == "dora")
    assert set(lora.names) == set(expected) and len(lora) == 14
    for module in lora:
        delta, magnitude = expected[module.name]
        assert (module.spec.rank, module.scale, module.alpha) == (RANK, SCALE, None)
        assert module.a.shape == (RANK, module.spec.d_in) and module.b.shape == (module.spec.d_out, RANK)
        np.testing.assert_allclose(module.delta_weight().numpy(), delta, rtol=1e-5, atol=1e-6)
        if magnitude is not None:
            assert module.magnitude_axis == "out"
            np.testing.assert_allclose(module.magnitude.numpy(), magnitude, rtol=1e-6)
    assert json.dumps(describe(lora), allow_nan=False)


def test_mlx_lm_embedding_lora(tmp_path: Path) -> None:
    expected = _adapter(tmp_path, keys=["self_attn.q_proj", "model.embed_tokens"])
    lora = load_lora(tmp_path)
    table = lora["model.embed_tokens"]
    assert table.spec.kind == "embedding" and table.spec.orig_shape == (40, 32)
    np.testing.assert_allclose(table.delta_weight(reshape=True).numpy(), expected["model.embed_tokens"][0], atol=1e-6)


def test_mlx_lm_without_config_assumes_the_default_scale(tmp_path: Path) -> None:
    _adapter(tmp_path, config=False)
    lora = load_lora(tmp_path / "adapters.safetensors")
    assert set(lora.scales) == {20.0}
    assert any("default scale 20" in w for w in lora.meta.warnings)


def test_mlx_lm_configs_before_june_2024_scale_by_alpha(tmp_path: Path) -> None:
    _adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["lora_parameters"] |= {"alpha": 16, "scale": 10.0}  # mlx-lm then used scale · alpha / rank
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    assert set(load_lora(tmp_path).scales) == {10.0 * 16 / RANK}


def test_mlx_lm_full_fine_tune_is_refused(tmp_path: Path) -> None:
    _adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text()) | {"fine_tune_type": "full"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoraFormatError, match="mlx-lm adapter with fine_tune_type 'full'"):
        load_lora(tmp_path)


def test_mlx_lm_expert_factors_are_refused_by_name(tmp_path: Path) -> None:
    """LoRASwitchLinear stores one LoRA per expert: lora_a (E, r, d_in), lora_b (E, d_out, r)."""
    a, b = torch.randn(4, 2, 8), torch.randn(4, 6, 2)
    header = {"__metadata__": None}
    blobs, offset = [], 0
    for key, t in (
        ("model.layers.0.mlp.switch_mlp.up_proj.lora_a", a),
        ("model.layers.0.mlp.switch_mlp.up_proj.lora_b", b),
    ):
        blob = t.numpy().astype("<f4").tobytes()
        header[key] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    path = tmp_path / "adapters.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    with pytest.raises(LoraFormatError, match=r"mlx-lm LoRASwitchLinear \(mixture-of-experts\)"):
        load_lora(path)
