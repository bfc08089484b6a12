"""The app's own costs, measured in one run: first-run set-up of the default zoo, map fits, upload-to-prediction.

    python benchmarks/bench_app.py              # the full run (~4 min on 2 cores; writes docs/APP_BENCH.md)
    python benchmarks/bench_app.py --tiny       # a smoke run on a 70-LoRA collection, nothing written

1. Set-up of the default collection in a fresh database: ingest of ``data/zoo`` (every LoRA read, fingerprinted,
   embedded and predicted by each matching predictor) and one UMAP map per encoder; the first fit in the process
   includes numba's JIT compilation, which is shown separately.
2. Upload-to-prediction latency through the launched app over loopback (``gradio_client``: upload, parse, checks,
   spectra, predictions with calibrated ranges, exact neighbours over the collection, and the reply), p50 and p95 of
   ``--runs`` calls, for a small LoRA of the default zoo, a kohya SD 1.5 LoRA (rank 32) and a kohya SDXL LoRA (rank
   32, 986 modules, 218 MiB), with the in-process handler time beside it to show what HTTP and the upload add.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_spectra import Config, sd15_shapes, sdxl_shapes, write_lora

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("ingest", "import umap", "first map (with JIT)", "other maps", "refit of the first map (JIT warm)")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def setup_collection(folder: Path, tiny: bool) -> tuple[object, dict[str, float]]:
    """A fresh collection of the default zoo (or a 70-LoRA slice with ``tiny``), timed step by step."""
    from lol_engine.explorer import Explorer
    from lol_engine.settings import settings

    explorer = Explorer.open(folder / "lol.duckdb")
    zoos = [str(z) for z in settings().default_zoos]
    if tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from collection import mini_zoo

        zoos = [str(mini_zoo(folder / "zoos", "digits", 40)), str(mini_zoo(folder / "zoos", "fashion-gen", 30))]
    start = time.perf_counter()
    explorer.ingest(zoos, progress=True)
    timings = {"ingest": time.perf_counter() - start, "n": float(explorer.count())}
    start = time.perf_counter()
    import umap  # noqa: F401  (import cost shown apart from the fits)

    timings["import umap"] = time.perf_counter() - start
    per_map = explorer.fit_maps(progress=True)  # every encoder with embeddings, fingerprint first
    encoders = list(per_map)
    timings["first map (with JIT)"] = per_map[encoders[0]]
    timings["other maps"] = sum(per_map[e] for e in encoders[1:])
    timings["refit of the first map (JIT warm)"] = explorer.fit_maps(encoders[:1])[encoders[0]]
    timings["maps"] = len(encoders)
    return explorer, timings


def latency(explorer: object, files: dict[str, Path], runs: dict[str, int]) -> list[list[str]]:
    """p50 / p95 of upload-to-prediction through the launched app, and the in-process handler time."""
    from gradio_client import Client, handle_file

    from app import handlers
    from app.ui import build_demo
    from app.uploads import UploadLedger
    from app.web import launch_options, max_upload_bytes

    ledger = UploadLedger()
    demo = build_demo(explorer, ledger=ledger)  # type: ignore[arg-type]
    demo.queue(default_concurrency_limit=8)
    demo.launch(
        server_name="127.0.0.1",
        prevent_thread_lock=True,
        quiet=True,
        ssr_mode=False,
        **launch_options(max_upload_bytes(), ledger),
    )
    client = Client(demo.local_url, verbose=False)
    rows = []
    try:
        for name, path in files.items():
            handlers.analyse_upload(explorer, [str(path)])  # warm caches (neighbour factors) once
            local = []
            for _ in range(runs[name]):
                start = time.perf_counter()
                handlers.analyse_upload(explorer, [str(path)])
                local.append(time.perf_counter() - start)
            remote = []
            for _ in range(runs[name]):
                start = time.perf_counter()
                client.predict([handle_file(str(path))], "", api_name="/analyse")
                remote.append(time.perf_counter() - start)
            size = path.stat().st_size / 2**20
            rows.append(
                [
                    name,
                    f"{size:.2f}",
                    str(runs[name]),
                    f"{percentile(remote, 50):.3f}",
                    f"{percentile(remote, 95):.3f}",
                    f"{statistics.median(local):.3f}",
                ]
            )
    finally:
        client.close()
        demo.close()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small collection, few runs, nothing written")
    parser.add_argument("--runs", type=int, default=20, help="calls per small LoRA (SDXL: a quarter)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "APP_BENCH.md"), help="where to write the tables")
    args = parser.parse_args(argv)
    console = Console()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        explorer, setup = setup_collection(folder, args.tiny)
        gen = torch.Generator().manual_seed(0)
        div = 8 if args.tiny else 1
        files = {
            "small: digits-zoo PEFT, r4, 2 modules": next((ROOT / "data" / "zoo" / "digits" / "loras").iterdir())
            / "adapter_model.safetensors",
            "SD 1.5 kohya, r32, 264 modules": write_lora(Config("sd15-r32", sd15_shapes(div), 32), folder, gen),
            "SDXL kohya, r32, 986 modules": write_lora(Config("sdxl-r32", sdxl_shapes(div), 32), folder, gen),
        }
        runs = dict.fromkeys(files, 3 if args.tiny else args.runs)
        runs["SDXL kohya, r32, 986 modules"] = 2 if args.tiny else max(2, args.runs // 4)
        rows = latency(explorer, files, runs)
        explorer.close()  # type: ignore[attr-defined]

    setup_table = Table(title=f"Set-up of the collection ({int(setup['n'])} LoRAs, {int(setup['maps'])} maps)")
    setup_table.add_column("step")
    setup_table.add_column("seconds", justify="right")
    for key in STEPS:
        setup_table.add_row(key, f"{setup[key]:.1f}")
    lat = Table(title="Upload-to-prediction through the app (loopback, 1 client)")
    for column in ("LoRA", "MiB", "runs", "p50 s", "p95 s", "handler only, median s"):
        lat.add_column(column, justify="left" if column == "LoRA" else "right")
    for row in rows:
        lat.add_row(*row)
    console.print(setup_table)
    console.print(lat)
    if args.tiny:
        return
    lines = [
        "# App benchmark (generated by `python benchmarks/bench_app.py`)",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs.",
        "",
        f"## Set-up of the default collection ({int(setup['n'])} LoRAs, {int(setup['maps'])} maps)",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {k} | {setup[k]:.1f} |" for k in STEPS],
        "",
        "## Upload-to-prediction latency (loopback, one client)",
        "",
        "| LoRA | MiB | runs | p50 s | p95 s | handler only, median s |",
        "|---|---|---|---|---|---|",
        *["| " + " | ".join(row) + " |" for row in rows],
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
