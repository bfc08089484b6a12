"""Uploads leave nothing behind and messages leak nothing: ``app/uploads.py``, ``app/web.py``, ``public_message``."""

from __future__ import annotations

import asyncio
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from collection import ZOOS

pytest.importorskip("plotly")

from app.handlers import public_message
from app.uploads import UploadHold, UploadLedger, discard, held_root
from app.web import DEFAULT_MAX_UPLOAD, UPLOAD_SLACK, UploadGuard, max_upload_bytes, parse_size

DIGIT = ZOOS / "digits" / "loras" / "00011" / "adapter_model.safetensors"


def _upload(root: Path, name: str, content: bytes = b"x" * 10) -> Path:
    """A file as Gradio stores an upload: ``<root>/<hash>/<name>``."""
    path = root / f"{abs(hash((name, content))):x}" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


# ------------------------------------------------------------------------------------------------- public_message
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("empty.safetensors: the file is empty", "empty.safetensors: the file is empty"),  # no Markdown escapes
        ("/tmp/gradio/4eb5c1/big.safetensors: module 'x' has A", "big.safetensors: module 'x' has A"),
        ("No space left on device: '/srv/data/uploads/.abc-1/a.json'", "No space left on device: 'a.json'"),
        ("C:\\Users\\me\\lol\\lol.duckdb: locked", "lol.duckdb: locked"),
        ("could not fetch nobody/missing from the Hub", "could not fetch nobody/missing from the Hub"),
        ("ranks 1/2, *bold* `code` [a](b)", "ranks 1/2, *bold* `code` [a](b)"),
        ('<a href="https://evil">x</a>\n<img src=x>', '‹a href="https://evil"›x‹/a› ‹img src=x›'),
    ],
)
def test_public_message_is_plain_path_free_and_inert(text: str, expected: str) -> None:
    assert public_message(text) == expected


def test_public_message_hides_this_machines_folders() -> None:
    import sys
    import tempfile

    for folder in (sys.prefix, tempfile.gettempdir(), str(Path.home()), str(Path(__file__).resolve().parent)):
        shown = public_message(f"{folder}/sub/lol.duckdb: cannot open the collection database (IO Error)")
        assert shown == "lol.duckdb: cannot open the collection database (IO Error)"


# ----------------------------------------------------------------------------------------------------------- discard
def test_discard_removes_uploads_and_their_folders_only_under_the_upload_root(tmp_path: Path) -> None:
    root = tmp_path / "gradio"
    lora, config = _upload(root, "x.safetensors"), _upload(root, "adapter_config.json", b"{}")
    elsewhere = tmp_path / "hub" / "x.safetensors"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"keep")
    discard([str(lora), str(config), str(elsewhere), str(root / "gone" / "y.safetensors")], root)
    assert root.is_dir() and list(root.iterdir()) == []  # files and their <hash>/ folders, not the root
    assert elsewhere.read_bytes() == b"keep"
    discard(None, root)
    discard(str(root), root)  # the root itself is never removed
    assert root.is_dir()


def test_discard_follows_no_link_out_of_the_upload_root(tmp_path: Path) -> None:
    root = tmp_path / "gradio"
    root.mkdir()
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"keep")
    (root / "link.safetensors").symlink_to(victim)
    discard([str(root / "link.safetensors")], root)
    assert victim.read_bytes() == b"keep"


def test_a_file_two_uploads_share_goes_when_both_events_are_done(tmp_path: Path) -> None:
    root = tmp_path / "gradio"
    shared, alone, unseen = _upload(root, "same.safetensors"), _upload(root, "a.safetensors"), _upload(root, "b.json")
    ledger = UploadLedger()
    ledger.note([str(shared), str(alone)])
    ledger.note([str(shared)])  # a second session uploaded equal bytes: Gradio gave it the same path
    discard([str(shared), str(alone), str(unseen)], root, ledger)
    assert shared.exists() and not alone.exists() and not unseen.exists()  # unseen: no wait noted, goes at once
    discard([str(shared)], root, ledger)
    assert not shared.exists() and list(root.iterdir()) == []
    stale = UploadLedger(ttl_s=0.0)  # an upload that never reached an event is forgotten after Gradio's age
    again = _upload(root, "same.safetensors")
    stale.note([str(again), str(again)])
    discard([str(again)], root, stale)
    assert not again.exists()


# ------------------------------------------------------------------------------------------------------- UploadHold
def test_a_held_upload_is_out_of_the_upload_folder_and_comes_back_once(tmp_path: Path) -> None:
    root = tmp_path / "gradio"
    lora, config = _upload(root, "mine.safetensors"), _upload(root, "adapter_config.json", b"{}")
    hold = UploadHold(held_root(tmp_path / "uploads"))
    token = hold.keep([lora, config])
    discard([lora, config], root)
    assert list(root.iterdir()) == []
    files = hold.files(token)
    assert [Path(f).name for f in files] == ["adapter_config.json", "mine.safetensors"]
    assert Path(files[1]).read_bytes() == b"x" * 10 and not Path(files[1]).is_relative_to(root)
    assert stat.S_IMODE(os.stat(hold.root).st_mode) == 0o700
    hold.release(token)
    assert hold.files(token) == [] and not (hold.root / token).exists()


def test_held_uploads_expire_and_are_bounded(tmp_path: Path) -> None:
    root = tmp_path / "gradio"
    hold = UploadHold(tmp_path / "held", ttl_s=3600, max_held=2)
    tokens = [hold.keep([_upload(root, f"{i}.safetensors")]) for i in range(3)]
    assert hold.files(tokens[0]) == [] and not (hold.root / tokens[0]).exists()  # the oldest made room
    assert all(hold.files(t) for t in tokens[1:])
    expiring = UploadHold(tmp_path / "held2", ttl_s=0.0)
    token = expiring.keep([_upload(root, "late.safetensors")])
    assert expiring.files(token) == [] and not (expiring.root / token).exists()


@pytest.mark.parametrize("token", [None, "", "../../etc", "0" * 31, "g" * 32, "0" * 32])
def test_unknown_or_forged_tokens_give_nothing(tmp_path: Path, token: str | None) -> None:
    outside = tmp_path / "etc"
    outside.mkdir()
    hold = UploadHold(tmp_path / "held" / "sub")
    assert hold.files(token) == []
    hold.release(token)
    assert outside.is_dir()


# --------------------------------------------------------------------------------------------- the cap, UploadGuard
def test_the_upload_cap_defaults_to_one_and_a_half_gigabytes() -> None:
    assert DEFAULT_MAX_UPLOAD == "1.5gb"
    assert max_upload_bytes({}) == 3 * 2**29 > 1.3e9  # a Flux LoRA at rank 128 is ~1.3 GB
    assert max_upload_bytes({"LOL_MAX_UPLOAD": "200mb"}) == 200 * 2**20
    assert parse_size("512 KB") == 512 * 2**10 and parse_size("1048576") == 2**20
    for bad in ("lots", "-1gb", "0", "1.5 parsecs"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def _call(
    limit: UploadGuard, path: str, headers: list[tuple[bytes, bytes]], reply: bytes = b"[]"
) -> tuple[list[dict[str, Any]], bool]:
    """Run the middleware on one request; (what it sent, whether the app behind it ran). The body is never given."""
    sent: list[dict[str, Any]] = []
    ran = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ran.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": reply[:5], "more_body": True})
        await send({"type": "http.response.body", "body": reply[5:]})

    async def receive() -> dict[str, Any]:
        raise AssertionError("the body was read")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    limit.app = app
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    asyncio.run(limit(scope, receive, send))
    return sent, bool(ran)


def test_the_guard_answers_413_from_content_length_without_reading_the_body() -> None:
    limit = UploadGuard(None, max_upload=10 * 2**20)  # type: ignore[arg-type]
    upload = "/gradio_api/upload"
    sent, ran = _call(limit, upload, [(b"content-length", str(10 * 2**20 + UPLOAD_SLACK + 1).encode())])
    assert not ran and sent[0]["status"] == 413
    assert sent[1]["body"] == b"upload too large: 12.0 MB; this server accepts up to 10.0 MB"
    sent, ran = _call(limit, upload, [(b"content-length", str(10 * 2**20 + UPLOAD_SLACK).encode())])
    assert ran and sent[0]["status"] == 200  # at the limit: Gradio's own per-file check applies as the body streams
    sent, ran = _call(limit, "/gradio_api/queue/join", [(b"content-length", str(65 * 2**20).encode())])
    assert not ran and sent[0]["status"] == 413
    sent, ran = _call(limit, upload, [(b"content-length", b"12abc")])
    assert not ran and sent[0]["status"] == 400
    sent, ran = _call(limit, upload, [(b"transfer-encoding", b"chunked")])
    assert ran and sent[0]["status"] == 200  # no length declared: Gradio's streaming check


def test_the_guard_notes_the_files_of_accepted_uploads(tmp_path: Path) -> None:
    ledger = UploadLedger()
    guard = UploadGuard(None, max_upload=2**20, ledger=ledger)  # type: ignore[arg-type]
    shared = _upload(tmp_path, "same.safetensors")
    for _ in range(2):
        _call(guard, "/gradio_api/upload", [(b"content-length", b"100")], f'["{shared}"]'.encode())
    _call(guard, "/gradio_api/queue/join", [], f'["{shared}"]'.encode())  # not an upload: not noted
    assert not ledger.done(shared) and ledger.done(shared)


# -------------------------------------------------------------------------------------------------- the app's reader
def test_build_demo_reads_uploads_with_the_app_cap(collection: Any) -> None:
    gr = pytest.importorskip("gradio")
    from app.ui import build_demo

    inspect = next(f.fn for f in build_demo(collection, max_upload=5000).fns.values() if f.api_name == "inspect")
    with pytest.raises(gr.Error) as refused:
        inspect([str(DIGIT)])  # ~7 KB: over this app's 5000-byte cap
    assert re.search(r"5,?000", refused.value.message) and "\\" not in refused.value.message
    assert DIGIT.is_file()  # not an upload (outside Gradio's folder): left alone
    inspect = next(f.fn for f in build_demo(collection, max_upload=10**6).fns.values() if f.api_name == "inspect")
    assert "digits" in inspect([str(DIGIT)])[0]


def test_a_full_disk_is_reported_without_its_paths(collection: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    gr = pytest.importorskip("gradio")
    from app.ui import build_demo

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device", "/srv/lol/uploads/.0123abcd-x/adapter_model.safetensors")

    monkeypatch.setattr(collection, "add", full_disk)
    add = next(f.fn for f in build_demo(collection).fns.values() if f.api_name == "add")
    with pytest.raises(gr.Error) as refused:
        add([str(DIGIT)], "", None)
    message = refused.value.message
    assert "No space left on device" in message and re.search(r"error [0-9a-f]{8}", message)
    assert "/" not in message and "uploads" not in message
    assert DIGIT.is_file()
