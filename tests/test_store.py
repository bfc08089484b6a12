"""The DuckDB store: idempotent and atomic ingest, concurrent writers, kNN against numpy, persistence, schema."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

duckdb = pytest.importorskip("duckdb")

from lol_engine import load_lora  # noqa: E402
from lol_engine.encoders import FingerprintEncoder  # noqa: E402
from lol_engine.errors import StoreError  # noqa: E402
from lol_engine.estimate import Estimate  # noqa: E402
from lol_engine.fingerprint import fingerprint  # noqa: E402
from lol_engine.store import SCHEMA_VERSION, LoraStore  # noqa: E402

ZOO = Path(__file__).parent.parent / "data" / "zoo" / "digits" / "loras"


@pytest.fixture(scope="module")
def loras():
    return [load_lora(ZOO / f"{i:05d}") for i in range(12)]


def test_ingest_is_idempotent_and_keeps_what_is_attached(tmp_path: Path, loras) -> None:
    with LoraStore(tmp_path / "db.duckdb") as store:
        estimate = Estimate("gl_net", "acc_own", "regression", 0.8, interval=(0.7, 0.9), coverage=0.9)
        first = store.add(loras[0], zoo="digits", labels={"acc_own": 0.9}, estimates={"gl_net": estimate})
        again = store.add(loras[0], zoo="digits", labels={"acc_own": 0.9})
        assert first == again == loras[0].meta.sha256
        assert store.count() == 1
        stored = store.get(first)
        assert stored.name == "00000" and stored.format == "peft" and stored.base_family == "digits-mlp"
        assert stored.rank_min == stored.rank_max == 4 and [m["name"] for m in stored.spec] == ["fc1", "fc2"]
        assert store.labels(first) == {"acc_own": 0.9}
        assert store.estimates(first) == {"gl_net": estimate}
        assert store.schema_version == SCHEMA_VERSION
    with LoraStore(tmp_path / "db.duckdb") as reopened:  # restarting keeps the collection
        assert reopened.count() == 1 and reopened.get(first).zoo == "digits"


def test_failed_ingest_leaves_nothing(tmp_path: Path, loras) -> None:
    with LoraStore(tmp_path / "db.duckdb") as store:
        bad = {"fp": np.array([1.0, np.nan])}
        with pytest.raises(ValueError, match="non-finite"):
            store.add(loras[1], labels={"x": 1}, embeddings=bad)
        assert store.count() == 0 and store.labels(loras[1].meta.sha256) == {}
        store.add(loras[1])  # the store still works after the rollback
        assert store.count() == 1


def test_concurrent_ingests_lose_nothing(tmp_path: Path, loras) -> None:
    with LoraStore(tmp_path / "db.duckdb") as store:
        errors = []

        def ingest(chunk) -> None:
            try:
                for lora in chunk:
                    store.add(lora, embeddings={"fp": fingerprint(lora).numpy()})
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=ingest, args=(loras[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert store.count() == 12 and len(store.embeddings("fp")[0]) == 12


def test_nearest_matches_numpy(loras) -> None:
    with LoraStore(":memory:") as store:
        vectors = {}
        for lora in loras:
            vectors[lora.meta.sha256] = fingerprint(lora).numpy().astype(np.float32)
            store.add(lora, embeddings={"fp": vectors[lora.meta.sha256]})
        query = vectors[loras[0].meta.sha256]
        ids = list(vectors)
        matrix = np.stack([vectors[i] for i in ids])
        sims = matrix @ query / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query))
        expected = [ids[i] for i in np.argsort(-sims)[:5]]
        got = store.nearest("fp", query, k=5)
        assert [g[0] for g in got] == expected
        assert got[0][1] == pytest.approx(1.0, abs=1e-5)
        assert loras[0].meta.sha256 not in [
            g[0] for g in store.nearest("fp", query, k=5, exclude=loras[0].meta.sha256)
        ]


def test_projections(loras) -> None:
    with LoraStore(":memory:") as store:
        ids = [store.add(lora) for lora in loras[:3]]
        store.set_projection("umap:fp", ids, np.arange(6).reshape(3, 2))
        got_ids, xy = store.projection("umap:fp")
        assert sorted(ids) == got_ids and xy.shape == (3, 2)
        with pytest.raises(ValueError, match="shape"):
            store.set_projection("umap:fp", ids, np.zeros((2, 2)))


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db.duckdb"
    LoraStore(path).close()
    con = duckdb.connect(str(path))
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(StoreError, match=r"schema version 99 is newer .* upgrade lol-explorer"):
        LoraStore(path)
    duckdb.connect(str(path)).close()  # the refused open let go of the file


def test_checkpoint_and_close_leave_everything_in_the_file(tmp_path: Path, loras) -> None:
    path = tmp_path / "db.duckdb"
    wal = tmp_path / "db.duckdb.wal"
    store = LoraStore(path)
    store.add(loras[0])
    assert wal.exists()  # committed, but only in the write-ahead log
    store.checkpoint()
    assert not wal.exists()
    store.add(loras[1])
    store.close()
    store.close()  # twice is harmless
    assert not wal.exists()
    with LoraStore(path) as reopened:
        assert reopened.count() == 2


def test_backup_is_a_complete_copy_of_an_open_store(tmp_path: Path, loras) -> None:
    with LoraStore(tmp_path / "db.duckdb") as store:
        store.add(loras[0], labels={"acc_own": 0.5}, embeddings={"fp": fingerprint(loras[0]).numpy()})
        store.add(loras[1])  # still only in the .wal
        store.backup(tmp_path / "copy.duckdb")
        with pytest.raises(StoreError, match="exists already"):
            store.backup(tmp_path / "copy.duckdb")
        store.add(loras[2])  # after the backup: not in it
    assert not (tmp_path / "copy.duckdb.wal").exists()
    with LoraStore(tmp_path / "copy.duckdb") as copy:
        assert sorted(s.id for s in copy.all()) == sorted(lora.meta.sha256 for lora in loras[:2])
        assert copy.labels(loras[0].meta.sha256) == {"acc_own": 0.5}
        assert copy.embeddings("fp")[0] == [loras[0].meta.sha256]
        assert copy.schema_version == SCHEMA_VERSION


_KILLED_INGEST = """
import os, signal, sys
import lol_engine.store as store_module
from lol_engine.encoders import FingerprintEncoder
from lol_engine.ingest import ingest
from lol_engine.store import LoraStore

calls = {"n": 0}
insert_many = store_module._insert_many

def dying_insert(cur, table, rows):
    calls["n"] += 1
    if calls["n"] == 5:  # inside the second batch's transaction: its loras rows are written, nothing committed
        os.kill(os.getpid(), signal.SIGKILL)
    insert_many(cur, table, rows)

store_module._insert_many = dying_insert
ingest([sys.argv[2]], LoraStore(sys.argv[1]), [FingerprintEncoder()], progress=False, batch=2)
"""


def test_a_killed_ingest_leaves_only_complete_loras(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from collection import mini_zoo

    zoo = mini_zoo(tmp_path / "zoos", "digits", 6)
    db = tmp_path / "db.duckdb"
    result = subprocess.run(
        [sys.executable, "-c", _KILLED_INGEST, str(db), str(zoo)], capture_output=True, check=False
    )
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    with LoraStore(db) as store:
        assert store.count() == 2  # the first batch (2 LoRAs) committed; the second died mid-transaction
        for lora_id in [s.id for s in store.all()]:
            assert store.labels(lora_id) and store.embedding(lora_id, "fingerprint") is not None
        with store._cursor() as cur:
            for table in ("labels", "embeddings"):
                orphans = cur.execute(f"SELECT count(*) FROM {table} WHERE lora_id NOT IN (SELECT id FROM loras)")
                assert orphans.fetchone()[0] == 0, table
        from lol_engine.ingest import ingest

        report = ingest([str(zoo)], store, [FingerprintEncoder()], progress=False)  # a rerun completes the collection
        assert not report.refused and store.count() == 6


def test_added_at_is_utc_whatever_the_local_time_zone(tmp_path: Path) -> None:
    """Under UTC+14 a local timestamp would sort a LoRA added now after one added 13 hours from now elsewhere."""
    import datetime
    import os
    import subprocess
    import sys

    lora = ZOO / "00003"
    script = (
        "import sys; from lol_engine import load_lora; from lol_engine.store import LoraStore\n"
        "with LoraStore(sys.argv[1]) as s: print(s.get(s.add(load_lora(sys.argv[2]))).added_at.isoformat())"
    )
    env = {**os.environ, "TZ": "Pacific/Kiritimati"}
    before = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "lol.duckdb"), str(lora)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    after = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    added = datetime.datetime.fromisoformat(out.stdout.strip())
    assert before - datetime.timedelta(seconds=1) <= added <= after + datetime.timedelta(seconds=1)
