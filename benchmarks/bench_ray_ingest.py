"""Ingest on Ray Data against the single-process ingest, on the same files in one run; and per-file costs by format.

    python benchmarks/bench_ray_ingest.py           # ~5 min on 2 cores: 1,000 zoo LoRAs + 2,000 generated files
    python benchmarks/bench_ray_ingest.py --full    # the whole default zoo (3.5k LoRAs) + 20,000 generated files
    python benchmarks/bench_ray_ingest.py --quick   # a smoke run (tens of files; nothing to read from the numbers)

Rows ``[benchmark, case, ours, alternative, ratio, notes]`` (the style of ``run_all.py``):

1. ``ray ingest``: LoRAs/s of ``lol_engine.scale.ray_ingest`` with 1 and 2 workers (Ray started and stopped by the
   call, as ``lol ingest --engine ray`` does) against ``lol_engine.ingest.ingest`` in this process, on the default
   zoo (``data/zoo``, every k-th LoRA) and on a generated collection of small files in mixed formats (kohya SD-style,
   PEFT folders, diffusers); with the time to the first result (Ray's start-up) and the peak memory of the process
   tree (driver, raylet and workers, sampled every 0.2 s);
2. ``per-file cost``: one worker's CPU seconds per LoRA (all its threads; one torch thread, as in a Ray task) and
   its wall time — sha256, read, fingerprint, card facts, store rows — for a small PEFT adapter and the real module
   shapes of SD 1.5 r32, SDXL r32 and a 7B LLM's q/k/v/o r16 (fp16 files written as ``bench_spectra.py`` does); the
   numbers docs/SCALING.md's cost table is built from.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE)]

from bench_spectra import Config, llm7b_shapes, sd15_shapes, sdxl_shapes, write_lora  # noqa: E402
from bench_table import print_rows  # noqa: E402

console = Console() if Console().is_terminal else Console(width=200)
Row = list[str]


def peak_rss(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(fn(), seconds, peak MiB)``: the resident memory of this process and all its descendants, sampled."""
    import psutil

    me, peak, stop = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
            peak[0] = max(peak[0], total)
            stop.wait(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        out = fn()
    finally:
        seconds = time.perf_counter() - start
        stop.set()
        thread.join()
    return out, seconds, peak[0] / 2**20


def zoo_sample(n: int | None) -> list[str]:
    """``n`` LoRAs spread over the default zoo's four zoos (every k-th), or all of them."""
    from lol_engine.ingest import lora_sources

    paths = [str(s.path) for s in lora_sources([str(ROOT / "data" / "zoo")])]
    return paths if n is None or n >= len(paths) else paths[:: max(1, len(paths) // n)][:n]


def generated(folder: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` small LoRAs: half kohya SD-style files, 30 % PEFT folders, 20 % diffusers files; ranks 4–16."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rank = (4, 8, 16)[i % 3]
        kind = "kohya" if i % 10 < 5 else "peft" if i % 10 < 8 else "diffusers"
        width = (64, 128, 320)[(i // 3) % 3]
        tensors: dict[str, torch.Tensor] = {}
        for m in range(6):
            a = (torch.randn(rank, width, generator=gen) / width**0.5).half()
            b = (torch.randn(width, rank, generator=gen) * 0.01).half()
            if kind == "kohya":
                stem = f"lora_unet_down_blocks_0_attentions_{m // 3}_transformer_blocks_0_attn1_to_{'qkv'[m % 3]}"
                tensors |= {f"{stem}.lora_down.weight": a, f"{stem}.lora_up.weight": b}
                tensors[f"{stem}.alpha"] = torch.tensor(float(rank)).half()
            elif kind == "peft":
                stem = f"base_model.model.model.layers.{m // 2}.self_attn.{'qv'[m % 2]}_proj"
                tensors |= {f"{stem}.lora_A.weight": a, f"{stem}.lora_B.weight": b}
            else:
                stem = f"unet.down_blocks.0.attentions.{m // 3}.transformer_blocks.0.attn1.to_{'qkv'[m % 3]}"
                tensors |= {f"{stem}.lora_linear_layer.down.weight": a, f"{stem}.lora_linear_layer.up.weight": b}
        if kind == "peft":
            target = folder / f"peft-{i:06d}"
            target.mkdir(parents=True, exist_ok=True)
            config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["q_proj", "v_proj"]}
            (target / "adapter_config.json").write_text(json.dumps(config))
            save_file(tensors, str(target / "adapter_model.safetensors"))
        else:
            target = folder / f"{kind}-{i:06d}.safetensors"
            save_file(tensors, str(target), metadata={"ss_network_dim": str(rank)} if kind == "kohya" else None)
        paths.append(str(target))
    return paths


def compare_engines(label: str, paths: list[str], folder: Path, workers: tuple[int, ...]) -> list[Row]:
    """The single-process ingest, then the Ray ingest with each number of workers, of the same files."""
    from lol_engine.encoders import encoders_for, load_predictors
    from lol_engine.ingest import ingest
    from lol_engine.scale import ray_ingest
    from lol_engine.store import LoraStore

    encoders = encoders_for(load_predictors())
    with LoraStore(folder / f"{label}-local.duckdb") as store:
        report, local_s, local_mb = peak_rss(lambda: ingest(paths, store, encoders, progress=False))
    n = len(report.ids)
    rows = [
        [
            "ray ingest",
            f"{label}: {len(paths):,} files, single process",
            f"{n / local_s:.1f} LoRAs/s",
            "—",
            "1.00×",
            f"{local_s:.1f} s; peak {local_mb:,.0f} MiB",
        ]
    ]
    for w in workers:
        with LoraStore(folder / f"{label}-ray{w}.duckdb") as store:

            def run(store: LoraStore = store, w: int = w) -> Any:
                return ray_ingest(paths, folder / f"{label}-ray{w}", store, workers=w, progress=False)

            ray_report, ray_s, ray_mb = peak_rss(run)
        assert len(ray_report.ids) == n, (len(ray_report.ids), n)
        steady = (n / (ray_s - ray_report.startup_seconds)) if ray_s > ray_report.startup_seconds else float("nan")
        rows.append(
            [
                "ray ingest",
                f"{label}: {len(paths):,} files, Ray, {w} worker(s)",
                f"{n / ray_s:.1f} LoRAs/s",
                f"single process {n / local_s:.1f} LoRAs/s",
                f"{local_s / ray_s:.2f}×",
                f"{ray_s:.1f} s, first result after {ray_report.startup_seconds:.1f} s (start-up), then "
                f"{steady:.1f} LoRAs/s; peak {ray_mb:,.0f} MiB (driver + Ray processes)",
            ]
        )
    return rows


def ray_start_cost() -> Row:
    """A bare local ``ray.init`` and ``ray.shutdown``."""
    import ray

    if ray.is_initialized():  # a caller's session (the smoke test): ray_ingest runs in it
        return ["ray ingest", "Ray local start-up", "not measured", "Ray was running", "—", ""]
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    up = time.perf_counter() - start
    ray.shutdown()
    total = time.perf_counter() - start
    return ["ray ingest", "Ray local start-up", f"init {up:.1f} s", f"init + shutdown {total:.1f} s", "—", "2 CPUs"]


def per_file_costs(folder: Path, quick: bool) -> list[Row]:
    """One worker's seconds per LoRA by format and size (best of ``repeats``; the file in the page cache)."""
    from lol_engine.scale.sources import make_tasks
    from lol_engine.scale.work import parse_batch

    div, repeats = (16, 1) if quick else (1, 2)
    gen = torch.Generator().manual_seed(0)
    small = generated(folder / "small", 3)[1]  # a PEFT folder, 6 modules
    configs = {
        "SD 1.5 kohya r32": Config("sd15", sd15_shapes(div), 32),
        "SDXL kohya r32": Config("sdxl", sdxl_shapes(div), 32),
        "7B q/k/v/o PEFT r16": Config("llm7b", llm7b_shapes(div), 16),
    }
    files = {"small PEFT r8 (6 modules)": small} | {k: str(write_lora(c, folder, gen)) for k, c in configs.items()}
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Ray worker (Ray sets OMP_NUM_THREADS=1 for a one-CPU task)
    try:
        for label, path in files.items():
            tasks, _ = make_tasks([path])
            batch = {k: np.array([t.to_row()[k] for t in tasks], dtype=object) for k in tasks[0].to_row()}
            wall = cpu = float("inf")
            for _ in range(repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                out = parse_batch(batch)
                wall = min(wall, time.perf_counter() - start)
                cpu = min(cpu, time.process_time() - start_cpu)  # every thread's: the hashing threads' too
            assert out["status"][0] == "ok", out["reason"][0]
            file = Path(path) / "adapter_model.safetensors" if Path(path).is_dir() else Path(path)
            mb = file.stat().st_size / 1e6
            rows.append(
                [
                    "per-file cost",
                    f"{label} ({mb:,.1f} MB)",
                    f"{cpu * 1000:,.1f} ms CPU per file",
                    f"wall {wall * 1000:,.1f} ms, {mb / wall:,.0f} MB/s",
                    "—",
                    "hash + read + fingerprint + card facts + store rows; one worker, one torch thread, file in the "
                    "page cache; CPU time of all its threads",
                ]
            )
    finally:
        torch.set_num_threads(threads)
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with tens of files")
    parser.add_argument("--full", action="store_true", help="the whole default zoo and 20,000 generated files")
    parser.add_argument("--zoo", type=int, default=None, help="default-zoo LoRAs to ingest (default 1,000)")
    parser.add_argument("--generated", type=int, default=None, help="generated files (default 2,000)")
    args = parser.parse_args(argv)
    zoo_n, gen_n, workers = (
        (30, 40, (1,)) if args.quick else (None, 20_000, (1, 2)) if args.full else (1000, 2000, (1, 2))
    )
    zoo_n = args.zoo or zoo_n
    gen_n = args.generated or gen_n
    rows: list[Row] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        folder = Path(tmp)
        rows.append(ray_start_cost())
        rows += compare_engines("default zoo", zoo_sample(zoo_n), folder, workers)
        console.print("done: default zoo")
        rows += compare_engines("generated mixed formats", generated(folder / "generated", gen_n), folder, workers)
        console.print("done: generated collection")
        rows += per_file_costs(folder / "per-file", args.quick)
    print_rows(f"Ray ingest ({os.cpu_count()} CPUs, {time.perf_counter() - start:.0f} s)", rows)
    return rows


if __name__ == "__main__":
    main()
