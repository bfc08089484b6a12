"""Entry file of the app and the Hugging Face Space (not ``app.py``: see PLATFORM.md 4.7). Settings: app/serve.py."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main() -> None:
    from app.serve import serve

    serve()


if __name__ == "__main__":
    main()
