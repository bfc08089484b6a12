"""The benchmark scripts run (tiny configurations; no timing is asserted)."""

from __future__ import annotations

import json
import runpy
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_spectra.py"
BENCH_MODELS = Path(__file__).parent.parent / "benchmarks" / "bench_models.py"


def test_bench_spectra_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    module = runpy.run_path(str(BENCH))
    module["main"](["--tiny", "--repeats", "1"])
    out = capsys.readouterr().out
    for name in ("sd15-r4", "sd15-r128", "llm7b-qkvo-r16", "dense / QR"):
        assert name in out


def test_bench_models_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The results script runs end to end at toy size and writes every section (no timing is asserted)."""
    module = runpy.run_path(str(BENCH_MODELS))
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
    printed = capsys.readouterr().out
    for task in ("digits-classes", "digits-n_classes", "fashion-gen-quality"):  # shipped, or said why not
        config = tmp_path / "ship" / task / "config.json"
        assert config.exists() != (f"no signal {task}" in printed), task
        if config.exists():
            selection = json.loads(config.read_text())["selection"]
            assert selection["split"] == "val" and selection["best"] in {"svd", "gl_net"}


def test_ship_selection_on_validation_among_invariant_models() -> None:
    """The choice reads validation scores only, skips models that are not GL-invariant, and needs a margin over the
    constant baseline larger than the chosen model's seed spread."""
    select = runpy.run_path(str(BENCH_MODELS))["select"]
    val = {
        "o_align": [{"accuracy": 0.95}, {"accuracy": 0.95}],  # best, but not eligible
        "gl_net": [{"accuracy": 0.80}, {"accuracy": 0.84}],  # mean .82, std .02
        "svd": [{"accuracy": 0.70}, {"accuracy": 0.70}],
    }
    choice = select("digits", "classes", val, {"accuracy": 0.5}, ["gl_net", "svd"])
    assert choice["best"] == "gl_net" and choice["signal"] and choice["split"] == "val"
    assert choice["models"]["gl_net"] == pytest.approx({"mean": 0.82, "std": 0.02})
    assert not select("digits", "classes", val, {"accuracy": 0.81}, ["gl_net", "svd"])["signal"]  # .01 < std .02
    assert select("digits", "classes", val, {"accuracy": 0.79}, ["gl_net", "svd"])["signal"]  # .03 > std .02


def test_constant_baseline_is_the_validation_majority_or_mean() -> None:
    """Against counts made here from the manifest: the majority class's share of the validation split, each entry's
    majority share (multi-label), and R² 0 for the validation mean."""
    from lol_engine.train import load_zoo
    from lol_engine.zoo import read_manifest

    baseline = runpy.run_path(str(BENCH_MODELS))["constant_baseline"]
    folder = Path(__file__).parent.parent / "data" / "zoo" / "digits"
    zoo, rows = load_zoo(folder), [r for r in read_manifest(folder) if r["split"] == "val"]
    counts = Counter(r["y_n_classes"] for r in rows)
    assert baseline(zoo, "n_classes")["accuracy"] == pytest.approx(max(counts.values()) / len(rows))
    bits = np.array([r["y_classes"] for r in rows])  # (N, 10)
    assert baseline(zoo, "classes")["accuracy"] == pytest.approx(np.maximum(bits.mean(0), 1 - bits.mean(0)).mean())
    assert baseline(zoo, "classes")["auc"] == 0.5
    assert baseline(zoo, "acc_own")["r2"] == pytest.approx(0.0, abs=1e-6)


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
