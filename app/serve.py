"""Start the app: open the collection, launch, and (on a first run) build it in the background while the page shows it.

The app owns its entry point, :func:`main`: ``lol serve`` reaches it lazily, and ``make run``, ``python -m app``,
``space_app.py`` and the Docker image all come here. Settings come from the environment, read and checked once by
:mod:`lol_engine.settings` (``LOL_DATA_DIR``, ``LOL_ZOO_DIR``, ``LOL_MAX_UPLOAD``, ``LOL_DEVICE`` and Gradio's own
``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` / ``GRADIO_TEMP_DIR``); a bad value stops the start with one
``error:`` line naming the variable (exit status 2).

:func:`serve` runs until SIGTERM or SIGINT and then stops cleanly: the server closes, the collection is checkpointed
and closed (nothing is left only in DuckDB's ``.wal``), and the app's own Gradio temp folder (a private folder made
for this run, under ``GRADIO_TEMP_DIR`` or the system temp folder) and held uploads are deleted.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from lol_engine.errors import LolError
from lol_engine.settings import HOW_TO_GET_ZOOS, settings

if TYPE_CHECKING:
    import gradio as gr

    from app.startup import StartupJob
    from lol_engine.explorer import Explorer

__all__ = ["APP_PACKAGES", "launched", "main", "open_explorer", "open_in_background", "serve"]

APP_PACKAGES = ("gradio", "plotly", "pandas", "pyarrow")  # the `app` extra of pyproject.toml


def open_explorer(db: str | os.PathLike[str] | None = None, progress: bool = True) -> Explorer:
    """The :class:`~lol_engine.explorer.Explorer` over ``db``, with the default zoos ingested if it was empty.

    The default zoos are those :mod:`lol_engine.settings` finds (``LOL_ZOO_DIR``, ``$LOL_DATA_DIR/zoo`` or the
    checkout's ``data/zoo``); with none, an empty collection opens and the terminal says how to get them.
    """
    from lol_engine.explorer import Explorer

    zoos = settings().default_zoos
    explorer = Explorer.open(db)
    try:
        if explorer.count() == 0 and zoos:
            print(f"First run: ingesting the default zoo into {explorer.db_path} and fitting its maps (~30 s)…")
        elif explorer.count() == 0:
            print(f"The collection {explorer.db_path} is empty and no default zoo was found: {HOW_TO_GET_ZOOS}.")
        explorer.start(zoos, progress=progress)
    except BaseException:
        explorer.close()
        raise
    return explorer


def open_in_background(db: str | os.PathLike[str] | None = None) -> tuple[Explorer, StartupJob]:
    """The :class:`~lol_engine.explorer.Explorer` over ``db`` at once, and its start-up (the default zoos ingested
    into an empty collection, missing maps fitted) running in a background thread: the page can answer meanwhile
    and shows the progress (:class:`app.startup.StartupJob`). A database that cannot be opened fails here."""
    from app.startup import StartupJob
    from lol_engine.explorer import Explorer

    zoos = settings().default_zoos
    explorer = Explorer.open(db)
    try:
        if explorer.count() == 0 and zoos:
            print(
                f"First run: building the default collection in {explorer.db_path} in the background; the page "
                "answers at once and shows the progress."
            )
        elif explorer.count() == 0:
            print(f"The collection {explorer.db_path} is empty and no default zoo was found: {HOW_TO_GET_ZOOS}.")
        return explorer, StartupJob(explorer, zoos).run(background=True)
    except BaseException:
        explorer.close()
        raise


@contextmanager
def _private_gradio_temp(parent: Path | None) -> Iterator[str]:
    """A fresh mode-0700 ``GRADIO_TEMP_DIR`` for this run, inside ``parent`` (default: the system temp folder);
    removed after."""
    before = os.environ.get("GRADIO_TEMP_DIR")
    parent = parent or Path(tempfile.gettempdir())
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
) -> Iterator[gr.Blocks]:
    """The app on the collection ``db``, running while the ``with`` block lasts (yields the ``gr.Blocks``).

    On exit, however it happens: the server is closed, then the collection (checkpointed), then this run's Gradio temp
    folder and held uploads are deleted.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from app.uploads import UploadLedger, held_root
    from app.web import launch_options

    config = settings()  # a bad setting fails first, before anything is opened
    config.resolved_device()  # and so does a device torch does not see
    cap = config.max_upload
    explorer, startup = open_in_background(db)  # before gradio's import: a bad database fails fast
    try:
        with _private_gradio_temp(config.temp_dir):
            from app.ui import build_demo
            from lol_engine.maps import warm_up

            threading.Thread(target=warm_up, name="umap-warm-up-start", daemon=True).start()  # refits skip the JIT
            ledger = UploadLedger()
            demo = build_demo(explorer, max_upload=cap, ledger=ledger, startup=startup)
            demo.queue(default_concurrency_limit=8, max_size=256)
            try:
                demo.launch(
                    server_name=host or config.host,
                    server_port=port or config.port,
                    ssr_mode=False,
                    prevent_thread_lock=True,
                    quiet=quiet,
                    **launch_options(cap, ledger),
                )
                yield demo
            finally:
                demo.close(verbose=False)
    finally:
        if not startup.wait(timeout=30):  # stopped mid-build: its batches so far are stored, the rest is not
            print("Stopping during the first build: the default collection is incomplete; delete it to rebuild.")
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


def main(db: str | os.PathLike[str] | None = None, port: int | None = None, host: str | None = None) -> int:
    """Serve (see :func:`serve`) and return the exit status: 2, with one ``error:`` line on stderr, when the app
    extra is not installed, a setting is bad or the collection cannot be opened."""
    missing = [name for name in APP_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"error: the app needs {', '.join(missing)}: install the app extra, pip install 'lol-explorer[app]'",
            file=sys.stderr,
        )
        return 2
    try:
        serve(db=db, port=port, host=host)
    except LolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
