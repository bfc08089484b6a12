"""The app's JSON API as plain functions (app/api.py), and the background start-up (app/startup.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from collection import ZOOS

pytest.importorskip("duckdb")
pytest.importorskip("plotly")

from app import api
from app.startup import StartupJob
from lol_engine.encoders import FINGERPRINT
from lol_engine.errors import BadRequestError, NotFoundError, StoreError
from lol_engine.explorer import Explorer


def _json(value: Any) -> Any:
    """``value`` through strict JSON (no NaN), as a client receives it."""
    return json.loads(json.dumps(value, allow_nan=False))


def test_lora_returns_fields_labels_predictions_and_neighbours(collection: Explorer) -> None:
    record = next(r for r in collection.records() if r["zoo"] == "digits")
    got = _json(api.lora(collection, record["id"], k=5))
    assert got["id"] == got["sha256"] == record["id"] and got["name"] == record["name"]
    assert got["collection"] == "digits" and got["rank_max"] == record["rank"]
    assert got["labels"]["acc_all"] == pytest.approx(collection.labels(record["id"])["acc_all"])
    stored = collection.estimates(record["id"])
    assert {p["predictor"] for p in got["predictions"]} == set(stored)
    assert [n["id"] for n in got["neighbours"]] == [n.id for n in collection.neighbours_of(record["id"], k=5)]
    assert got["card"]["hashes"]["sha256"] == record["id"] and got["card"]["base_family"] == "digits-mlp"
    sims = [n["similarity"] for n in got["neighbours"]]
    assert sims == sorted(sims, reverse=True) and len(sims) == 5
    by_map = api.neighbours(collection, record["id"], 3, FINGERPRINT)
    assert len(by_map) == 3 and all(n["by"] != "ΔW cosine" for n in by_map)
    with pytest.raises(BadRequestError, match="k must be 1–100"):
        api.lora(collection, record["id"], k=0)
    with pytest.raises(BadRequestError, match="unknown encoder 'nope'"):
        api.neighbours(collection, record["id"], 3, "nope")
    with pytest.raises(NotFoundError):
        api.lora(collection, "f" * 64)


def test_collection_rows_filter_and_page(collection: Explorer) -> None:
    records = collection.records()
    first = api.collection_rows(collection, limit=10, offset=0)
    assert first["total"] == len(records) and [r["id"] for r in first["rows"]] == [r["id"] for r in records[:10]]
    second = api.collection_rows(collection, limit=10, offset=10)
    assert [r["id"] for r in second["rows"]] == [r["id"] for r in records[10:20]]
    digits = api.collection_rows(collection, collection="digits", limit=1000)
    assert digits["total"] == sum(r["zoo"] == "digits" for r in records)
    one = api.collection_rows(collection, search=records[3]["id"][:12])
    assert [r["id"] for r in one["rows"]] == [records[3]["id"]]
    _json(first)
    with pytest.raises(BadRequestError, match="limit must be"):
        api.collection_rows(collection, limit=0)


def test_comparison_is_the_cosine_of_the_dense_updates(collection: Explorer) -> None:
    """Checked against ΔW = scale·B·A materialised in float64 by hand, module by module and over all."""
    first, second = [r["id"] for r in collection.records() if r["zoo"] == "digits"][:2]
    got = _json(api.comparison(collection, first, second))
    a, b = collection.weights(first), collection.weights(second)

    def dense(lora: Any) -> dict[str, np.ndarray]:
        return {m.name: m.scale * (m.b.double() @ m.a.double()).numpy() for m in lora}

    da, db = dense(a), dense(b)
    shared = sorted(set(da) & set(db))
    assert sorted(m["module"] for m in got["modules"]) == shared and got["comparable"] and got["reason"] is None
    for row in got["modules"]:
        x, y = da[row["module"]].ravel(), db[row["module"]].ravel()
        assert row["cosine"] == pytest.approx(x @ y / np.linalg.norm(x) / np.linalg.norm(y), abs=1e-4)
        assert row["norm_first"] == pytest.approx(np.linalg.norm(x), rel=1e-4)
    x = np.concatenate([da[n].ravel() for n in shared])
    y = np.concatenate([db[n].ravel() for n in shared])
    assert got["cosine"] == pytest.approx(x @ y / np.linalg.norm(x) / np.linalg.norm(y), abs=1e-4)
    fashion = next(r["id"] for r in collection.records() if r["zoo"] == "fashion-gen")
    across = _json(api.comparison(collection, first, fashion))
    assert across["cosine"] is None and not across["comparable"] and across["modules"] == []
    assert across["reason"] == "digits-mlp and fashion-vae LoRAs adapt different models: their ΔW cannot be compared"


def test_prediction_of_an_upload_stores_nothing(collection: Explorer) -> None:
    folder = ZOOS / "fashion-gen" / "loras" / "00040"
    before = collection.count()
    got = _json(
        api.prediction(
            collection, [str(folder / "adapter_model.safetensors"), str(folder / "adapter_config.json")], k=4
        )
    )
    assert got["base_family"] == "fashion-vae" and got["format"] == "peft" and len(got["neighbours"]) == 4
    assert {p["predictor"] for p in got["predictions"]} == {
        "fashion-gen-bold",
        "fashion-gen-class",
        "fashion-gen-quality",
    }
    assert collection.count() == before


def test_maps_and_their_points(collection: Explorer, monkeypatch: pytest.MonkeyPatch) -> None:
    maps = api.maps(collection)
    assert maps[0]["encoder"] == FINGERPRINT and maps[0]["points"] == len(collection.map_points(FINGERPRINT)[0])
    points = _json(api.map_points(collection, FINGERPRINT, limit=7))
    ids, xy = collection.map_points(FINGERPRINT)
    assert points["ids"] == ids[:7] and np.allclose(points["x"], xy[:7, 0]) and np.allclose(points["y"], xy[:7, 1])
    assert (points["total"], points["offset"], points["next_offset"]) == (len(ids), 0, 7)
    pages, offset = [], 0  # paging from next_offset to None walks every point once, in order
    while offset is not None:
        page = _json(api.map_points(collection, FINGERPRINT, limit=30, offset=offset))
        pages.append(page)
        offset = page["next_offset"]
    assert [len(p["ids"]) for p in pages] == [min(30, len(ids) - k) for k in range(0, len(ids), 30)]
    assert [i for p in pages for i in p["ids"]] == ids
    np.testing.assert_allclose([y for p in pages for y in p["y"]], xy[:, 1])
    assert _json(api.map_points(collection, FINGERPRINT, offset=10**9))["ids"] == []
    monkeypatch.setattr(api, "MAX_MAP_PAGE", 5)  # however large the limit asked, a page is bounded
    assert len(_json(api.map_points(collection, FINGERPRINT, limit=10**9))["ids"]) == 5
    with pytest.raises(BadRequestError, match="no map 'nope'"):
        api.map_points(collection, "nope")


# ------------------------------------------------------------------------------------------------ start-up
class _Blocking:
    """An explorer whose start waits for a signal, reporting progress on the way (or failing)."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.go = threading.Event()
        self.fail = fail

    def start(self, zoos: Any, progress: bool, on_progress: Any) -> bool:
        on_progress("ingest", 5, 20)
        self.go.wait(30)
        if self.fail is not None:
            raise self.fail
        on_progress("maps", 1, 2)
        return True


def test_the_startup_job_reports_progress_refuses_adds_and_finishes() -> None:
    fake = _Blocking()
    job = StartupJob(fake, [Path("zoo")]).run(background=True)  # type: ignore[arg-type]
    for _ in range(100):
        if "5 of 20" in job.status():
            break
        threading.Event().wait(0.01)
    assert "reading the default zoos: 5 of 20 LoRAs" in job.status() and job.fraction() == pytest.approx(0.2)
    assert not job.finished
    with pytest.raises(BadRequestError, match=r"still being built \(20%\)"):
        job.check_can_write()
    fake.go.set()
    assert job.wait(10) and job.finished and job.status() == "" and job.fraction() == 1.0
    job.check_can_write()
    assert job.seconds is not None and job.seconds >= 0


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (StoreError("/srv/data/lol.duckdb: disk full"), "could not be built: /srv/data/lol.duckdb: disk full"),
        (RuntimeError("secret /srv/path"), "internal error (RuntimeError); see the server log"),
    ],
)
def test_a_failed_startup_is_said_and_a_bug_is_not_detailed(error: Exception, said: str) -> None:
    fake = _Blocking(error)
    fake.go.set()
    job = StartupJob(fake).run(background=False)  # type: ignore[arg-type]
    assert job.finished and said in job.status()
    assert "secret" not in job.status()


def test_the_startup_job_builds_a_real_collection(tmp_path: Path) -> None:
    from collection import mini_zoo

    zoo = mini_zoo(tmp_path / "zoos", "digits", 12)
    explorer = Explorer.open(tmp_path / "data" / "lol.duckdb")
    try:
        steps: list[tuple[str, int, int]] = []
        job = StartupJob(explorer, [zoo])
        job._progress = lambda *step: steps.append(step)  # type: ignore[method-assign]
        job.run(background=False)
        assert job.error is None and explorer.count() == 12 and explorer.maps()
        ingest = [s for s in steps if s[0] == "ingest"]
        assert [d for _, d, _ in ingest] == list(range(1, 13)) and {t for *_, t in ingest} == {12}
        maps = [s for s in steps if s[0] == "maps"]
        assert maps[0][1] == 0 and maps[-1][1] == maps[-1][2] == len(explorer.maps())
    finally:
        explorer.close()


def test_collection_status(collection: Explorer) -> None:
    got = _json(api.collection_status(collection))
    assert got["loras"] == collection.count() and got["maps"] == collection.maps() and not got["building"]
    assert got["predictors"] == sorted(collection.predictors) and got["progress"] == 1.0 and got["message"] is None


def test_predictors_are_their_glossaries(collection: Explorer) -> None:
    got = _json(api.predictors(collection))
    assert [g["predictor"] for g in got] == sorted(collection.predictors)
    quality = next(g for g in got if g["predictor"] == "fashion-gen-quality")
    assert quality["title"] and quality["meaning"] and quality["base"]["family"] == "fashion-vae"
