"""The per-file speed benchmark runs end to end in its quick mode (no timing is asserted)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_speed.py"


@pytest.mark.slow
def test_bench_speed_quick_gives_every_row() -> None:
    rows = runpy.run_path(str(BENCH))["main"](["--quick", "--repeats", "1", "--n", "10"])
    cases = [row[1] for row in rows]
    assert all(len(row) == 6 for row in rows)
    assert any("upload to predictions" in c and c.endswith("p50") for c in cases)
    assert any("upload to predictions" in c and c.endswith("p95") for c in cases)
    assert any("peak memory" in c for c in cases)
    assert any("fingerprint only" in c for c in cases) and any("all shipped predictors" in c for c in cases)
    assert all("151f363" in row[3] for row in rows)  # each row sets this checkout beside the earlier revision
