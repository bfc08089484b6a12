"""Start the app: open the collection (ingesting the default zoo and fitting its maps on first run), then launch.

``lol serve``, ``make run``, ``space_app.py`` and the Docker image all come here. Settings (environment):
``LOL_DATA_DIR`` (where ``lol.duckdb`` and stored uploads live), ``LOL_MAX_UPLOAD`` (per-file upload cap, e.g.
``200mb``; default ``1.5gb``, see :mod:`app.web`), ``LOL_DEVICE`` (``cpu``/``cuda``; default: CUDA when available),
and Gradio's own ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` / ``GRADIO_TEMP_DIR``.

:func:`serve` runs until SIGTERM or SIGINT and then stops cleanly: the server closes, the collection is checkpointed
and closed (nothing is left only in DuckDB's ``.wal``), and the app's own Gradio temp folder (a private folder made
for this run, under ``GRADIO_TEMP_DIR`` or the system temp folder) and held uploads are deleted.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["launched", "open_explorer", "serve"]


def open_explorer(db: str | os.PathLike[str] | None = None, progress: bool = True) -> Any:
    """The :class:`~lol_engine.explorer.Explorer` over ``db``, with the default zoo ingested if it was empty."""
    from lol_engine.explorer import Explorer

    explorer = Explorer.open(db)
    try:
        if explorer.store.count() == 0:
            print(f"First run: ingesting the default zoo into {explorer.store.path} and fitting its maps (~30 s)…")
        explorer.ensure_default(progress=progress)
    except BaseException:
        explorer.close()
        raise
    return explorer


@contextmanager
def _private_gradio_temp() -> Iterator[str]:
    """A fresh mode-0700 ``GRADIO_TEMP_DIR`` for this run (inside the configured one, if any); removed after."""
    before = os.environ.get("GRADIO_TEMP_DIR")
    parent = before or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="lol-explorer-", dir=parent)
    os.environ["GRADIO_TEMP_DIR"] = folder
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if before is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = before


@contextmanager
def launched(
    db: str | os.PathLike[str] | None = None, port: int | None = None, host: str | None = None, quiet: bool = False
) -> Iterator[Any]:
    """The app on the collection ``db``, running while the ``with`` block lasts (yields the ``gr.Blocks``).

    On exit, however it happens: the server is closed, then the collection (checkpointed), then this run's Gradio temp
    folder and held uploads are deleted.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from app.uploads import UploadLedger, held_root
    from app.web import launch_options, max_upload_bytes

    cap = max_upload_bytes()
    explorer = open_explorer(db)  # before gradio's import: a bad database fails fast
    try:
        with _private_gradio_temp():
            from app.ui import build_demo
            from lol_engine.maps import warm_up

            threading.Thread(target=warm_up, name="umap-warm-up-start", daemon=True).start()  # refits skip the JIT
            ledger = UploadLedger()
            demo = build_demo(explorer, max_upload=cap, ledger=ledger)
            demo.queue(default_concurrency_limit=8, max_size=256)
            try:
                demo.launch(
                    server_name=host or os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                    server_port=port or (int(os.environ["GRADIO_SERVER_PORT"])
                                         if os.environ.get("GRADIO_SERVER_PORT") else None),
                    ssr_mode=False,
                    prevent_thread_lock=True,
                    quiet=quiet,
                    **launch_options(cap, ledger),
                )  # fmt: skip
                yield demo
            finally:
                demo.close(verbose=False)
    finally:
        explorer.close()
        shutil.rmtree(held_root(explorer.uploads_dir), ignore_errors=True)


class _StopError(Exception):
    """Raised in the main thread by SIGTERM, to leave :func:`serve`'s ``with`` blocks through their clean-up."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    signal.signal(signum, signal.SIG_IGN)  # once: a second SIGTERM must not cut the clean-up short
    raise _StopError(signal.Signals(signum).name)


def serve(db: str | os.PathLike[str] | None = None, port: int | None = None, host: str | None = None) -> None:
    """Serve the app on the collection ``db`` until SIGTERM or SIGINT (Ctrl-C), then stop cleanly (see the module)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_stop) if main else None
    try:
        with launched(db, port, host):
            threading.Event().wait()  # signals interrupt the wait in the main thread
    except (_StopError, KeyboardInterrupt):
        print("Stopped: the collection is saved.")
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
