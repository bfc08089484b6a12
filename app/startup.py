"""The app's start-up step in the background: the page answers at once and shows the default collection being built.

:class:`StartupJob` runs :meth:`lol_engine.explorer.Explorer.start` (ingest the default zoos into an empty collection,
fit missing maps) in a thread and keeps where it is; the page's header polls :meth:`StartupJob.status`. While it
runs, uploads are analysed as usual (predictors need no collection) but not added: adds wait for the build, so that
nothing competes with its transactions. No gradio here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable

from lol_engine.errors import BadRequestError, LolError
from lol_engine.explorer import Explorer

__all__ = ["StartupJob"]

_log = logging.getLogger(__name__)


class StartupJob:
    """:meth:`Explorer.start` in a thread (call :meth:`run` to start it), with its progress for the page."""

    def __init__(self, explorer: Explorer, zoos: Iterable[str | os.PathLike[str]] | None = None) -> None:
        self.explorer = explorer
        self.zoos = None if zoos is None else list(zoos)
        self._lock = threading.Lock()
        self._step, self._done, self._total = "starting", 0, 0
        self._error: str | None = None
        self._finished = threading.Event()
        self._started_at = time.monotonic()
        self.seconds: float | None = None  # how long the start-up took, once finished
        self._thread: threading.Thread | None = None

    def run(self, background: bool = True) -> StartupJob:
        """Start (in a daemon thread, or here with ``background=False``); returns itself."""
        self._started_at = time.monotonic()
        if background:
            self._thread = threading.Thread(target=self._work, name="lol-startup", daemon=True)
            self._thread.start()
        else:
            self._work()
        return self

    def _progress(self, step: str, done: int, total: int) -> None:
        with self._lock:
            self._step, self._done, self._total = step, done, total

    def _work(self) -> None:
        try:
            self.explorer.start(self.zoos, progress=False, on_progress=self._progress)
        except LolError as exc:
            with self._lock:
                self._error = str(exc)
        except Exception as exc:  # a bug or the machine: logged in full, said briefly in the page
            _log.exception("the start-up failed")
            with self._lock:
                self._error = f"internal error ({type(exc).__name__}); see the server log"
        finally:
            self.seconds = time.monotonic() - self._started_at
            self._finished.set()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    @property
    def error(self) -> str | None:
        with self._lock:
            return self._error

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the start-up is over (or ``timeout`` seconds); returns whether it is."""
        return self._finished.wait(timeout)

    def fraction(self) -> float:
        """How far along it is, 0…1: ingest is the first 80 %, maps the rest."""
        with self._lock:
            step, done, total = self._step, self._done, self._total
        if self.finished:
            return 1.0
        part = done / total if total else 0.0
        return 0.8 * part if step == "ingest" else 0.8 + 0.2 * part if step == "maps" else 0.0

    def status(self) -> str:
        """One plain sentence: what the start-up is doing (empty once it finished without error)."""
        with self._lock:
            step, done, total, error = self._step, self._done, self._total, self._error
        if error is not None:
            return f"The default collection could not be built: {error}"
        if self.finished:
            return ""
        elapsed = time.monotonic() - self._started_at
        if step == "ingest":
            what = f"reading the default zoos: {done:,} of {total:,} LoRAs"
        elif step == "maps":
            what = f"fitting the maps: {done} of {total} done"
        else:
            what = "starting"
        return f"Building the default collection ({what}, {self.fraction():.0%}, {elapsed:.0f} s so far)…"

    def check_can_write(self) -> None:
        """Raise :class:`BadRequestError` while the build runs (an add would compete with its transactions)."""
        if not self.finished:
            raise BadRequestError(
                f"the default collection is still being built ({self.fraction():.0%}); add the LoRA when it is done"
            )
