"""Per-file speed (issue 15): this checkout against an earlier revision, side by side in one run.

    python benchmarks/bench_speed.py                  # ~2-3 min on 2 cores
    python benchmarks/bench_speed.py --quick          # a smoke run: small SDXL-shaped file, 50 LoRAs
    python benchmarks/bench_speed.py --before 151f363 # the revision to compare with (default: before issue 15)
    python benchmarks/bench_speed.py --threads 1      # one torch thread: steadier on a machine shared with others

Rows:
- an SDXL kohya r32 upload (986 modules, ~218 MB, ``bench_spectra.sdxl_shapes``) to predictions:
  ``Explorer.analyse(path)`` with the shipped predictors, p50 and p95 over ``--repeats`` calls after one warm-up;
- small-LoRA ingest: the first ``--n`` fashion-gen PEFT LoRAs (parse + encoders + store) into a fresh DuckDB file, with
  the fingerprint encoder only and with every shipped predictor, after a warm-up ingest of 8 of them elsewhere;
- peak memory (``VmHWM``, the process's own peak resident size) of each of those, each in its own process.

The earlier revision is exported with ``git archive`` and run the same way from a subprocess with ``PYTHONPATH`` set
to it; so is this checkout. Both read the same files. Ratios are what matters: absolute times depend on the machine
and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_spectra import Config, sdxl_shapes, write_lora  # noqa: E402
from bench_table import print_rows  # noqa: E402

Row = list[str]
BEFORE = "151f363"  # the last revision before issue 15's per-file speed work

# Runs in a fresh interpreter with PYTHONPATH at the tree under test; prints one JSON line.
_WORKER = r"""
import json, resource, sys, tempfile, time
from pathlib import Path

mode, arg, repeats, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
import torch

if threads > 0:
    torch.set_num_threads(threads)
from lol_engine.encoders import FingerprintEncoder, encoders_for, load_predictors
from lol_engine.store import LoraStore

out = {}
with tempfile.TemporaryDirectory() as tmp:
    if mode == "upload":
        from lol_engine.explorer import Explorer

        store = LoraStore(Path(tmp) / "store.duckdb")
        explorer = Explorer(store, load_predictors(), tmp)
        explorer.analyse(arg)  # warm-up: first-call imports and lazy set-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            explorer.analyse(arg)
            times.append(time.perf_counter() - start)
        store.close()
        out["times"] = times
    else:
        from lol_engine.ingest import ingest

        encoders = [FingerprintEncoder()] if mode == "ingest-fingerprint" else encoders_for(load_predictors())
        paths = Path(arg).read_text().split()
        with LoraStore(Path(tmp) / "warm.duckdb") as warm:  # warm-up: first-call imports, DuckDB set-up
            ingest(paths[:8], warm, encoders, progress=False)
        store = LoraStore(Path(tmp) / "ingest.duckdb")
        start = time.perf_counter()
        report = ingest(paths, store, encoders, progress=False)
        out["seconds"] = time.perf_counter() - start
        store.close()
        out["n"] = len(report.ids)
        out["refused"] = len(report.refused)
try:  # VmHWM starts afresh at exec; ru_maxrss would carry the parent's peak over the fork
    status = Path("/proc/self/status").read_text().splitlines()
    out["maxrss_kib"] = int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
except (OSError, StopIteration):
    out["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(out))
"""


def _export(rev: str, folder: Path) -> Path:
    """The package of ``rev`` (``git archive``, ``lol_engine/`` with its shipped predictors) under ``folder``."""
    folder.mkdir(parents=True)
    command = ["git", "-C", str(ROOT), "archive", rev, "lol_engine"]
    archive = subprocess.run(command, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def _run(tree: Path, mode: str, arg: str, repeats: int, threads: int) -> dict[str, float | list[float]]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, mode, arg, str(repeats), str(threads)],
        env=env,
        cwd=str(tree),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{mode} under {tree} failed:\n{done.stderr[-3000:]}")
    result: dict[str, float | list[float]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _fmt(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _mib(result: dict[str, float | list[float]]) -> str:
    kib = result["maxrss_kib"]
    assert isinstance(kib, float | int)
    return f"{kib / 1024:.0f} MiB"


def _small_paths(n: int) -> list[str]:
    """The first ``n`` fashion-gen LoRAs of the shipped zoo, as run_all's ingest row reads them."""
    import pyarrow.parquet as pq

    zoo = ROOT / "data" / "zoo" / "fashion-gen"
    table = pq.read_table(zoo / "manifest.parquet").slice(0, n)
    return [str(zoo / p) for p in table.column("path").to_pylist()]


def main(argv: list[str] | None = None) -> list[Row]:
    """Run the comparison; print and return rows ``[benchmark, case, ours, alternative, ratio, notes]``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run with small sizes")
    parser.add_argument("--before", default=BEFORE, help="the git revision to compare with")
    parser.add_argument("--repeats", type=int, default=None, help="timed upload calls per tree (default 7; quick 2)")
    parser.add_argument("--n", type=int, default=None, help="small LoRAs to ingest (default 1000; quick 50)")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads in the timed processes (default: torch's own choice)"
    )
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 7)
    n = args.n or (50 if args.quick else 1000)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        before = _export(args.before, folder / "before")
        div, rank = (8, 8) if args.quick else (1, 32)
        sdxl = write_lora(Config("sdxl", sdxl_shapes(div), rank), folder, torch.Generator().manual_seed(0))
        size = sdxl.stat().st_size
        listing = folder / "small.txt"
        listing.write_text("\n".join(_small_paths(n)))
        threads = f"torch threads {args.threads or torch.get_num_threads()}"

        # Two rounds in alternating order, so that a change in the machine's load falls on both trees alike.
        runs: dict[Path, list[dict[str, float | list[float]]]] = {ROOT: [], before: []}
        for order in ((ROOT, before), (before, ROOT)):
            for tree in order:
                runs[tree].append(_run(tree, "upload", str(sdxl), max(1, (repeats + 1) // 2), args.threads))
        now_t = [t for r in runs[ROOT] for t in r["times"]]  # type: ignore[union-attr]
        old_t = [t for r in runs[before] for t in r["times"]]  # type: ignore[union-attr]
        now_up = max(runs[ROOT], key=lambda r: float(r["maxrss_kib"]))  # type: ignore[arg-type]
        old_up = max(runs[before], key=lambda r: float(r["maxrss_kib"]))  # type: ignore[arg-type]
        case = f"SDXL kohya r{rank} upload to predictions ({size / 2**20:.0f} MiB, {len(sdxl_shapes(div))} modules)"
        for q, label in ((0.5, "p50"), (0.95, "p95")):
            ours, theirs = _percentile(now_t, q), _percentile(old_t, q)
            rows.append(
                [
                    "per-file speed",
                    f"{case} {label}",
                    _fmt(ours),
                    f"{args.before} {_fmt(theirs)}",
                    f"{theirs / ours:.1f}×",
                    f"Explorer.analyse, {len(now_t)} calls (2 processes, each after a warm-up); {threads}",
                ]
            )
        rows.append(
            [
                "per-file speed",
                f"{case}: peak memory",
                _mib(now_up),
                f"{args.before} {_mib(old_up)}",
                f"{float(old_up['maxrss_kib']) / float(now_up['maxrss_kib']):.2f}×",  # type: ignore[arg-type]
                "peak resident memory of the process (VmHWM; warm-up + calls)",
            ]
        )
        for mode, what in (("ingest-fingerprint", "fingerprint only"), ("ingest-all", "all shipped predictors")):
            now_i, old_i = (_run(tree, mode, str(listing), 1, args.threads) for tree in (ROOT, before))
            rates = [float(r["n"]) / float(r["seconds"]) for r in (now_i, old_i)]  # type: ignore[arg-type]
            rows.append(
                [
                    "per-file speed",
                    f"ingest of {n:,} fashion-gen PEFT LoRAs, {what}",
                    f"{rates[0]:,.0f} LoRAs/s",
                    f"{args.before} {rates[1]:,.0f} LoRAs/s",
                    f"{rates[0] / rates[1]:.1f}×",
                    f"parse + encode + store into a fresh DuckDB; peak memory {_mib(now_i)} vs {_mib(old_i)}",
                ]
            )
    print_rows("per-file speed", rows)
    return rows


if __name__ == "__main__":
    main()
