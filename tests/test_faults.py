"""Faults and hostile input around the store and the upload path: clear errors, nothing half-written, no pickle.

- the database: corrupt, held by another process, at a path that cannot hold it, and a full disk (simulated with
  ``RLIMIT_FSIZE`` in a child process) — each a :class:`StoreError` that says what to do; after the full disk the
  collection holds exactly the LoRAs whose writes committed;
- the upload path: ``pickle``/``torch.load``/``numpy.load`` are made to explode, then every kind of upload is analysed
  and added; the source of the modules on that path never names them; uploaded names never become paths.
"""

from __future__ import annotations

import ast
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from collection import ZOOS, mini_zoo
from lora_files import kohya, save

pytest.importorskip("duckdb")

from lol_engine.errors import StoreError
from lol_engine.store import LoraStore

ROOT = Path(__file__).resolve().parent.parent
DIGITS = sorted((ZOOS / "digits" / "loras").iterdir())


def test_a_corrupt_database_is_named(tmp_path: Path) -> None:
    db = tmp_path / "lol.duckdb"
    db.write_bytes(os.urandom(20_000))
    with pytest.raises(StoreError, match=r"is not a DuckDB database .* move it away"):
        LoraStore(db)


def test_a_path_that_cannot_hold_a_database(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot open the collection database"):
        LoraStore(tmp_path / "file" / "lol.duckdb")


def test_a_database_held_by_another_process(tmp_path: Path) -> None:
    db = tmp_path / "lol.duckdb"
    code = f"import duckdb, time; c = duckdb.connect({str(db)!r}); print('ok', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"ok"
        with pytest.raises(StoreError, match="open in another process; run one app"):
            LoraStore(db)
    finally:
        holder.kill()
        holder.wait()


_FULL_DISK = """
import resource, signal, sys
sys.path[:0] = [sys.argv[3]]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like a full disk
from lol_engine.encoders import FingerprintEncoder
from lol_engine.errors import StoreError
from lol_engine.ingest import ingest
from lol_engine.store import LoraStore

store = LoraStore(sys.argv[1])
store.count()
resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
try:
    ingest([sys.argv[2]], store, [FingerprintEncoder()], progress=False, batch=64)  # the disk fills in a later batch
except StoreError as exc:
    print("STORE-ERROR", exc)
"""


def test_a_full_disk_stops_the_ingest_cleanly(tmp_path: Path) -> None:
    zoo = mini_zoo(tmp_path / "zoos", "digits", 400)
    db = tmp_path / "lol.duckdb"
    result = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(db), str(zoo), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert "STORE-ERROR" in result.stdout, result.stdout[-1000:] + result.stderr[-2000:]
    assert "nothing of it was stored" in result.stdout and "File too large" in result.stdout
    with LoraStore(db) as store:  # reopened without the limit: only whole LoRAs, and they can be completed
        n = store.count()
        assert 0 < n < 400
        with store._cursor() as cur:
            missing = cur.execute(
                "SELECT count(*) FROM loras WHERE id NOT IN (SELECT lora_id FROM embeddings WHERE encoder = "
                "'fingerprint') OR id NOT IN (SELECT lora_id FROM labels)"
            ).fetchone()[0]
        assert missing == 0
        from lol_engine.encoders import FingerprintEncoder
        from lol_engine.ingest import ingest

        ingest([str(zoo)], store, [FingerprintEncoder()], progress=False)
        assert store.count() == 400


# ------------------------------------------------------------------------------------------------ the upload path
UPLOAD_PATH_MODULES = [
    "lol_engine/lora/safe_io.py",
    "lol_engine/lora/parse.py",
    "lol_engine/lora/keys.py",
    "lol_engine/lora/config.py",
    "lol_engine/lora/family.py",
    "lol_engine/lora/weights.py",
    "lol_engine/report.py",
    "lol_engine/fingerprint.py",
    "lol_engine/symmetry.py",
    "lol_engine/similarity.py",
    "lol_engine/explorer.py",
    "lol_engine/ingest.py",
    "lol_engine/store.py",
    "lol_engine/train/checkpoint.py",
    "lol_engine/train/calibrate.py",
    "app/handlers.py",
    "app/ui.py",
    "app/serve.py",
]
_FORBIDDEN = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("torch", "load"),
    ("np", "load"),
    ("numpy", "load"),
    ("joblib", "load"),
    ("dill", "load"),
}


def test_the_upload_path_never_names_pickle_eval_or_torch_load() -> None:
    for module in UPLOAD_PATH_MODULES:
        tree = ast.parse((ROOT / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not {"pickle", "dill", "joblib", "cloudpickle"} & set(names), (module, node.lineno)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert (node.value.id, node.attr) not in _FORBIDDEN, (module, node.lineno)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec", "__import__"), (module, node.lineno)


def test_no_unpickling_is_reachable_from_uploads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    import torch

    from app import handlers
    from lol_engine.explorer import Explorer

    def explode(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling was reached from the upload path")

    explorer = Explorer.open(tmp_path / "data" / "lol.duckdb")
    explorer.ensure_default([mini_zoo(tmp_path / "zoos", "digits", 6)], progress=False)
    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"), (np, "load")):
        monkeypatch.setattr(target, name, explode)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    uploads = [
        [str(DIGITS[50] / "adapter_model.safetensors"), str(DIGITS[50] / "adapter_config.json")],
        [str(save(tmp_path / "k.safetensors", kohya(stem)))],
    ]
    for paths in uploads:
        handlers.analyse_upload(explorer, paths)
        handlers.add_upload(explorer, paths)
        handlers.inspect_upload(paths)
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(b"\x80\x04K\x01.")  # a pickle: refused by its magic bytes, never loaded
    with pytest.raises(Exception, match="pickle"):
        handlers.analyse_upload(explorer, [str(evil)])
    assert explorer.store.count() == 8
    explorer.close()


def test_uploaded_names_never_become_paths(tmp_path: Path) -> None:
    from app import handlers
    from lol_engine.explorer import Explorer

    explorer = Explorer.open(tmp_path / "data" / "lol.duckdb")
    hostile = tmp_path / "up" / "..%2F..%2Fescape <img src=x onerror=alert(1)>.safetensors"
    hostile.parent.mkdir()
    shutil.copyfile(DIGITS[60] / "adapter_model.safetensors", hostile)
    message = handlers.add_upload(explorer, [str(hostile)])
    assert "&lt;img" in message and "<img" not in message
    lora_id = explorer.store.all()[0].id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "up"]  # nothing written beside them
    uploads = [p.relative_to(tmp_path / "data" / "uploads") for p in (tmp_path / "data" / "uploads").rglob("*")]
    assert sorted(uploads) == [Path(lora_id), Path(lora_id) / "adapter_model.safetensors"]
    assert explorer.store.get(lora_id).name == "..%2F..%2Fescape <img src=x onerror=alert(1)>"  # text, shown escaped
    explorer.close()


def test_stale_staging_and_exports_are_cleaned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lol_engine.explorer import Explorer

    stale = tmp_path / "data" / "uploads" / ".abc123-killed"
    stale.mkdir(parents=True)
    (stale / "adapter_model.safetensors").write_bytes(b"partial")
    explorer = Explorer.open(tmp_path / "data" / "lol.duckdb")
    assert stale.exists()  # opening has no side effect
    explorer.start(zoos=[], progress=False)  # the start-up step removes what a killed add left
    assert not stale.exists()

    pytest.importorskip("gradio")
    import pandas as pd

    from app import ui

    try:
        explorer.ingest([str(DIGITS[0]), str(DIGITS[1])], progress=False)
        a, b = (r["id"] for r in explorer.records())
        monkeypatch.setattr(ui.tempfile, "gettempdir", lambda: str(tmp_path))
        first = Path(ui._export(explorer, pd.DataFrame({"id": [a]}), "csv"))
        old = time.time() - 7200
        os.utime(first.parent, (old, old))
        second = Path(ui._export(explorer, pd.DataFrame({"id": [b]}), "csv"))
        assert second.exists() and not first.exists()
    finally:
        explorer.close()


def test_cli_reports_a_bad_database_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lol_engine.cli import main

    db = tmp_path / "lol.duckdb"
    db.write_bytes(b"\0" * 5000)
    assert main(["ingest", str(DIGITS[0]), "--db", str(db)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not a DuckDB database" in err[0]
