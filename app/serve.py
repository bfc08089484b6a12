"""Start the app: open the collection (ingesting the default zoo and fitting its maps on first run), then launch.

``lol serve``, ``make run``, ``space_app.py`` and the Docker image all come here. Settings (environment):
``LOL_DATA_DIR`` (where ``lol.duckdb`` and stored uploads live), ``LOL_MAX_UPLOAD`` (per-file upload cap, e.g.
``200mb``; default ``2gb``), ``LOL_DEVICE`` (``cpu``/``cuda``; default: CUDA when available), and Gradio's own
``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``.
"""

from __future__ import annotations

import os
import threading
from typing import Any

__all__ = ["open_explorer", "serve"]


def open_explorer(db: str | os.PathLike[str] | None = None, progress: bool = True) -> Any:
    """The :class:`~lol_engine.explorer.Explorer` over ``db``, with the default zoo ingested if it was empty."""
    from lol_engine.explorer import Explorer

    explorer = Explorer.open(db)
    if explorer.store.count() == 0:
        print(f"First run: ingesting the default zoo into {explorer.store.path} and fitting its maps (~30 s)…")
    explorer.ensure_default(progress=progress)
    return explorer


def serve(
    db: str | os.PathLike[str] | None = None,
    port: int | None = None,
    host: str | None = None,
    block: bool = True,
) -> Any:
    """Launch the app on the collection ``db``; returns the running ``gr.Blocks`` (blocks unless ``block=False``)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from app.ui import build_demo
    from lol_engine.maps import warm_up

    explorer = open_explorer(db)
    threading.Thread(target=warm_up, name="umap-warm-up-start", daemon=True).start()  # refits stay off the JIT
    demo = build_demo(explorer)
    demo.queue(default_concurrency_limit=8, max_size=256)
    demo.launch(
        server_name=host or os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=port or (int(os.environ["GRADIO_SERVER_PORT"]) if os.environ.get("GRADIO_SERVER_PORT") else None),
        max_file_size=os.environ.get("LOL_MAX_UPLOAD", "2gb"),
        ssr_mode=False,
        prevent_thread_lock=not block,
        quiet=not block,
    )
    return demo
