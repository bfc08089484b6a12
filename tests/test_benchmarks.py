"""The benchmark scripts run (tiny configurations; no timing is asserted)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_spectra.py"


def test_bench_spectra_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    module = runpy.run_path(str(BENCH))
    module["main"](["--tiny", "--repeats", "1"])
    out = capsys.readouterr().out
    for name in ("sd15-r4", "sd15-r128", "llm7b-qkvo-r16", "dense / QR"):
        assert name in out


def test_bench_models_smoke(tmp_path) -> None:
    """The results script runs end to end at toy size and writes every section (no timing is asserted)."""
    module = runpy.run_path(str(Path(__file__).parent.parent / "benchmarks" / "bench_models.py"))
    out = tmp_path / "RESULTS.md"
    argv = ["--models", "svd,gl_net", "--seeds", "1", "--epochs", "1", "--dense-epochs", "1", "--transfer-n", "12"]
    argv += ["--speed-repeats", "2", "--cache", str(tmp_path / "zoos"), "--out", str(out)]
    argv += ["--ship", str(tmp_path / "ship")]
    module["main"](argv)
    text = out.read_text()
    for heading in (
        "## digits · `classes`",
        "## fashion-gen · `quality`",
        "Rank and cross-base",
        "| rank 16 |",
        "Speed",
    ):
        assert heading in text
    assert (tmp_path / "ship" / "fashion-gen-quality" / "config.json").exists()


def test_bench_module_tokens_smoke(tmp_path: Path) -> None:
    """The comparison runs at toy size and writes its own section, keeping the rest of the results file."""
    module = runpy.run_path(str(Path(__file__).parent.parent / "benchmarks" / "bench_module_tokens.py"))
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nother sections\n")
    for _ in range(2):  # the second run replaces the section instead of appending another
        module["main"](["--tiny", "--results", str(results)])
    text = results.read_text()
    assert text.startswith("# Results\n\nother sections\n") and text.count("## module_tokens against") == 1
    for line in ("| digits · `acc_own` (r2) |", "| fashion-gen · `class` (accuracy) |", "Mixed module layouts"):
        assert line in text


@pytest.mark.slow
def test_bench_app_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gradio")
    module = runpy.run_path(str(Path(__file__).parent.parent / "benchmarks" / "bench_app.py"))
    module["main"](["--tiny"])
    out = capsys.readouterr().out
    assert "first map (with JIT)" in out and "SDXL kohya" in out and "p95" in out


@pytest.mark.slow
def test_benchmark_suite_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gradio")
    module = runpy.run_path(str(Path(__file__).parent.parent / "benchmarks" / "run_all.py"))
    rows = module["main"](["--quick"])
    kinds = {row[0] for row in rows}
    assert kinds == {"spectra", "neighbours", "LoL vs evaluation", "ingest", "maps", "app"}
    assert all(row[4].rstrip("×").replace(",", "").replace(".", "").isdigit() or "the" in row[4] for row in rows)


def test_bench_hostile_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = runpy.run_path(str(Path(__file__).parent.parent / "benchmarks" / "bench_hostile.py"))
    out = tmp_path / "hostile.md"
    monkeypatch.setattr(sys, "argv", ["bench_hostile.py", "--only", "text-file", "dtype-list", "--write", str(out)])
    module["main"]()
    table = out.read_text()
    assert "| a text file renamed .safetensors |" in table and table.count("exit 2: error:") == 2


def test_bench_duplicates_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    module = runpy.run_path(str(Path(__file__).parent.parent / "benchmarks" / "bench_duplicates.py"))
    text = module["main"](["--tiny"])
    assert "| relation | true | predicted | right | precision | recall |" in text and "| stored LoRAs |" in text
    for kind in ("same", "rescale", "truncation", "merge", "none"):
        assert f"| {kind} |" in text
