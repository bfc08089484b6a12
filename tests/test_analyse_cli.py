"""``lol analyse``: the upload tab's card, predictions and neighbours, through the explorer, as JSON or tables."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
from collection import ZOOS

from lol_engine.cli import _strict, main
from lol_engine.encoders import load_predictors
from lol_engine.lora.parse import load_lora
from lol_engine.symmetry import lora_cosine

pytest.importorskip("duckdb")

DIGITS = sorted((ZOOS / "digits" / "loras").iterdir())


@pytest.fixture(scope="module")
def small_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A collection of three digits LoRAs (added through the explorer, then closed)."""
    from lol_engine.explorer import Explorer

    db = tmp_path_factory.mktemp("analyse") / "data" / "lol.duckdb"
    explorer = Explorer.open(db)
    try:
        for i in (1, 2, 3):
            explorer.add(DIGITS[i], name=f"digit-{i}")
    finally:
        explorer.close()
    return db


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["analyse", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_analyse_finds_neighbours_in_the_collection(small_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _run(capsys, str(DIGITS[5]), "--db", str(small_db))
    query = load_lora(DIGITS[5])
    card = out["card"]
    assert card["sha256"] == query.meta.sha256 and card["autov2"] == query.meta.sha256[:10]
    assert card["addnet_sha256"] and card["format"] == "peft" and card["base_family"] == query.meta.base_family
    assert {"kohya_metadata", "modelspec", "adapter_config"} <= set(card["metadata"])
    assert out["collection"] == {"path": str(small_db), "exists": True, "note": None}
    neighbours = out["neighbours"]
    assert len(neighbours) == 3 and all(n["relation"] is None and n["by"] == "ΔW cosine" for n in neighbours)
    for n in neighbours:  # the exact ΔW cosine, computed here from the stored files
        stored = next(p for i, p in ((i, DIGITS[i]) for i in (1, 2, 3)) if n["name"] == f"digit-{i}")
        assert n["similarity"] == pytest.approx(lora_cosine(query, load_lora(stored)), abs=1e-5)
        assert n["base_family"] == query.meta.base_family and n["id"] == load_lora(stored).meta.sha256
    assert [n["similarity"] for n in neighbours] == sorted((n["similarity"] for n in neighbours), reverse=True)
    assert not (small_db.parent / "uploads" / card["sha256"]).exists()  # analysed, not added


def test_analyse_predictions_are_the_predictors_own(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = _run(capsys, str(DIGITS[6]), "--db", str(tmp_path / "absent.duckdb"))
    lora = load_lora(DIGITS[6])
    fitting = {name: p for name, p in load_predictors().items() if p.fits(lora)}
    assert fitting and {p["predictor"] for p in out["predictions"]} == set(fitting)
    for p in out["predictions"]:
        estimate = fitting[p["predictor"]].predict(lora)
        expected = _strict(estimate.to_json())  # the explorer's batched forward gives the same numbers
        assert {k: p[k] for k in expected} == expected
        assert p["target"] == estimate.label and p["calibrated_range"] == (estimate.range_text() or None)
        predictor = fitting[p["predictor"]]
        assert p["title"] == predictor.glossary.title != estimate.label  # e.g. "Which digits it was finetuned on"
        # the domain distance, recomputed: mean of the 5 smallest distances to the stored training LoRAs
        features = predictor.domain_features_many([lora])[0].double().numpy()
        reference = predictor.reference.embeddings.astype(np.float64)  # type: ignore[union-attr]
        nearest = np.sort(np.linalg.norm(reference - features, axis=1))[:5].mean()
        assert p["domain_distance"] == pytest.approx(nearest, rel=1e-5)
        assert p["out_of_domain"] == (nearest > predictor.config["domain"]["threshold"])


def test_analyse_without_a_collection_creates_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "nowhere" / "lol.duckdb"
    out = _run(capsys, str(DIGITS[7]), "--db", str(db))
    assert out["neighbours"] == [] and out["collection"]["exists"] is False
    assert "neighbours were not searched" in out["collection"]["note"]
    assert not db.exists() and not db.parent.exists()
    assert main(["analyse", str(DIGITS[7]), "--db", str(db)]) == 0  # the readable form says so too
    text = capsys.readouterr().out
    assert "neighbours were not searched" in text and "AutoV2" in text and "predictions" in text


def test_analyse_table_lists_neighbours(small_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyse", str(DIGITS[8]), "--db", str(small_db)]) == 0
    text = capsys.readouterr().out
    assert "nearest stored LoRAs" in text and "digit-1" in text and "ΔW cosine" in text


@pytest.mark.parametrize("kind", ["pickle", "missing", "text"])
def test_bad_input_is_one_error_line_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    path = tmp_path / "bad.safetensors"
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"x": 1}))
    elif kind == "text":
        path.write_text("hello, not a LoRA")
    assert main(["analyse", str(path), "--db", str(tmp_path / "none.duckdb"), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1


def test_strict_json_turns_non_finite_numbers_into_null() -> None:
    data = {"a": math.nan, "b": [1.0, math.inf, -math.inf], "c": {"d": 2, "e": "nan"}}
    assert _strict(data) == {"a": None, "b": [1.0, None, None], "c": {"d": 2, "e": "nan"}}
    json.dumps(_strict(data), allow_nan=False)
