"""The benchmark scripts run (tiny configurations; no timing is asserted)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_spectra.py"


def test_bench_spectra_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    module = runpy.run_path(str(BENCH))
    module["main"](["--tiny", "--repeats", "1"])
    out = capsys.readouterr().out
    for name in ("sd15-r4", "sd15-r128", "llm7b-qkvo-r16", "dense / QR"):
        assert name in out
