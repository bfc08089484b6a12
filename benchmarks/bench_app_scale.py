"""The app over a generated collection of 100k small LoRA files, end to end through the façade the app calls.

    python benchmarks/bench_app_scale.py              # 100k LoRAs (~10 min on 2 cores; keeps nothing)
    python benchmarks/bench_app_scale.py --keep DIR --write   # keep the collection; the table into BENCHMARKS.md
    python benchmarks/bench_app_scale.py --n 20000    # smaller
    python benchmarks/bench_app_scale.py --quick      # a smoke run (2,000 LoRAs)

What it does, as a user with a folder of LoRAs would: writes ``--n`` PEFT ``.safetensors`` files (4 base layouts,
2 ranks each, clustered in ΔW: perturbed copies of shared centres, as ``bench_ann.generate`` makes them), ingests
them with ``lol_engine.ingest.ingest`` (every default encoder: fingerprint, ΔW sketch, and the shipped predictors,
none of which fits these layouts), fits the maps with ``Explorer.fit_maps``, then measures what the app's JSON API
(``app.api``) and pages ask of the explorer on that collection, in a fresh process state (factor cache cold, the
neighbour indexes loaded or built at first use):

- ``/neighbours`` (``app.api.neighbours``: exact ΔW cosine, its candidates from the ΔW-sketch index above 10k
  LoRAs a family, relations) p50 / p95 over 50 LoRAs, cold (files read) and again warm, against the exact full scan
  (every LoRA of the layout; a few queries);
- ``neighbours_by_embedding`` on the fingerprint (the map's "similar" list) p50 / p95;
- the Explore map of the fingerprint (``app.map_view.map_view``): build time and page bytes, and how many points it
  ships; ``/map_points`` first page;
- the Collection table page (``handlers.collection_frame`` with the page cap) and ``explorer.records()``.

Rows ``[benchmark, case, ours, alternative, ratio, notes]`` as in ``run_all.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from bench_ann import generate  # noqa: E402
from bench_table import print_rows  # noqa: E402

Row = list[str]
console = Console()
RELATED = 0.2  # ΔW cosine of a related LoRA here (unrelated ones of a layout sit near 0.05: noise, in any order)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _p(times: list[float], q: float) -> float:
    return float(np.percentile(times, q))


def write_files(n: int, folder: Path) -> list[str]:
    """``n`` PEFT adapter files (fp16 factors, ``base_model.model.<module>.lora_{A,B}.weight``) in ``folder``."""
    loras = generate(n, 1000, torch.Generator().manual_seed(0))
    paths = []
    for k, lora in enumerate(loras):
        tensors = {}
        for m in lora:
            tensors[f"base_model.model.{m.name}.lora_A.weight"] = m.a.to(torch.float16).contiguous()
            tensors[f"base_model.model.{m.name}.lora_B.weight"] = m.b.to(torch.float16).contiguous()
        path = folder / f"lora-{k:06d}.safetensors"
        save_file(tensors, str(path))
        paths.append(str(path))
    return paths


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def latencies(fn: Callable[[str], Any], ids: list[str]) -> list[float]:
    out = []
    for i in ids:
        _, seconds = timed(lambda i=i: fn(i))
        out.append(seconds)
    return out


def run(n: int, queries: int, exact_queries: int, folder: Path) -> list[Row]:
    from lol_engine.explorer import Explorer
    from lol_engine.ingest import ingest

    rows: list[Row] = []
    db = folder / "lol.duckdb"
    if db.exists():  # kept from an earlier run (--keep): measure the queries only
        explorer = Explorer.open(db)
        ids = [s.id for s in explorer.store.all()]
        explorer.close()
        return queries_on(db, ids, queries, exact_queries)
    paths, write_s = timed(lambda: write_files(n, folder / "loras"))
    console.print(f"wrote {n:,} files in {write_s:.0f} s")
    explorer = Explorer.open(db)
    report, ingest_s = timed(lambda: ingest(paths, explorer.store, explorer.encoders, progress=True))
    assert len(report.ids) == n, report.refused[:3]
    maps_s = sum(explorer.fit_maps(progress=True).values())
    explorer.close()
    rows.append(
        [
            "app at scale",
            f"build a {n:,}-LoRA collection",
            f"ingest {n / ingest_s:,.0f} LoRAs/s ({ingest_s:.0f} s)",
            f"maps {maps_s:.0f} s",
            "",
            f"{n:,} PEFT files written in {write_s:.0f} s; every default encoder (fingerprint, ΔW sketch, 11 "
            "predictors: none fits); the fingerprint map faceted by base family (the parser names 1 of the 4 "
            "layouts' bases; the others are `unknown`)",
        ]
    )

    # a restarted server: the queries run in a fresh process (this one holds what building the collection left)
    out = folder / "rows.json"
    command = [sys.executable, __file__, "--keep", str(folder), "--queries", str(queries)]
    subprocess.run([*command, "--exact-queries", str(exact_queries), "--rows-json", str(out)], check=True)
    return rows + json.loads(out.read_text())


def queries_on(db: Path, stored: list[str], queries: int, exact_queries: int) -> list[Row]:
    """What the app's API and pages ask of the collection in ``db`` (a restarted server: caches cold)."""
    from app import api, handlers
    from app.map_view import map_view
    from lol_engine.encoders import FINGERPRINT
    from lol_engine.explorer import Explorer

    rows: list[Row] = []
    n = len(stored)
    explorer = Explorer.open(db)
    _, start_s = timed(lambda: explorer.start(progress=False))  # loads (or builds and saves) the neighbour indexes
    rng = np.random.default_rng(1)
    ids = [stored[i] for i in rng.choice(n, size=queries, replace=False)]
    _, first_s = timed(lambda: api.neighbours(explorer, ids[0]))
    cold = latencies(lambda i: api.neighbours(explorer, i), ids[1:])
    warm = latencies(lambda i: api.neighbours(explorer, i), ids[1:])
    found = {i: [r["id"] for r in api.neighbours(explorer, i)] for i in ids[:exact_queries]}
    threshold = explorer.neighbour_indexes.exact_max_rows
    explorer.neighbour_indexes.exact_max_rows = 10**12  # the exact full scan below any threshold
    exact_times, recall, related, found_related = [], [], 0, 0
    for i in ids[:exact_queries]:
        truth, seconds = timed(lambda i=i: api.neighbours(explorer, i))
        exact_times.append(seconds)
        recall.append(len({r["id"] for r in truth} & set(found[i])) / max(1, len(truth)))
        close = {r["id"] for r in truth if r["similarity"] >= RELATED}  # beyond the unrelated LoRAs' noise floor
        related += len(close)
        found_related += len(close & set(found[i]))
    rows.append(
        [
            "app at scale",
            f"/neighbours (ΔW cosine, k=10), {n:,} LoRAs",
            f"p50 {_ms(_p(warm, 50))}, p95 {_ms(_p(warm, 95))} warm",
            f"exact full scan p50 {_ms(statistics.median(exact_times))}",
            f"{statistics.median(exact_times) / _p(warm, 50):.0f}×",
            f"cold (factors read from files) p50 {_ms(_p(cold, 50))}, p95 {_ms(_p(cold, 95))}; first query "
            f"{_ms(first_s)}, after {_ms(start_s)} of start-up (the indexes loaded or built); "
            f"recall@10 vs the full scan {np.mean(recall):.3f}, of the neighbours with ΔW cosine ≥ {RELATED} "
            f"{found_related / max(1, related):.3f} ({found_related} of {related}; {exact_queries} queries); "
            f"{len(warm)} queries",
        ]
    )
    explorer.neighbour_indexes.exact_max_rows = threshold
    by_embedding = latencies(lambda i: api.neighbours(explorer, i, by=FINGERPRINT), ids[1:])
    rows.append(
        [
            "app at scale",
            f"/neighbours by fingerprint cosine, {n:,} LoRAs",
            f"p50 {_ms(_p(by_embedding, 50))}",
            f"p95 {_ms(_p(by_embedding, 95))}",
            "",
            "the index of the LoRA's family",
        ]
    )
    view, view_s = timed(lambda: map_view(explorer, FINGERPRINT))
    figure_json, json_s = timed(lambda: view.figure.to_json())
    page, page_s = timed(lambda: api.map_points(explorer, FINGERPRINT, limit=10_000))
    rows.append(
        [
            "app at scale",
            f"Explore map of {n:,} LoRAs",
            f"built in {_ms(view_s + json_s)}",
            f"{len(figure_json) / 1e6:.1f} MB page",
            "",
            f"status line: “{view.status('zoo').split(' · ')[0]}”; "
            f"/map_points first 10,000 of {page['total']:,} in {_ms(page_s)} "
            f"({len(json.dumps(page)) / 1e6:.1f} MB)",
        ]
    )
    explorer._changed()
    records, records_s = timed(explorer.records)
    frame, frame_s = timed(lambda: handlers.collection_frame(explorer, limit=handlers.TABLE_ROWS))
    rows.append(
        [
            "app at scale",
            f"Collection table of {n:,} LoRAs",
            f"page of {len(frame):,} rows in {_ms(frame_s)}",
            f"all {len(records):,} records in {_ms(records_s)}",
            "",
            "records() once per change (cached), then every table, filter and map reads it",
        ]
    )
    explorer.close()
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (2,000 LoRAs)")
    parser.add_argument("--n", type=int, default=100_000, help="LoRAs in the generated collection")
    parser.add_argument("--queries", type=int, default=50, help="timed /neighbours calls")
    parser.add_argument("--exact-queries", type=int, default=5, help="of them, also by the exact full scan")
    parser.add_argument("--keep", default=None, help="build the collection in this folder and keep it (reused)")
    parser.add_argument("--rows-json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--write", action="store_true", help="the table into docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    n = 2_000 if args.quick else args.n
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        (folder / "loras").mkdir(parents=True, exist_ok=args.keep is not None)
        rows = run(n, min(args.queries, n), min(args.exact_queries, args.queries), folder)
    if args.rows_json:
        Path(args.rows_json).write_text(json.dumps(rows))
    if args.write:
        from bench_map_render import write

        lines = [
            "<!-- app-scale:begin -->",
            "",
            f"Generated by `python benchmarks/bench_app_scale.py --n {n} --write` ({os.cpu_count()} CPUs, torch "
            f"{torch.__version__}): {n:,} small PEFT files in 4 module layouts × 2 ranks, clustered in ΔW, ingested "
            "and mapped; then, in a fresh process (a restarted server), what the app's JSON API and pages ask of it.",
            "",
            "| benchmark | case | ours | alternative | ratio | notes |",
            "|---|---|---|---|---|---|",
            *["| " + " | ".join(row) + " |" for row in rows],
            "",
            "<!-- app-scale:end -->",
        ]
        write("\n".join(lines), HERE.parent / "docs" / "BENCHMARKS.md", "app-scale", f"The app at {n:,} LoRAs")
    print_rows(f"the app at scale ({os.cpu_count()} CPUs, torch {torch.__version__})", rows)
    return rows


if __name__ == "__main__":
    main()
