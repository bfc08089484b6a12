"""Out-of-domain warnings (:mod:`lol_engine.train.domain`): the reference and threshold a calibrated predictor keeps,
checked against an independent recomputation (a forward hook and scipy's cdist); LoRAs of its zoo are in domain,
foreign ones are flagged; folders without a reference say "unknown"; the CLI regenerates a shipped folder's."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from scipy.spatial.distance import cdist

pytest.importorskip("pyarrow")

from lol_engine.cli import main
from lol_engine.errors import BadRequestError
from lol_engine.lora.weights import LoraWeights
from lol_engine.nn import ModelConfig
from lol_engine.nn.batch import LoraBatch
from lol_engine.train import TrainConfig, load_predictor, load_zoo, save_predictor, train_on_zoo
from lol_engine.train.calibrate import calibrate_folder
from lol_engine.train.domain import REFERENCE, knn_mean_distance
from lol_engine.train.loop import LoadedZoo

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "zoo"
TINY = ModelConfig(hidden=16, width=4, tokens=16, heads=2, dropout=0.0)


@pytest.fixture(scope="module")
def digits() -> LoadedZoo:
    return load_zoo(DATA / "digits")


@pytest.fixture(scope="module")
def calibrated(digits: LoadedZoo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny gl_net on digits ``acc_own``, saved and calibrated (which writes its domain reference)."""
    model, task, _ = train_on_zoo(digits, "acc_own", "gl_net", TINY, TrainConfig(epochs=2, batch=64))
    folder = tmp_path_factory.mktemp("domain") / "acc_own-gl_net"
    save_predictor(folder, model, task, "gl_net", True)
    calibrate_folder(folder, digits)
    return folder


def pre_norm_features(folder: Path, loras: list[LoraWeights]) -> np.ndarray:
    """The head's first linear layer's output, read with a forward hook on the model's own batch (float64)."""
    predictor = load_predictor(folder)
    model = predictor.model.eval()
    seen: list[torch.Tensor] = []
    hook = model.head[0].register_forward_hook(lambda _, args, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            model(LoraBatch.from_loras(loras, fold_scale=True, spec=model.spec))
    finally:
        hook.remove()
    return seen[0].double().numpy()


def scaled(lora: LoraWeights, c: float) -> LoraWeights:
    return lora.map_modules(lambda m: replace(m, a=c * m.a, b=c * m.b))


def gaussian(lora: LoraWeights, seed: int) -> LoraWeights:
    """Same layout, random factors with unit entries: directions and a spectrum unlike any trained LoRA's."""
    gen = torch.Generator().manual_seed(seed)
    return lora.map_modules(
        lambda m: replace(m, a=torch.randn(m.a.shape, generator=gen), b=torch.randn(m.b.shape, generator=gen))
    )


def test_knn_mean_distance_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    queries, reference = rng.normal(size=(300, 7)), rng.normal(size=(40, 7)) * 3
    want = np.sort(cdist(queries, reference), axis=1)[:, :5].mean(1)
    np.testing.assert_allclose(knn_mean_distance(queries, reference, 5), want, rtol=1e-9)
    everything = cdist(queries[:3], reference[:3]).mean(1)  # fewer rows than k: all of them
    np.testing.assert_allclose(knn_mean_distance(queries[:3], reference[:3], 5), everything, rtol=1e-9)
    with pytest.raises(BadRequestError):
        knn_mean_distance(queries, reference[:, :3])


def test_reference_and_threshold_equal_an_independent_recomputation(calibrated: Path, digits: LoadedZoo) -> None:
    config = json.loads((calibrated / "config.json").read_text())
    domain = config["domain"]
    train = [digits.loras[i] for i in digits.split("train")]
    held = [digits.loras[i] for i in np.concatenate([digits.split("cal"), digits.split("test")])]
    with safe_open(str(calibrated / REFERENCE), "np") as fh:  # a plain safetensors file, float32
        assert list(fh.keys()) == ["embeddings"]
        stored = fh.get_tensor("embeddings")
    assert stored.dtype == np.float32 and stored.shape == (len(train), TINY.hidden)
    np.testing.assert_allclose(stored, pre_norm_features(calibrated, train), rtol=1e-5, atol=1e-5)
    distances = np.sort(cdist(pre_norm_features(calibrated, held), stored.astype(np.float64)), axis=1)[:, :5].mean(1)
    assert domain["threshold"] == pytest.approx(float(np.percentile(distances, 99)), rel=1e-5)
    assert (domain["k"], domain["quantile"], domain["held_out_splits"]) == (5, 0.99, ["cal", "test"])
    assert (domain["n_reference"], domain["n_held_out"]) == (len(train), len(held))
    assert config["zoo_splits"] == {s: len(digits.split(s)) for s in ("cal", "test", "train", "val")}
    assert config["recipe"] == "digits" and config["target"]["title"] == "Held-out accuracy on its own digits"


def test_zoo_loras_are_in_domain_and_foreign_ones_are_flagged(calibrated: Path, digits: LoadedZoo) -> None:
    predictor = load_predictor(calibrated)
    threshold = predictor.reference.threshold  # type: ignore[union-attr]
    train = [digits.loras[i] for i in digits.split("train")]
    first = predictor.predict(train[0])
    assert first.out_of_domain is False and first.in_sample
    want = np.sort(cdist(pre_norm_features(calibrated, train[:1]), predictor.reference.embeddings), axis=1)  # type: ignore[union-attr]
    assert first.domain_distance == pytest.approx(float(want[0, :5].mean()), rel=1e-5)
    flagged = [e.out_of_domain for e, _ in predictor.predict_and_embed_many(train)]
    assert np.mean(flagged) <= 0.02  # training LoRAs lie nearer their neighbours than the held-out ones
    for lora in train[:5]:
        for foreign in (scaled(lora, 100.0), gaussian(lora, 0)):
            estimate = predictor.predict(foreign)
            assert estimate.out_of_domain is True and estimate.domain_distance > threshold  # type: ignore[operator]


def test_a_folder_without_reference_says_unknown(calibrated: Path, digits: LoadedZoo, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(calibrated, bare)
    (bare / REFERENCE).unlink()
    estimate = load_predictor(bare).predict(digits.loras[0])
    assert (estimate.domain_distance, estimate.out_of_domain) == (None, None)
    assert estimate.to_json()["out_of_domain"] is None
    shutil.copytree(calibrated, tmp_path / "stale")  # a reference from a model of another width is refused
    config = json.loads((tmp_path / "stale" / "config.json").read_text())
    other, task, _ = train_on_zoo(digits, "acc_own", "gl_net", replace(TINY, hidden=8), TrainConfig(epochs=1))
    save_predictor(tmp_path / "stale", other, task, "gl_net", True, {"domain": config["domain"]})
    with pytest.raises(BadRequestError, match="rewrite it with `lol predictors reference`"):
        load_predictor(tmp_path / "stale")


def test_cli_regenerates_a_shipped_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shipped = ROOT / "lol_engine" / "predictors" / "fashion-gen-quality"
    copy = tmp_path / "fashion-gen-quality"
    shutil.copytree(shipped, copy)
    (copy / REFERENCE).unlink()
    config = json.loads((copy / "config.json").read_text())
    for key in ("domain", "target", "recipe", "zoo_splits"):
        config.pop(key)
    (copy / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["predictors", "reference", str(copy), "--zoo", str(DATA / "fashion-gen")]) == 0
    assert "threshold" in capsys.readouterr().out
    again, before = json.loads((copy / "config.json").read_text()), json.loads((shipped / "config.json").read_text())
    assert again["domain"]["threshold"] == pytest.approx(before["domain"]["threshold"], rel=1e-4)
    assert {k: again[k] for k in ("target", "recipe", "zoo_splits")} == {
        k: before[k] for k in ("target", "recipe", "zoo_splits")
    }
    with safe_open(str(copy / REFERENCE), "np") as new, safe_open(str(shipped / REFERENCE), "np") as old:
        np.testing.assert_allclose(new.get_tensor("embeddings"), old.get_tensor("embeddings"), atol=1e-4)
    assert main(["predictors", "reference", str(tmp_path / "nothing")]) == 2
