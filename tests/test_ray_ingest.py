"""Ingest on Ray Data: row for row what the single-process ingest stores, bad files in the errors shard, resuming,
list files, Hub repos from an offline cache, and the command line. One local Ray session for the module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("duckdb")
pytest.importorskip("ray")

import ray
from collection import mini_zoo
from lora_files import kohya, save

from lol_engine.cli import main
from lol_engine.ingest import ingest
from lol_engine.labels import read_labels
from lol_engine.scale import ray_ingest
from lol_engine.scale.shards import parts
from lol_engine.store import LoraStore

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "zoo"


@pytest.fixture(scope="module", autouse=True)
def ray_session() -> Any:
    """One local Ray for the module; its workers import this checkout and work offline."""
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two zoo slices with manifest labels, three kohya files with training metadata, a name-keyed labels table,
    and three bad files (a pickle, a truncated safetensors file, a file that holds no LoRA)."""
    root = tmp_path_factory.mktemp("ray-inputs")
    zoos = [mini_zoo(root / "zoos", "fashion-gen", 24), mini_zoo(root / "zoos", "digits", 12)]
    styles = root / "styles"
    for i, name in enumerate(("style-a", "style-b", "style-c")):
        tensors = kohya("lora_unet_mid_block_attentions_0_proj_in", rank=4, alpha=2, seed=i)
        tensors |= kohya("lora_te_text_model_encoder_layers_0_mlp_fc1", rank=4, alpha=4, seed=10 + i)
        meta = {"ss_num_train_images": str(20 * (i + 1)), "ss_network_dim": "4", "ss_learning_rate": "0.0001"}
        save(styles / f"{name}.safetensors", tensors, meta)
    (styles / "evil.safetensors").write_bytes(b"\x80\x04K\x01.")
    good = (styles / "style-a.safetensors").read_bytes()
    (styles / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    shutil.copy(DATA / "digits" / "base" / "digits-mlp-v0.safetensors", styles / "not-a-lora.safetensors")
    table = root / "labels.csv"
    table.write_text("name,quality,style\nstyle-a,0.5,ink\nstyle-b,0.75,oil\nnobody,1.0,none\n")
    paths = [str(z) for z in zoos] + [str(styles)]
    return {"root": root, "paths": paths, "table": table, "styles": styles}


@pytest.fixture(scope="module")
def local_db(inputs: dict[str, Any]) -> Path:
    """The single-process ingest of the same inputs, the reference."""
    db = inputs["root"] / "local.duckdb"
    with LoraStore(db) as store:
        ingest(inputs["paths"], store, labels=read_labels(inputs["table"]), progress=False)
    return db


@pytest.fixture(scope="module")
def ray_run(inputs: dict[str, Any]) -> tuple[Path, Any]:
    db, out = inputs["root"] / "ray.duckdb", inputs["root"] / "shards"
    with LoraStore(db) as store:
        report = ray_ingest(
            inputs["paths"], out, store, labels=read_labels(inputs["table"]), workers=1, progress=False
        )
    return db, report


def _tables(db: Path) -> dict[str, dict[tuple[str, ...], Any]]:
    """Every stored row by key, read with plain SQL (independent of the store's readers)."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        loras = con.execute("SELECT * EXCLUDE (added_at) FROM loras").fetchall()
        labels = con.execute("SELECT lora_id, name, value_json FROM labels").fetchall()
        embeddings = con.execute("SELECT lora_id, encoder, v FROM embeddings").fetchall()
        estimates = con.execute("SELECT lora_id, predictor, estimate_json FROM estimates").fetchall()
    finally:
        con.close()
    return {
        "loras": {(r[0],): r[1:] for r in loras},
        "labels": {(r[0], r[1]): json.loads(r[2]) for r in labels},
        "embeddings": {(r[0], r[1]): np.asarray(r[2], dtype=np.float64) for r in embeddings},
        "estimates": {(r[0], r[1]): json.loads(r[2]) for r in estimates},
    }


def _close(a: Any, b: Any, tol: float) -> bool:
    """Numbers within ``tol`` (absolute, or relative to the larger), recursively through lists and dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return abs(a - b) <= tol * max(1.0, abs(a), abs(b))
    return bool(a == b)


def test_ray_ingest_equals_single_process_row_by_row(local_db: Path, ray_run: tuple[Path, Any]) -> None:
    local, distributed = _tables(local_db), _tables(ray_run[0])
    assert len(local["loras"]) == 24 + 12 + 3
    assert local["loras"] == distributed["loras"]  # names, zoos, formats, specs, metadata, card facts: exact
    assert local["labels"] == distributed["labels"]  # manifest, metadata and table labels
    assert local["embeddings"].keys() == distributed["embeddings"].keys()
    worst = max(
        float(np.max(np.abs(v - distributed["embeddings"][k]) / np.maximum(np.abs(v), 1e-6)))
        for k, v in local["embeddings"].items()
        if k[1] == "fingerprint"
    )
    assert worst <= 1e-5
    for key, vector in local["embeddings"].items():
        np.testing.assert_allclose(distributed["embeddings"][key], vector, rtol=1e-4, atol=1e-4)
    assert local["estimates"].keys() == distributed["estimates"].keys() and len(local["estimates"]) > 36
    for key, estimate in local["estimates"].items():
        assert _close(estimate, distributed["estimates"][key], 1e-4), key
    assert any(k[1] == "quality" for k in local["labels"]) and any(
        k[1] == "ss_num_train_images" for k in local["labels"]
    )


def test_bad_files_land_in_the_errors_shard(inputs: dict[str, Any], ray_run: tuple[Path, Any]) -> None:
    _, report = ray_run
    errors = [row for part in parts(report.out) for row in pq.read_table(part / "errors.parquet").to_pylist()]
    reasons = {Path(e["path"]).name: e["reason"] for e in errors}
    assert set(reasons) == {"evil.safetensors", "truncated.safetensors", "not-a-lora.safetensors"}
    assert "pickle" in reasons["evil.safetensors"] and "no LoRA modules" in reasons["not-a-lora.safetensors"]
    assert all(str(inputs["root"]) not in reason for reason in reasons.values())  # no server path in a reason
    assert len(report.ids) == report.added == 39 and len(report.refused) == 3


def test_rerun_resumes_and_a_copy_is_skipped_by_its_sha256(inputs: dict[str, Any], ray_run: tuple[Path, Any]) -> None:
    db, first = ray_run
    copy = inputs["root"] / "copy"
    copy.mkdir()
    shutil.copy(inputs["styles"] / "style-b.safetensors", copy / "renamed.safetensors")
    with LoraStore(db) as store:
        again = ray_ingest([*inputs["paths"], str(copy)], first.out, store, workers=1, progress=False)
        assert again.ids == [] and again.added == 0 and store.count() == 39
    assert again.skipped == 39 + 1  # 39 tasks recognised unread, the copy by its sha256
    assert len(again.refused) == 3  # bad files are tried again


def test_from_list_with_urls_refused_offline(inputs: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    listing = tmp_path / "list.txt"
    style = inputs["styles"] / "style-c.safetensors"
    listing.write_text(
        f"# LoRAs\n{style}\n\nhttps://example.invalid/a/flat-colors.safetensors\nftp://example.invalid/x\n"
    )
    db, out = tmp_path / "list.duckdb", tmp_path / "out"
    assert main(["ingest", "--from-list", str(listing), "--engine", "ray", "--db", str(db), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "1 ingested" in captured.out and "1 new in the store" in captured.out and str(out) in captured.out
    assert "offline (HF_HUB_OFFLINE): URLs are not downloaded" in captured.err
    assert "ftp URLs are not read" in captured.err
    with LoraStore(db) as store:
        assert [s.name for s in store.all()] == ["style-c"]
    assert main(["ingest", "--from-list", str(listing), "--db", str(db)]) == 2  # the local engine names the way
    assert "URLs are read by --engine ray" in capsys.readouterr().err


def test_hub_repo_from_offline_cache(tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--style-lora"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(DATA / "digits" / "loras" / "00000" / name, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    with LoraStore(tmp_path / "hub.duckdb") as store:
        report = ray_ingest(
            ["someone/style-lora", "someone/not-cached"],
            tmp_path / "out",
            store,
            workers=1,
            progress=False,
            cache_dir=str(tmp_path / "hub"),
        )
        assert len(report.ids) == 1 and store.get(report.ids[0]).name == "someone/style-lora"
        assert store.get(report.ids[0]).format == "peft" and "lol:digits-classes" in store.encoders()
    assert report.refused == [("someone/not-cached", report.refused[0][1])]
    assert "not in its local cache" in report.refused[0][1]


def test_cli_end_to_end(inputs: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    db = tmp_path / "cli.duckdb"
    zoo = inputs["paths"][1]  # the digits slice
    assert main(["ingest", zoo, "--engine", "ray", "--db", str(db), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "12 ingested, 0 skipped" in out and str(tmp_path / "cli.shards") in out
    assert "12 LoRA(s) in the store" in out
    with LoraStore(db) as store:
        assert {s.zoo for s in store.all()} == {"digits"}
    assert main(["ingest", "--engine", "ray", "--db", str(db)]) == 2
    assert "nothing to ingest" in capsys.readouterr().err


def test_workers_import_this_checkout() -> None:
    @ray.remote
    def where() -> str:
        import lol_engine

        return lol_engine.__file__

    assert ray.get(where.remote()).startswith(str(ROOT))


def test_benchmark_quick_smoke() -> None:
    """benchmarks/bench_ray_ingest.py --quick runs end to end in this Ray session (no timing is asserted)."""
    import runpy

    module = runpy.run_path(str(ROOT / "benchmarks" / "bench_ray_ingest.py"))
    rows = module["main"](["--quick"])
    cases = [row[1] for row in rows]
    assert any("Ray, 1 worker(s)" in c for c in cases) and any("single process" in c for c in cases)
    assert sum(row[0] == "per-file cost" for row in rows) == 4 and all(len(row) == 6 for row in rows)


def test_loading_shards_again_leaves_stored_loras_alone(ray_run: tuple[Path, Any]) -> None:
    """load_shards adds only LoRAs the store lacks: a label edited since is kept, nothing is added twice."""
    db, report = ray_run
    with LoraStore(db) as store:
        lora_id = report.ids[0]
        before = store.labels(lora_id)
        store.set_labels({lora_id: {"quality": 9.5}})
        assert store.load_shards(parts(report.out)) == 0 and store.count() == 39
        assert store.labels(lora_id) == before | {"quality": 9.5}
        assert store.has([lora_id, "0" * 64]) == {lora_id} and sorted(report.ids) == store.ids()


def test_sha256_keyed_labels_join_as_results_arrive(inputs: dict[str, Any], tmp_path: Path) -> None:
    from lol_engine.lora.safe_io import file_sha256

    style = inputs["styles"] / "style-a.safetensors"
    table = tmp_path / "by-sha.csv"
    table.write_text(f"sha256,ss_network_dim,mood\n{file_sha256(style)},5,calm\n{'f' * 64},1,none\n")
    with LoraStore(tmp_path / "sha.duckdb") as store:
        report = ray_ingest([str(style)], tmp_path / "out", store, labels=read_labels(table, "sha256"), progress=False)
        labels = store.labels(report.ids[0])
    assert labels["mood"] == "calm" and labels["ss_network_dim"] == 5  # the table's label wins over the file's
    assert report.labels is not None and report.labels.unmatched_rows == ["f" * 64]
