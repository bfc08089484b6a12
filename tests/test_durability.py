"""A durable stop: checkpoints after writes, ``lol export`` and its restore, a newer collection refused in one line,
and a ``lol serve`` stopped by SIGTERM that leaves its collection whole and nothing of its uploads behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from collection import ZOOS, mini_zoo

duckdb = pytest.importorskip("duckdb")

from app import handlers  # noqa: E402
from lol_engine.cli import main  # noqa: E402
from lol_engine.explorer import Explorer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DIGITS = sorted((ZOOS / "digits" / "loras").iterdir())


def _explorer(root: Path, n: int = 6) -> Explorer:
    explorer = Explorer.open(root / "data" / "lol.duckdb")
    explorer.ensure_default([mini_zoo(root / "zoos", "digits", n)], progress=False)
    return explorer


def _newer_collection(folder: Path) -> Path:
    from lol_engine.store import LoraStore

    db = folder / "lol.duckdb"
    LoraStore(db).close()
    con = duckdb.connect(str(db))
    con.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    con.close()
    return db


def test_ingest_and_add_leave_nothing_only_in_the_wal(tmp_path: Path) -> None:
    explorer = _explorer(tmp_path)
    wal = Path(explorer.store.path + ".wal")
    assert explorer.store.count() == 6 and not wal.exists()  # ingest and map fits were checkpointed
    upload = tmp_path / "mine.safetensors"
    shutil.copyfile(DIGITS[100] / "adapter_model.safetensors", upload)
    assert "Added **mine**" in handlers.add_upload(explorer, [str(upload)])
    assert not wal.exists()
    explorer.fit_maps()
    assert not wal.exists()
    explorer.close()


def test_lol_export_writes_a_collection_that_restores_elsewhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    explorer = _explorer(tmp_path / "old")
    upload = tmp_path / "mine.safetensors"
    shutil.copyfile(DIGITS[100] / "adapter_model.safetensors", upload)
    handlers.add_upload(explorer, [str(upload)])
    added = next(s.id for s in explorer.store.all() if s.zoo is None)
    labels = {s.id: explorer.store.labels(s.id) for s in explorer.store.all()}
    explorer.close()
    db = tmp_path / "old" / "data" / "lol.duckdb"
    (db.parent / "uploads" / ".abc-staging").mkdir()  # a killed add's leftovers are not exported

    assert main(["export", "--db", str(db), str(tmp_path / "backup")]) == 0
    assert "7 LoRA(s) exported" in capsys.readouterr().out
    shutil.rmtree(tmp_path / "old")  # the original is gone: the backup stands alone
    assert sorted(p.name for p in (tmp_path / "backup").iterdir()) == ["lol.duckdb", "uploads"]
    assert [p.name for p in (tmp_path / "backup" / "uploads").iterdir()] == [added]

    restored = Explorer.open(tmp_path / "backup" / "lol.duckdb")
    assert restored.store.count() == 7
    assert {s.id: restored.store.labels(s.id) for s in restored.store.all()} == labels
    assert restored.weights(added).meta.sha256 == added  # read from the backup's own uploads/
    assert len(restored.neighbours(restored.weights(added), k=3, exclude=added)) == 3
    restored.close()

    assert main(["export", "--db", str(tmp_path / "backup" / "lol.duckdb"), str(tmp_path / "backup")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not empty" in err[0]


def test_a_newer_collection_stops_lol_serve_and_the_space_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = _newer_collection(tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["serve", "--db", str(db)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "schema version 7 is newer" in err[0], err
    assert "upgrade lol-explorer" in err[0]
    assert signal.getsignal(signal.SIGTERM) == before

    env = {**os.environ, "LOL_DATA_DIR": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "space_app.py")], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is newer" in lines[0], lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _files(folder: Path) -> list[str]:
    """Files under ``folder`` with content (Gradio's gr.File leaves 0-byte ``tmp*`` stubs at every event)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.stat().st_size)


@pytest.mark.slow
def test_sigterm_stops_lol_serve_with_the_collection_whole_and_no_upload_left(tmp_path: Path) -> None:
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file

    _explorer(tmp_path, n=4).close()
    db = tmp_path / "data" / "lol.duckdb"
    gtemp = tmp_path / "gradio-temp"
    port = _free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(gtemp), "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "lol_engine.cli", "serve", "--db", str(db), "--port", str(port)]
    server = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, server.stdout.read() if server.stdout else ""
                time.sleep(0.5)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        upload = tmp_path / "mine.safetensors"
        shutil.copyfile(DIGITS[300] / "adapter_model.safetensors", upload)
        card = client.predict([handle_file(str(upload))], "", api_name="/analyse")[0]
        assert "mine" in card and _files(gtemp) == []  # analysed: out of Gradio's folder at once
        assert "Added **mine**" in client.predict([], "", api_name="/add")  # the upload analysed last, held
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"\0" * 64)
        with pytest.raises(Exception, match=r"bad\.safetensors"):
            client.predict([handle_file(str(bad))], "", api_name="/analyse")
        assert _files(gtemp) == []  # refused: gone too
        client.close()

        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0, out[-3000:]
    assert "Stopped" in out
    assert list(gtemp.iterdir()) == []  # this run's Gradio folder is gone, stubs and all
    assert not Path(str(db) + ".wal").exists()
    assert not (db.parent / "uploads" / ".held").exists()
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT name FROM loras WHERE zoo IS NULL").fetchall() == [("mine",)]
    con.close()
