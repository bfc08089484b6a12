"""The typed estimate: built from a predictor's output (hand-worked cases), JSON and store round trips, the in-sample
flag (file sha256 and exact ΔW), and the migration of schema-1 predictions into estimates."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from lol_engine import load_lora
from lol_engine.estimate import Estimate, Skill
from lol_engine.train.calibrate import estimate_from
from lol_engine.train.checkpoint import delta_digest, load_predictor
from lol_engine.train.tasks import Task

ROOT = Path(__file__).parent.parent
DIGITS = sorted((ROOT / "data" / "zoo" / "digits" / "loras").iterdir())


def _predictor(task: Task, q: float | None, result: dict | None = None) -> SimpleNamespace:
    """A stand-in with what :func:`estimate_from` reads: name, task, config (calibration, result), skill."""
    config = {"result": result or {}}
    if q is not None:
        config["calibration"] = {"q": q, "coverage": 0.9}
    return SimpleNamespace(name="p", task=task, config=config, skill=Skill.from_result(config["result"]))


def test_regression_interval_is_value_plus_minus_q() -> None:
    est = estimate_from(_predictor(Task("quality", "regression", 1, ("quality",)), 0.25), torch.tensor(0.5))
    assert (est.kind, est.value, est.interval, est.coverage) == ("regression", 0.5, (0.25, 0.75), 0.9)
    assert est.summary == 0.5 and est.probability is None and est.range_text() == "[0.25, 0.75] @90%"
    raw = estimate_from(_predictor(Task("quality", "regression", 1, ("quality",)), None), 0.5)
    assert raw.interval is None and raw.coverage is None and raw.range_text() == ""


def test_categorical_set_holds_classes_within_q() -> None:
    task = Task("class", "categorical", 3, ("a", "b", "c"))
    est = estimate_from(_predictor(task, 0.75), torch.tensor([0.2, 0.5, 0.3]))
    # 1 − p ≤ 0.75  ⇔  p ≥ 0.25: b (0.5) and c (0.3), most likely first; a (0.2) is out
    assert est.value == "b" and est.sets == {"class": ("b", "c")} and est.probability == pytest.approx(0.5)
    assert est.summary == "b" and est.range_text() == "{b, c} @90%"
    empty = estimate_from(_predictor(task, 0.1), torch.tensor([0.2, 0.5, 0.3]))
    assert empty.sets == {"class": ()} and empty.range_text() == "∅ @90%"


def test_binary_and_multilabel_sets_per_entry() -> None:
    binary = estimate_from(_predictor(Task("member", "binary", 1, ("member",)), 0.35), torch.tensor(0.7))
    # value 1 has 1 − 0.7 = 0.3 ≤ 0.35: in; value 0 has 1 − 0.3 = 0.7: out
    assert binary.value == "1" and binary.sets == {"member": ("1",)} and binary.summary == pytest.approx(0.7)
    assert binary.probability == pytest.approx(0.7)
    task = Task("classes", "multilabel", 3, ("classes[0]", "classes[1]", "classes[2]"))
    multi = estimate_from(_predictor(task, 0.6), torch.tensor([0.9, 0.45, 0.1]))
    assert multi.value == ("classes[0]",) and multi.summary == 1
    assert multi.sets == {"classes[0]": ("1",), "classes[1]": ("1", "0"), "classes[2]": ("0",)}
    assert multi.range_text() == "1 sure 1 · 1 sure 0 · 1 unsure @90%"


def test_skill_is_the_headline_metric() -> None:
    assert Skill.from_result({"test": {"loss": 1.0, "r2": 0.61}}) == Skill("R²", 0.61, "test")
    assert str(Skill.from_result({"test": {"auc": 0.8, "accuracy": 0.7}})) == "test AUC 0.80"
    assert Skill.from_result({"test": {"r2": math.nan, "accuracy": 0.5}}) == Skill("accuracy", 0.5, "test")
    assert Skill.from_result({}) is None


@pytest.mark.parametrize(
    "estimate",
    [
        Estimate("p", "q", "regression", 0.5, interval=(-math.inf, math.inf), coverage=0.9, skill=Skill("R²", 0.5)),
        Estimate("p", "c", "categorical", "b", {"a": 0.25, "b": 0.75}, sets={"c": ("b",)}, coverage=0.9),
        Estimate("p", "m", "binary", "0", {"m": 0.1}, sets={"m": ("0",)}, coverage=0.9, in_sample=True),
        Estimate("p", "k", "multilabel", ("k[1]",), {"k[0]": 0.1, "k[1]": 0.9}, sets=None),
        Estimate("p", "q", "regression", 0.5, domain_distance=3.25, out_of_domain=True),
        Estimate("p", "q", "regression", 0.5, domain_distance=0.0, out_of_domain=False),
    ],
)
def test_json_round_trip(estimate: Estimate) -> None:
    text = json.dumps(estimate.to_json(), allow_nan=False)  # strict JSON: an infinite bound becomes null
    assert Estimate.from_json(json.loads(text)) == estimate


def test_rows_stored_before_domain_distances_read_as_unknown() -> None:
    old = {  # what to_json wrote before the domain fields existed
        "predictor": "p",
        "label": "q",
        "kind": "regression",
        "value": 0.5,
        "probabilities": {},
        "interval": [0.25, 0.75],
        "sets": None,
        "coverage": 0.9,
        "skill": ["R²", 0.5, "test"],
        "in_sample": False,
    }
    estimate = Estimate.from_json(old)
    assert (estimate.domain_distance, estimate.out_of_domain) == (None, None)
    assert Estimate.from_json(estimate.to_json()) == estimate
    assert estimate.to_json() == old | {"domain_distance": None, "out_of_domain": None}
    with pytest.raises(ValueError, match="both known or both unknown"):
        Estimate("p", "q", "regression", 0.5, domain_distance=1.0)


def test_domain_fields_survive_the_store(tmp_path: Path) -> None:
    pytest.importorskip("duckdb")
    from lol_engine.settings import PREDICTORS_DIR
    from lol_engine.store import LoraStore

    predictor, lora = load_predictor(PREDICTORS_DIR / "digits-acc_own"), load_lora(DIGITS[0])
    estimate = predictor.predict(lora)
    assert estimate.domain_distance is not None and estimate.out_of_domain is not None
    with LoraStore(tmp_path / "lol.duckdb") as store:
        store.add(lora, estimates={predictor.name: estimate})
        assert store.estimates(lora.meta.sha256) == {predictor.name: estimate}


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown task kind"):
        Estimate("p", "q", "ranking", 1.0)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ in-sample
@pytest.fixture
def predictor_with_seen(tmp_path: Path):
    """The shipped digits-acc_own predictor, told it learned from DIGITS[0] (by file) and DIGITS[1] (by ΔW)."""
    from lol_engine.settings import PREDICTORS_DIR

    folder = tmp_path / "digits-acc_own"
    shutil.copytree(PREDICTORS_DIR / "digits-acc_own", folder)
    config = json.loads((folder / "config.json").read_text())
    config["seen"] = {
        "splits": ["train", "val"],
        "sha256": [load_lora(DIGITS[0]).meta.sha256],
        "delta": [delta_digest(load_lora(DIGITS[1]))],
    }
    (folder / "config.json").write_text(json.dumps(config))
    return load_predictor(folder)


def test_in_sample_by_file_and_by_exact_delta(predictor_with_seen, tmp_path: Path) -> None:
    predictor = predictor_with_seen
    assert predictor.predict(load_lora(DIGITS[0])).in_sample
    assert not predictor.predict(load_lora(DIGITS[2])).in_sample
    resaved = tmp_path / "resaved"  # the same factors in a new file (other metadata): another sha256, same ΔW
    resaved.mkdir()
    tensors = load_file(str(DIGITS[1] / "adapter_model.safetensors"))
    save_file(tensors, str(resaved / "adapter_model.safetensors"), metadata={"note": "re-shared"})
    shutil.copyfile(DIGITS[1] / "adapter_config.json", resaved / "adapter_config.json")
    lora = load_lora(resaved)
    assert lora.meta.sha256 != load_lora(DIGITS[1]).meta.sha256
    assert predictor.predict(lora).in_sample
    nudged = tensors | {k: v * (1 + 1e-3) for k, v in tensors.items() if k.endswith("lora_B.weight")}
    save_file(nudged, str(resaved / "adapter_model.safetensors"))  # ΔW changes by 0.1 %: not the same LoRA
    assert not predictor.predict(load_lora(resaved)).in_sample


def test_delta_digest_follows_delta_w_not_the_factors() -> None:
    lora = load_lora(DIGITS[3])
    assert delta_digest(lora) == delta_digest(load_lora(DIGITS[3]))
    doubled = lora.map(lambda a: a * 2.0, lambda b: b * 0.5)  # (2A, B/2): same ΔW, exactly (powers of two)
    assert delta_digest(doubled) == delta_digest(lora)
    assert delta_digest(lora.map(lambda a: a * 2.0, lambda b: b)) != delta_digest(lora)


# ------------------------------------------------------------------------------------------------ migration
def test_schema_1_predictions_become_estimates(tmp_path: Path) -> None:
    pytest.importorskip("duckdb")
    from lol_engine.encoders import load_predictors
    from lol_engine.explorer import Explorer
    from lol_engine.store import SCHEMA_VERSION, LoraStore

    predictors = load_predictors()
    loras = [load_lora(p) for p in DIGITS[:3]]
    fresh = {
        lora.meta.sha256: {n: p.predict(lora) for n, p in predictors.items() if n.startswith("digits-")}
        for lora in loras
    }
    db = tmp_path / "lol.duckdb"
    with LoraStore(db) as store:  # written as version 1 wrote it: bare numbers per target
        for lora in loras:
            store.add(lora)
        with store._cursor() as cur:
            cur.execute("DROP TABLE estimates")
            cur.execute(
                "CREATE TABLE predictions(lora_id VARCHAR, predictor VARCHAR, target VARCHAR, value DOUBLE, "
                "PRIMARY KEY(lora_id, predictor, target))"
            )
            for lora_id, per in fresh.items():
                for name, e in per.items():
                    rows = e.probabilities.items() if e.kind != "regression" else [(e.label, e.value)]
                    for target, value in rows:
                        cur.execute("INSERT INTO predictions VALUES (?, ?, ?, ?)", [lora_id, name, target, value])
            cur.execute("INSERT INTO predictions VALUES (?, 'retired', 'x', 1.0)", [loras[0].meta.sha256])
            cur.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    store = LoraStore(db)
    n_digits = sum(n.startswith("digits-") for n in predictors)
    assert (
        store.schema_version == SCHEMA_VERSION == 3 and len(store.raw_estimates()) == 3 * n_digits + 1
    )  # 3 LoRAs × digits predictors
    explorer = Explorer(store, predictors, tmp_path)
    try:
        explorer.start(zoos=[], progress=False)
        assert [row[1] for row in store.raw_estimates()] == ["retired"]  # kept until its predictor is back
        for lora_id, per in fresh.items():
            stored = explorer.estimates(lora_id)
            assert set(stored) == set(per)
            for name, e in per.items():
                assert stored[name].kind == e.kind and stored[name].interval == pytest.approx(e.interval)
                assert stored[name].probabilities == pytest.approx(e.probabilities)
                assert stored[name].value == (pytest.approx(e.value) if e.kind == "regression" else e.value)
    finally:
        explorer.close()
