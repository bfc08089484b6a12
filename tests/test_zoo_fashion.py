"""fashion-gen at toy size: labels recomputed independently, and a clear error when the data is missing."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("pyarrow")

from lol_engine import load_lora  # noqa: E402
from lol_engine.zoo import ZooSettings, build_zoo, read_manifest  # noqa: E402
from lol_engine.zoo.datasets import DataSourceError, fashion_mnist, wordnet_nouns  # noqa: E402
from lol_engine.zoo.recipes.fashion_gen import N_IMAGES, FashionVAE, evaluate_quality, image_attributes  # noqa: E402


def _have(loader) -> bool:
    try:
        loader()
    except DataSourceError:
        return False
    return True


needs_fashion = pytest.mark.skipif(not _have(lambda: fashion_mnist("test")), reason="dataset-fashion-mnist missing")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _have(lambda: fashion_mnist("test")):
        pytest.skip("dataset-fashion-mnist missing (make system-deps)")
    out = tmp_path_factory.mktemp("fashion")
    build_zoo("fashion-gen", out, ZooSettings(n=4, seed=1, toy=True), progress=False)
    return out


@needs_fashion
def test_fashion_mnist_reader() -> None:
    images, labels = fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == list(range(10))


def test_manifest_and_files(zoo: Path) -> None:
    rows = read_manifest(zoo)
    assert len(rows) == 4
    for row in rows:
        assert {
            "y_class",
            "y_bold",
            "y_wide",
            "y_top_heavy",
            "y_quality",
            "t_quality_eval",
            "hp_prompt",
            "hp_lr",
        } <= set(row)
        assert 0.0 <= row["y_quality"] <= 1.0 and row["t_quality_eval"] > 0
        assert row["hp_lr"] in (1e-4, 3e-4, 1e-3, 3e-3) and row["hp_steps"] in (100, 133, 167, 200)
        lora = load_lora(zoo / row["path"])
        assert lora.names == ("d1", "d2", "e1") and lora.meta.base_family == "fashion-vae"


def test_labels_recomputed_independently(zoo: Path) -> None:
    from safetensors.torch import load_file

    identities = json.loads((zoo / "base" / "identities.json").read_text())
    base = FashionVAE()
    base.load_state_dict(load_file(str(zoo / "base" / "fashion-vae-v0-toy.safetensors")))
    judge = torch.nn.Linear(784, 10)
    judge.load_state_dict(load_file(str(zoo / "base" / "judge-toy.safetensors")))
    images, _ = fashion_mnist("train")
    x_all = torch.tensor(images.reshape(-1, 784), dtype=torch.float32) / 255.0
    pretrain_split = np.random.default_rng(0).permutation(60000)[:2000]  # the documented toy pretraining split
    thresholds = {k: float(v.median()) for k, v in image_attributes(x_all[pretrain_split]).items()}
    for row in read_manifest(zoo)[:2]:
        identity = identities[row["hp_identity"]]
        assert row["y_class"] == identity["class"]
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(zoo / row["path"])).eval()
        quality = evaluate_quality(model, judge, identity["class"], row["hp_prompt"])
        assert quality == pytest.approx(row["y_quality"], abs=1e-5)
        pick = np.random.default_rng(row["hp_image_seed"]).choice(identity["images"], N_IMAGES, replace=False)
        assert len(set(pick.tolist())) == N_IMAGES
        for name, values in image_attributes(x_all[np.sort(pick)]).items():
            majority = int((values > thresholds[name]).float().mean() > 0.5)
            assert majority == row[f"y_{name}"], name


def test_missing_fashion_data_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOL_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(DataSourceError, match=r"apt-get install dataset-fashion-mnist.*LOL_FASHION_MNIST_DIR"):
        build_zoo("fashion-gen", tmp_path / "zoo", ZooSettings(n=1, toy=True), progress=False)


def test_missing_wordnet_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOL_WORDNET_DIR", str(tmp_path))
    with pytest.raises(DataSourceError, match="wordnet-base"):
        wordnet_nouns()


@pytest.mark.skipif(not _have(wordnet_nouns), reason="wordnet-base missing")
def test_wordnet_reader() -> None:
    nouns = wordnet_nouns()
    assert len(nouns) == 82115
    counts: dict[str, int] = {}
    for synset in nouns:
        counts[synset.lexname] = counts.get(synset.lexname, 0) + 1
    assert len(counts) == 26 and counts["noun.artifact"] == 11587 and counts["noun.person"] == 11087


def test_continued_pretraining_base_variant(zoo: Path, tmp_path: Path) -> None:
    build_zoo("fashion-gen", tmp_path, ZooSettings(n=1, seed=1, toy=True, base_variant=1), progress=False)
    variant, original = read_manifest(tmp_path)[0], read_manifest(zoo)[0]
    assert variant["base_name"] == "fashion-vae-v1-toy" and original["base_name"] == "fashion-vae-v0-toy"
    assert variant["base_sha256"] != original["base_sha256"]
    assert variant["hp_identity"] == original["hp_identity"]  # same choices, other base
