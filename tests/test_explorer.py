"""The explorer service: exact ΔW-cosine neighbours, LoL embeddings, calibrated predictions, uploads and maps."""

from __future__ import annotations

import math
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("duckdb")

from collection import SHIPPED, TOY_SHIPPED, ZOOS, mini_zoo

import lol_engine.explorer as explorer_module
from lol_engine import BadRequestError, LoraFormatError, load_lora
from lol_engine.encoders import FINGERPRINT, encoders_for, load_predictors
from lol_engine.explorer import AddResult, Explorer, neighbour_placement
from lol_engine.similarity import cosine_to_many, module_cosines
from lol_engine.spec import LayerSpec, LoraSpec
from lol_engine.symmetry import act_gl, lora_cosine, random_gl_like
from lol_engine.testing import assert_gl_invariant, assert_gl_sensitive, random_lora
from lol_engine.train.calibrate import conformal_quantile, nonconformity
from lol_engine.train.tasks import Task

DIGITS = sorted((ZOOS / "digits" / "loras").iterdir())
FASHION = sorted((ZOOS / "fashion-gen" / "loras").iterdir())


def _spec(rank: int, names: tuple[str, ...] = ("q", "v")) -> LoraSpec:
    return LoraSpec(tuple(LayerSpec(n, 12, 9, rank) for n in names))


# ------------------------------------------------------------------------------------------------ similarity (math)
def test_cosine_to_many_matches_the_pairwise_reference(gen: torch.Generator) -> None:
    query = random_lora(_spec(3), generator=gen, scale=[0.5, 2.0])
    candidates = [random_lora(_spec(r), generator=gen, scale=[1.5, -0.7]) for r in (1, 3, 3, 5)]
    candidates.append(random_lora(_spec(2, ("q", "other")), generator=gen))  # shares one module only
    candidates.append(random_lora(_spec(2, ("x", "y")), generator=gen))  # shares none
    got = cosine_to_many(query, candidates)
    want = [lora_cosine(query, c) for c in candidates[:-1]]
    np.testing.assert_allclose(got[:-1], want, rtol=1e-12, atol=1e-12)
    assert math.isnan(got[-1])
    dense = [torch.cat([(m.scale * m.b @ m.a).reshape(-1) for m in lora]) for lora in (query, candidates[0])]
    assert got[0] == pytest.approx(float(torch.nn.functional.cosine_similarity(*dense, dim=0)), abs=1e-12)


def test_cosine_to_many_is_gl_invariant_and_sensitive(gen: torch.Generator) -> None:
    query = random_lora(_spec(4), generator=gen)
    others = [random_lora(_spec(4), generator=gen) for _ in range(3)]
    assert_gl_invariant(lambda q: cosine_to_many(q, others), query, generator=gen)
    assert_gl_invariant(lambda o: cosine_to_many(query, [o]), others[0], generator=gen)
    assert_gl_sensitive(lambda q: cosine_to_many(q, others), query, generator=gen)


def test_module_cosines_against_dense(gen: torch.Generator) -> None:
    first, second = random_lora(_spec(2), generator=gen), random_lora(_spec(5), generator=gen, scale=3.0)
    rows = module_cosines(first, second)
    assert [r[0] for r in rows] == ["q", "v"]
    for name, cos, n1, n2 in rows:
        w1 = first[name].scale * first[name].b @ first[name].a
        w2 = second[name].scale * second[name].b @ second[name].a
        assert cos == pytest.approx(float((w1 * w2).sum() / (w1.norm() * w2.norm())), abs=1e-12)
        assert (n1, n2) == pytest.approx((float(w1.norm()), float(w2.norm())), rel=1e-12)
    moved = act_gl(first, random_gl_like(first, generator=gen))
    np.testing.assert_allclose([r[1] for r in module_cosines(moved, second)], [r[1] for r in rows], atol=1e-10)


# ------------------------------------------------------------------------------------------------ LoL embeddings
def test_lol_embedding_is_invariant_and_consistent_with_prediction() -> None:
    predictor = load_predictors()["fashion-gen-quality"]  # spectral GL-net: GL(r)-invariant
    lora = load_lora(FASHION[0])
    prediction, vector = predictor.predict_and_embed(lora)
    assert prediction == predictor.predict(lora)
    assert vector.shape == (predictor.embedding_dim,)
    torch.testing.assert_close(predictor.embed(lora), vector)
    gen = torch.Generator().manual_seed(0)
    assert_gl_invariant(predictor.embed, lora, generator=gen, cond_max=3.0, rtol=2e-3, atol=2e-4)
    other = load_lora(FASHION[1])
    assert not torch.allclose(predictor.embed(other), vector, atol=1e-3)


# ------------------------------------------------------------------------------------------------ calibration
def test_conformal_quantile() -> None:
    scores = np.arange(1.0, 10.0)  # n = 9
    assert conformal_quantile(scores, 0.9) == 9.0  # ⌈10·0.9⌉ = 9th smallest
    assert conformal_quantile(scores, 0.5) == 5.0
    assert conformal_quantile(scores[:5], 0.9) == math.inf  # ⌈6·0.9⌉ = 6 > 5
    with pytest.raises(ValueError, match="coverage"):
        conformal_quantile(scores, 1.0)


def test_nonconformity_by_task_kind() -> None:
    reg = Task("q", "regression", 1, ("q",))
    np.testing.assert_allclose(
        nonconformity(reg, torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.0]), torch.ones(2, dtype=torch.bool)),
        [0.5, 1.0],
    )
    cat = Task("c", "categorical", 3, ("a", "b", "c"))
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    np.testing.assert_allclose(
        nonconformity(cat, probs, torch.tensor([0, 1]), torch.ones(2, dtype=torch.bool)), [0.3, 0.9], atol=1e-6
    )
    multi = Task("m", "multilabel", 2, ("m[0]", "m[1]"))
    p = torch.tensor([[0.9, 0.4]])
    mask = torch.tensor([[True, False]])
    np.testing.assert_allclose(nonconformity(multi, p, torch.tensor([[0.0, 1.0]]), mask), [0.9], atol=1e-6)


def test_shipped_predictors_are_calibrated_and_their_ranges_hold() -> None:
    predictors = load_predictors()
    for name, predictor in predictors.items():
        cal = predictor.config["calibration"]
        assert cal["coverage"] == 0.9 and cal["n"] >= 20, name  # toy zoos ~100 cal LoRAs, real-base zoos 22-35
        assert cal["test_coverage"] > 0.75, name  # ~100 test LoRAs: 0.9 nominal, sampling noise ±0.06
    quality = predictors["fashion-gen-quality"]
    lora = load_lora(FASHION[3])
    row = quality.predict(lora)
    q = quality.config["calibration"]["q"]
    assert row.kind == "regression" and row.predictor == "fashion-gen-quality" and row.coverage == 0.9
    assert row.interval == pytest.approx((row.value - q, row.value + q))
    assert row.skill is not None and row.skill.metric == "R²"
    classifier = predictors["fashion-gen-class"]
    cls = classifier.predict(lora)
    assert cls.kind == "categorical" and cls.sets is not None
    chosen = cls.sets["class"]
    assert not chosen or chosen[0] == cls.value
    q = classifier.config["calibration"]["q"]
    assert set(chosen) == {k for k, p in cls.probabilities.items() if 1 - p <= q}
    assert cls.probability == max(cls.probabilities.values()) and sum(cls.probabilities.values()) == pytest.approx(1)
    bits = predictors["digits-classes"].predict(load_lora(DIGITS[0]))
    assert bits.kind == "multilabel" and len(bits.probabilities) == 10 and bits.sets is not None
    assert all(set(s) <= {"0", "1"} for s in bits.sets.values())
    assert bits.value == tuple(n for n, p in bits.probabilities.items() if p >= 0.5)


def test_analysis_ranges_equal_a_fresh_prediction(collection: Explorer) -> None:
    analysis = collection.analyse(DIGITS[7])
    for name, estimate in analysis.estimates.items():
        assert estimate == collection.predictors[name].predict(analysis.lora), name


def test_lol_calibrate_writes_the_calibration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from lol_engine.cli import main

    folder = tmp_path / "predictor"
    shutil.copytree(ZOOS.parent.parent / "lol_engine" / "predictors" / "digits-acc_own", folder)
    zoo = mini_zoo(tmp_path / "zoos", "digits", 200)
    assert main(["calibrate", str(folder), "--zoo", str(zoo), "--coverage", "0.8"]) == 0
    cal = json.loads((folder / "config.json").read_text())["calibration"]
    import pyarrow.parquet as pq

    n_cal = pq.read_table(zoo / "manifest.parquet").column("split").to_pylist().count("cal")
    assert cal["coverage"] == 0.8 and cal["split"] == "cal" and cal["n"] == n_cal > 5 and math.isfinite(cal["q"])
    assert 0.0 <= cal["test_coverage"] <= 1.0 and "test coverage" in capsys.readouterr().out
    seen = json.loads((folder / "config.json").read_text())["seen"]
    splits = pq.read_table(zoo / "manifest.parquet").to_pylist()
    learned = {load_lora(zoo / r["path"]).meta.sha256 for r in splits if r["split"] in ("train", "val", "cal")}
    assert seen["splits"] == ["train", "val", "cal"] and set(seen["sha256"]) == learned
    assert len(seen["delta"]) == len(learned) == len(set(seen["delta"]))


# ------------------------------------------------------------------------------------------------ the service
def test_collection_has_labels_predictions_embeddings_and_maps(collection: Explorer) -> None:
    assert collection.count() == 70
    encoders = collection.maps()
    assert encoders[0] == FINGERPRINT and len(encoders) == 1 + len(
        TOY_SHIPPED
    )  # fingerprint + the predictors that fit a LoRA here
    maps = collection.store.maps()
    assert maps[FINGERPRINT] == 70 and maps["lol:digits-classes"] == 40 and maps["lol:fashion-gen-quality"] == 30
    records = {r["id"]: r for r in collection.records()}
    digits = [r for r in records.values() if r["zoo"] == "digits"]
    assert len(digits) == 40 and all("label:acc_own" in r and "pred:digits-acc_own" in r for r in digits)
    assert all(isinstance(r["pred:fashion-gen-class"], str) for r in records.values() if r["zoo"] == "fashion-gen")
    tiles = collection.map_tiles(FINGERPRINT)  # the fingerprint map lays each base family out on its own
    assert set(tiles) == {"digits-mlp", "fashion-vae"} and collection.map_tiles("lol:digits-classes") == {}
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = tiles.values()
    assert ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0  # the tiles do not overlap


def test_neighbours_are_exact_and_ordered(collection: Explorer) -> None:
    lora = load_lora(DIGITS[3])
    found = collection.neighbours(lora, k=5)
    assert [n.by for n in found] == ["ΔW cosine"] * 5
    assert found[0].similarity == pytest.approx(1.0) and found[0].name == DIGITS[3].name  # itself is stored
    brute = sorted(((lora_cosine(lora, load_lora(p)), p.name) for p in DIGITS[:40]), reverse=True)[:5]
    assert [n.name for n in found] == [name for _, name in brute]
    np.testing.assert_allclose([n.similarity for n in found], [s for s, _ in brute], atol=1e-6)
    excluded = collection.neighbours(lora, k=5, exclude=found[0].id)
    assert found[0].id not in {n.id for n in excluded}


def test_neighbours_fall_back_to_fingerprints(collection: Explorer, gen: torch.Generator) -> None:
    from lol_engine.lora.weights import LoraMetadata, LoraWeights

    stranger = random_lora(_spec(2, ("unrelated.a", "unrelated.b")), generator=gen, dtype=torch.float32)
    same_base = LoraWeights(stranger.modules, LoraMetadata(format="peft", base_family="digits-mlp"))
    found = collection.neighbours(same_base, k=3)  # no shared module: the fingerprint, among its base family only
    assert len(found) == 3 and {n.by for n in found} == {"fingerprint cosine"}
    assert {n.base_family for n in found} == {"digits-mlp"} and {n.zoo for n in found} == {"digits"}
    for family in ("sd1", "unknown"):  # no LoRA of its base, or no base known: no neighbour rather than a wrong one
        other = LoraWeights(stranger.modules, LoraMetadata(format="peft", base_family=family))
        assert collection.neighbours(other, k=3) == [], family
    digits_id = found[0].id
    by_fingerprint = collection.neighbours_by_embedding(digits_id, FINGERPRINT, k=50)
    assert len(by_fingerprint) == 39 and {n.base_family for n in by_fingerprint} == {"digits-mlp"}


def test_neighbour_placement() -> None:
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    coords = np.array([[10.0, 0.0], [0.0, 10.0], [-10.0, 0.0]])
    np.testing.assert_allclose(neighbour_placement(x, coords, np.array([2.0, 0.0]), k=1), [10.0, 0.0])
    mid = neighbour_placement(x, coords, np.array([1.0, 1.0]), k=2)
    np.testing.assert_allclose(mid, [5.0, 5.0])


@pytest.fixture
def fresh(tmp_path: Path) -> Explorer:
    """A small explorer of its own (tests below change the collection)."""
    explorer = Explorer.open(tmp_path / "data" / "lol.duckdb")
    explorer.start([mini_zoo(tmp_path / "zoos", "digits", 8)], progress=False)
    yield explorer
    explorer.close()


def test_analyse_stores_nothing_and_add_is_idempotent(fresh: Explorer, tmp_path: Path) -> None:
    upload = tmp_path / "upload" / "my lora.safetensors"
    upload.parent.mkdir()
    shutil.copyfile(DIGITS[20] / "adapter_model.safetensors", upload)
    before = fresh.store.count()
    config = DIGITS[20] / "adapter_config.json"
    analysis = fresh.analyse(upload, config)
    assert fresh.store.count() == before and not fresh.uploads_dir.exists()
    assert set(analysis.estimates) == {"digits-acc_own", "digits-classes"}
    added = fresh.add(upload, config, name="my lora")
    lora_id = added.id
    assert added == AddResult(lora_id, "my lora", existed=False) and lora_id == analysis.sha256
    assert fresh.add(upload, config) == AddResult(lora_id, "my lora", existed=True)
    assert fresh.store.count() == before + 1
    assert sorted(p.name for p in (fresh.uploads_dir / lora_id).iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert not [p for p in fresh.uploads_dir.iterdir() if p.name.startswith(".")]  # no staging left
    assert fresh.get(lora_id).name == "my lora"
    assert fresh.estimates(lora_id) == analysis.estimates  # stored as analysed, through JSON and back
    for encoder, n in fresh.store.maps().items():  # placed on every map of an encoder that embedded it
        assert n == before + 1, encoder
    assert fresh.weights(lora_id).meta.sha256 == lora_id


def test_placement_survives_a_restart(fresh: Explorer, tmp_path: Path) -> None:
    path = fresh.store.path
    maps_before = fresh.store.maps()
    fresh.close()
    reopened = Explorer.open(path)
    try:
        assert reopened.store.maps() == maps_before and reopened.store.count() == 8
        assert not reopened.ensure_default([mini_zoo(tmp_path / "again", "digits", 8)], progress=False)
        analysis = reopened.analyse(DIGITS[30])  # no fitted reducer in this process: neighbour placement
        reopened.add(DIGITS[30])
        assert all(n == 9 for n in reopened.store.maps().values())
        ids, xy = reopened.map_points(FINGERPRINT)
        assert np.isfinite(xy).all() and analysis.sha256 in ids
    finally:
        reopened.close()
    fresh.store = reopened.store  # the fixture's teardown closes it again (harmless)


def test_a_failed_add_stores_nothing(fresh: Explorer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    upload = tmp_path / "x.safetensors"
    shutil.copyfile(DIGITS[21] / "adapter_model.safetensors", upload)
    analysis = fresh.analyse(upload)
    copy = shutil.copyfile

    def changing(source: Path, target: Path) -> None:  # the file changes while it is being copied in
        copy(source, target)
        Path(target).write_bytes(Path(target).read_bytes()[:-8] + b"\0" * 8)

    monkeypatch.setattr("lol_engine.explorer.shutil.copyfile", changing)
    with pytest.raises(LoraFormatError, match="changed while it was being added"):
        fresh.add(upload)
    assert fresh.store.get(analysis.sha256) is None and fresh.store.count() == 8
    assert not (fresh.uploads_dir / analysis.sha256).exists()  # the copy went with the failed add


def test_concurrent_adds_lose_nothing(fresh: Explorer) -> None:
    analyses = [fresh.analyse(DIGITS[i]) for i in range(40, 48)]
    errors: list[BaseException] = []

    def add(i: int) -> None:
        try:
            fresh.add(DIGITS[40 + i], name=f"upload-{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(len(analyses))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert fresh.store.count() == 16
    assert all(fresh.store.get(a.sha256) is not None for a in analyses)
    assert all(n == 16 for n in fresh.store.maps().values())


def test_compare(collection: Explorer) -> None:
    ids = [r["id"] for r in collection.records() if r["zoo"] == "digits"][:2]
    overall, rows = collection.compare(*ids)
    assert overall == pytest.approx(lora_cosine(collection.weights(ids[0]), collection.weights(ids[1])))
    assert [r[0] for r in rows] == ["fc1", "fc2"]
    other = next(r["id"] for r in collection.records() if r["zoo"] == "fashion-gen")
    with pytest.raises(BadRequestError, match=r"a digits-mlp LoRA and .* a fashion-vae LoRA: LoRAs of different base"):
        collection.compare(ids[0], other)


def test_batched_encoding_matches_one_at_a_time() -> None:
    from lol_engine.encoders import encode, encode_many

    encoders = encoders_for(load_predictors())
    loras = [load_lora(p) for p in (*DIGITS[:3], *FASHION[:3])]
    batched = encode_many(loras, encoders)
    for lora, encoded in zip(loras, batched, strict=True):
        single = encode(lora, encoders)
        assert encoded.estimates.keys() == single.estimates.keys()
        assert encoded.embeddings.keys() == single.embeddings.keys()
        for name in encoded.embeddings:
            np.testing.assert_allclose(encoded.embeddings[name], single.embeddings[name], rtol=1e-4, atol=1e-5)
        for name, estimate in encoded.estimates.items():
            one = single.estimates[name]
            assert (estimate.kind, estimate.label, estimate.in_sample) == (one.kind, one.label, one.in_sample)
            assert estimate.probabilities == pytest.approx(one.probabilities, rel=1e-4, abs=1e-5)
            if estimate.kind == "regression":
                assert estimate.value == pytest.approx(one.value, rel=1e-4, abs=1e-5)


def test_analyse_then_add_parses_once_and_predicts_once(
    fresh: Explorer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app's Analyse then Add: the upload is parsed once and each fitting predictor runs one forward."""
    pytest.importorskip("gradio")
    from app import handlers
    from lol_engine.train.checkpoint import Predictor

    upload = tmp_path / "up" / "mine.safetensors"
    upload.parent.mkdir()
    shutil.copyfile(DIGITS[25] / "adapter_model.safetensors", upload)
    config = tmp_path / "up" / "adapter_config.json"
    shutil.copyfile(DIGITS[25] / "adapter_config.json", config)
    parsed: list[str] = []
    forwards: list[str] = []
    real_load, real_forward = explorer_module.load_lora, Predictor.predict_and_embed_many

    def counting_load(path, **kwargs):
        parsed.append(str(path))
        return real_load(path, **kwargs)

    def counting_forward(self, loras):
        forwards.append(self.name)
        return real_forward(self, loras)

    monkeypatch.setattr(explorer_module, "load_lora", counting_load)
    monkeypatch.setattr(Predictor, "predict_and_embed_many", counting_forward)
    result = handlers.analyse_upload(fresh, [str(upload), str(config)])
    message = handlers.add_upload(fresh, [str(upload), str(config)])
    assert message.startswith("Added **mine**")
    assert parsed.count(str(upload)) == 1  # the others are stored LoRAs read for neighbours, never the upload
    assert not [p for p in parsed if str(fresh.uploads_dir) in p]  # nor its stored copy
    fitting = sorted(result.analysis.estimates)
    assert fitting == sorted(n for n in SHIPPED if n.startswith("digits-")) and sorted(forwards) == fitting  # one each
    assert fresh.estimates(result.analysis.sha256) == result.analysis.estimates


def test_shipped_predictors_flag_the_loras_they_learned_from() -> None:
    """Every shipped predictor records its zoo's train, val and cal LoRAs: those are in-sample, test LoRAs are not."""
    import pyarrow.parquet as pq

    predictors = load_predictors()
    rows = pq.read_table(ZOOS / "digits" / "manifest.parquet").to_pylist()
    by_split = {split: next(r for r in rows if r["split"] == split) for split in ("train", "val", "cal", "test")}
    for split, row in by_split.items():
        estimate = predictors["digits-acc_own"].predict(load_lora(ZOOS / "digits" / row["path"]))
        assert estimate.in_sample == (split != "test"), split
    for name, predictor in predictors.items():
        seen = predictor.config["seen"]
        assert seen["splits"] == ["train", "val", "cal"] and len(seen["sha256"]) == len(seen["delta"]) > 200, name


def test_adding_the_same_bytes_at_once_stores_them_once(fresh: Explorer) -> None:
    results: list[AddResult] = []
    threads = [threading.Thread(target=lambda: results.append(fresh.add(DIGITS[50]))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.existed for r in results) == [False, True, True, True]
    lora_id = results[0].id
    assert fresh.count() == 9 and (fresh.uploads_dir / lora_id / "adapter_model.safetensors").is_file()
    assert fresh.weights(lora_id).meta.sha256 == lora_id
