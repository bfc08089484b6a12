"""Package hygiene: a light import, a curated public API."""

from __future__ import annotations

import subprocess
import sys

import lol_engine


def test_import_is_light() -> None:
    heavy = ("gradio", "duckdb", "umap", "peft", "transformers")
    code = f"import sys, lol_engine; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == ""


def test_public_api_is_sorted_and_importable() -> None:
    assert lol_engine.__all__ == sorted(lol_engine.__all__)
    for name in lol_engine.__all__:
        assert hasattr(lol_engine, name)
