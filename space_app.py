"""Entry file of the app and the Hugging Face Space. Settings: app/serve.py.

Not ``app.py``: beside the ``app/`` package, ``import app`` would always find the package, and mypy would
report two modules named ``app``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main() -> None:
    """Serve until SIGTERM/SIGINT; a collection that cannot be opened exits with status 2 and one ``error:`` line."""
    from app.serve import serve
    from lol_engine.errors import StoreError

    try:
        serve()
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
