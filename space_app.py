"""Entry file of the app and the Hugging Face Space (not ``app.py``: see PLATFORM.md 4.7)."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAX_UPLOAD = os.environ.get("LOL_MAX_UPLOAD", "2gb")


def main() -> None:
    from app.ui import build_demo

    demo = build_demo()
    demo.queue(default_concurrency_limit=1)
    demo.launch(max_file_size=MAX_UPLOAD, ssr_mode=False)


if __name__ == "__main__":
    main()
