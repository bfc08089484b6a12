"""Adapters written by peft itself (tiny models built from configs, no downloads): ΔW equals peft's own merge."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lol_engine import load_lora  # noqa: E402


class ConvNet(nn.Module):
    """A digits-sized CNN: conv LoRAs as in the project's zoos."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.emb = nn.Embedding(20, 6)
        self.fc = nn.Linear(16, 10)


def _tiny_bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40
    )
    return transformers.BertModel(config)


def _tiny_llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(config)


def _write(model: nn.Module, config: peft.LoraConfig, folder: Path, dtype: torch.dtype = torch.float32):
    """Wrap, save with save_pretrained, merge; return {module name: ΔW from peft's merge}."""
    torch.manual_seed(0)  # peft initialises inside; init_lora_weights=False makes B random, so ΔW ≠ 0
    base = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = peft.get_peft_model(copy.deepcopy(model), config)
    if dtype != torch.float32:
        wrapped = wrapped.to(dtype)
    wrapped.save_pretrained(str(folder))
    merged = wrapped.to(torch.float32).merge_and_unload().state_dict()
    return {
        k.removesuffix(".weight"): merged[k] - base[k]
        for k in base
        if k.endswith(".weight") and not torch.equal(merged[k], base[k])
    }


def _check_against_merge(folder: Path, deltas: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    lora = load_lora(folder)
    assert lora.meta.format == "peft"
    assert set(lora.names) == set(deltas)
    for module in lora:
        torch.testing.assert_close(module.delta_weight(reshape=True), deltas[module.name], atol=atol, rtol=1e-4)


def test_bert_query_value(tmp_path: Path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    deltas = _write(_tiny_bert(), config, tmp_path)
    _check_against_merge(tmp_path, deltas)
    lora = load_lora(tmp_path)
    assert lora.meta.base_family == "bert-encoder"
    assert lora.names[0] == "encoder.layer.0.attention.self.query"
    assert lora.scales == (2.0,) * 4


def test_llama_rank_and_alpha_patterns(tmp_path: Path) -> None:
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"model.layers.1.self_attn.q_proj": 2},
        init_lora_weights=False,
    )
    deltas = _write(_tiny_llama(), config, tmp_path)
    _check_against_merge(tmp_path, deltas)
    lora = load_lora(tmp_path)
    assert lora.meta.base_family == "llm-decoder"
    assert lora["model.layers.0.self_attn.v_proj"].spec.rank == 2
    assert lora["model.layers.1.self_attn.q_proj"].scale == 0.5
    assert not lora.meta.warnings


def test_llama_rslora(tmp_path: Path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["k_proj"], init_lora_weights=False)
    _check_against_merge(tmp_path, _write(_tiny_llama(), config, tmp_path))
    assert load_lora(tmp_path).scales == (4.0, 4.0)


def test_conv_and_embedding(tmp_path: Path) -> None:
    config = peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["conv1", "conv2", "emb", "fc"], init_lora_weights=False
    )
    deltas = _write(ConvNet(), config, tmp_path)
    _check_against_merge(tmp_path, deltas)
    lora = load_lora(tmp_path)
    assert {m.name: m.spec.kind for m in lora} == {
        "conv1": "conv",
        "conv2": "conv",
        "emb": "embedding",
        "fc": "linear",
    }
    assert lora["conv2"].spec.orig_shape == (16, 8, 3, 3) and lora["conv2"].spec.d_in == 72


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["F16", "BF16"])
def test_half_precision_adapters(tmp_path: Path, dtype: torch.dtype) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["query"], init_lora_weights=False)
    deltas = _write(_tiny_bert(), config, tmp_path, dtype=dtype)
    lora = load_lora(tmp_path)
    assert lora.meta.dtype == {torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    for module in lora:  # factors were rounded to half precision before saving
        torch.testing.assert_close(module.delta_weight(), deltas[module.name], atol=0.05, rtol=0.05)


def test_dora_low_rank_part_and_magnitude(tmp_path: Path) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["query"], init_lora_weights=False)
    torch.manual_seed(0)
    wrapped = peft.get_peft_model(_tiny_bert(), config)
    wrapped.save_pretrained(str(tmp_path))
    lora = load_lora(tmp_path)
    assert lora.meta.is_dora
    layer = wrapped.base_model.model.encoder.layer[0].attention.self.query
    module = lora["encoder.layer.0.attention.self.query"]
    expected = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(module.delta_weight(), expected.detach())
    assert module.magnitude_axis == "out"
    torch.testing.assert_close(module.magnitude, layer.lora_magnitude_vector["default"].weight.detach())
