"""``python -m app``: serve the explorer app with the settings of the environment (see :mod:`app.serve`)."""

from __future__ import annotations

from app.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
