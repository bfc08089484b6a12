"""Uploads leave Gradio's temp folder as soon as a handler is done with them. No gradio here.

Gradio writes every upload to ``<temp folder>/<hash>/<name>`` and serves anything there to whoever asks for that path,
until its hourly clean-up. So every event that receives uploads calls :func:`discard` on them when it returns,
whether it succeeded or refused them. An upload that was analysed is first linked (or copied) into an
:class:`UploadHold` (a private folder outside Gradio's reach), where *Add to collection* finds it without the page
sending it again.

Gradio names the ``<hash>`` folder after the content, so equal files uploaded by two sessions share one path. An
:class:`UploadLedger`, fed by the server as uploads are answered (:class:`app.web.UploadGuard`), counts the uploads
still waiting for their event on each path; :func:`discard` deletes a file when the last of them is done.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["UploadHold", "UploadLedger", "discard", "held_root"]

_TOKEN = re.compile(r"^[0-9a-f]{32}$")


def _inside(path: Path, root: Path) -> bool:
    return path != root and path.is_relative_to(root)


class UploadLedger:
    """Uploads answered by the server and not yet used by an event, per file (one path can wait for several).

    Waits older than ``ttl_s`` (Gradio's own clean-up age: such files are gone anyway) are forgotten, so an upload
    that never reached an event keeps a file alive at most that long.
    """

    def __init__(self, ttl_s: float = 3600.0) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._waits: dict[str, list[float]] = {}

    def note(self, paths: Iterable[str]) -> None:
        """The server answered an upload with these paths: each now waits for one event."""
        now = time.monotonic()
        with self._lock:
            for path in paths:
                self._waits.setdefault(os.path.realpath(path), []).append(now)

    def done(self, path: str | os.PathLike[str]) -> bool:
        """One wait on ``path`` is over; whether none is left, so that the file may go."""
        key = os.path.realpath(path)
        now = time.monotonic()
        with self._lock:
            waits = [t for t in self._waits.pop(key, []) if now - t <= self.ttl_s][1:]
            if waits:
                self._waits[key] = waits
        return not waits


def discard(
    paths: Iterable[str | os.PathLike[str]] | str | None,
    root: str | os.PathLike[str],
    ledger: UploadLedger | None = None,
) -> None:
    """Delete uploaded files and their per-upload folders, if they lie under Gradio's upload folder ``root``.

    With a ``ledger``, a file another upload still waits on stays (its own event discards it). Anything outside
    ``root`` (a Hub download, a file of the test suite) is left alone; files already gone are skipped.
    """
    if not paths:
        return
    base = Path(os.path.realpath(root))
    for raw in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = Path(os.path.realpath(raw))
        if not _inside(path, base) or (ledger is not None and not ledger.done(path)):
            continue
        path.unlink(missing_ok=True)
        folder = path.parent
        while _inside(folder, base):  # Gradio's <hash>/ folder, once empty
            try:
                folder.rmdir()
            except OSError:
                break
            folder = folder.parent


def held_root(uploads_dir: str | os.PathLike[str]) -> Path:
    """Where a collection's held uploads live: ``<uploads>/.held`` (dot folders there go at every start)."""
    return Path(uploads_dir) / ".held"


class UploadHold:
    """Analysed uploads kept for *Add to collection*: hard-linked (else copied) into ``root/<token>/``.

    ``root`` is created private (mode 0700). Each :meth:`keep` returns a random token (kept server-side, in the
    session's ``gr.State``); :meth:`release` deletes a held upload. At most ``max_held`` uploads are held, none
    longer than ``ttl_s`` seconds: older ones go whenever another is kept or looked up.
    """

    def __init__(self, root: str | os.PathLike[str], ttl_s: float = 900.0, max_held: int = 8) -> None:
        self.root = Path(root)
        self.ttl_s = ttl_s
        self.max_held = max_held
        self._lock = threading.Lock()
        self._kept: dict[str, float] = {}  # token -> time kept

    def keep(self, paths: Iterable[str | os.PathLike[str]]) -> str:
        """Link or copy ``paths`` into a new held folder (same file names); returns its token.

        The originals stay: :func:`discard` them (a hard link shares no name with Gradio's folder, only the bytes).
        """
        token = secrets.token_hex(16)
        folder = self.root / token
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.mkdir(mode=0o700)
        try:
            for path in paths:
                target = folder / Path(path).name
                try:
                    os.link(path, target)
                except OSError:  # another file system, or no hard links there
                    shutil.copyfile(path, target)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        with self._lock:
            self._kept[token] = time.monotonic()
        self._sweep()
        return token

    def files(self, token: str | None) -> list[str]:
        """The held files of ``token`` (empty if unknown, expired or released)."""
        self._sweep()
        if not token or not _TOKEN.match(token):
            return []
        with self._lock:
            if token not in self._kept:
                return []
        folder = self.root / token
        return sorted(str(p) for p in folder.iterdir()) if folder.is_dir() else []

    def release(self, token: str | None) -> None:
        """Delete a held upload (nothing happens for an unknown token)."""
        if not token or not _TOKEN.match(token):
            return
        with self._lock:
            self._kept.pop(token, None)
        shutil.rmtree(self.root / token, ignore_errors=True)

    def clear(self) -> None:
        """Delete every held upload and the folder."""
        with self._lock:
            self._kept.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def _sweep(self) -> None:
        now = time.monotonic()
        with self._lock:
            order = sorted(self._kept, key=self._kept.__getitem__)
            gone = [t for t in order if now - self._kept[t] > self.ttl_s]
            alive = [t for t in order if t not in gone]
            gone += alive[: max(0, len(alive) - self.max_held)]
        for token in gone:
            self.release(token)
