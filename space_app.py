"""Entry file of the app and the Hugging Face Space. Settings: app/serve.py.

Not ``app.py``: beside the ``app/`` package, ``import app`` would always find the package, and mypy would
report two modules named ``app``.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main() -> None:
    """Serve until SIGTERM/SIGINT; a bad setting or a collection that cannot be opened exits with status 2 and one
    ``error:`` line."""
    from app.serve import main as serve

    raise SystemExit(serve())


if __name__ == "__main__":
    main()
