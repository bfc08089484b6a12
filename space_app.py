"""Entry file of the app and the Hugging Face Space (not ``app.py``: see PLATFORM.md 4.7). Settings: app/serve.py."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main() -> None:
    from app.serve import serve
    from lol_engine.errors import StoreError

    try:
        serve()
    except StoreError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
