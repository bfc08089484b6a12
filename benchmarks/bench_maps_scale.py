"""Maps at scale: UMAP fitted on a sample with the rest placed by the weighted mean of their nearest sampled rows,
against one fit over every row; placement against UMAP's ``transform``; the size of the map page beyond the cap.

Rows (``[benchmark, case, ours, alternative, ratio, notes]``, as in ``benchmarks/run_all.py``):

- **fit**: ``lol_engine.maps.fit_map`` with ``sample`` (fit a seeded sample, place the rest by
  ``weighted_placement``) against ``sample`` ≥ n (one UMAP fit over all rows), on synthetic clustered embeddings
  (30 Gaussian clusters, 64-d). Wall time, traced heap peak (``tracemalloc``: NumPy and Python allocations, both fits
  in this process), and layout quality for each: ``sklearn.manifold.trustworthiness`` (k = 10) on the same
  2,000-row subsample, and cluster agreement (each row's nearest other row in 2-D is of its own cluster).
- **place**: ``weighted_placement`` of the same rows against UMAP's ``transform`` (``EmbeddingMap.place``), with the
  share of placed rows whose nearest fitted row in 2-D is of their own cluster.
- **page**: ``app.map_view.map_view`` on synthetic maps of 100k and 1M LoRAs: figure JSON bytes and build time
  (build + ``to_json``); beyond ``MAX_POINTS`` a sample over a density layer, against what shipping every point
  would cost (bytes scaled from the 100k figure, which ships all its points).

Default: n = 20,000 rows, a 5,000-row sample (a 4:1 ratio, as 200k:50k). ``--full``: n = 100,000 and the 50,000-row
default sample (the issue's case). ``--quick``: a smoke run (seconds after UMAP's JIT). UMAP's and pynndescent's JIT
are paid before any timing. Numbers are for comparison within one run on one machine, not a gate.
Run: ``python benchmarks/bench_maps_scale.py [--quick | --full]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_map_render import SyntheticCollection
from bench_table import print_rows

Row = list[str]
T = TypeVar("T")
console = Console()
CLUSTERS, DIM = 30, 64


def clustered(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows around :data:`CLUSTERS` centres in :data:`DIM` dimensions, and each row's cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLUSTERS, DIM)) * 1.5
    labels = rng.integers(0, CLUSTERS, size=n)
    return (centres[labels] + rng.normal(size=(n, DIM)) * 0.5).astype(np.float32), labels


def measured(fn: Callable[[], T]) -> tuple[T, float, float]:
    """``fn()``, its wall seconds and its traced heap peak in MiB."""
    tracemalloc.start()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return out, seconds, peak


def quality(x: np.ndarray, labels: np.ndarray, coords: np.ndarray, rows: np.ndarray) -> tuple[float, float]:
    """Trustworthiness (k = 10) and nearest-neighbour cluster agreement of ``coords`` on ``rows``."""
    from sklearn.manifold import trustworthiness

    trust = float(trustworthiness(x[rows], coords[rows], n_neighbors=10))
    d = ((coords[rows, None, :] - coords[None, rows, :]) ** 2).sum(-1)  # (m, m)
    np.fill_diagonal(d, np.inf)
    agree = float((labels[rows][d.argmin(1)] == labels[rows]).mean())
    return trust, agree


def fits(n: int, sample: int) -> list[Row]:
    """Sample + transform against one fit over all rows, then serial against parallel placement."""
    from lol_engine.maps import fit_map, warm_up, weighted_placement

    warm_up(DIM).join()  # UMAP's JIT, off the clock
    if n > 4096:  # and pynndescent's (fits of >= 4,096 rows search neighbours with it): ~1-2 min, also off the clock
        start = time.perf_counter()
        fit_map(clustered(4200, seed=9)[0], sample=4200).place(clustered(10, seed=8)[0])  # its search: transform
        console.print(f"JIT warm-up (fit 4,200 rows, transform 10): {time.perf_counter() - start:.0f} s")
    x, labels = clustered(n)
    rows = np.random.default_rng(1).choice(n, size=min(n, 2000), replace=False)
    ours, ours_s, ours_mb = measured(lambda: fit_map(x, sample=sample))
    console.print(f"sample fit + place: {ours_s:.1f} s")
    full, full_s, full_mb = measured(lambda: fit_map(x, sample=n))
    console.print(f"full fit: {full_s:.1f} s")
    (o_trust, o_agree), (f_trust, f_agree) = (
        quality(x, labels, ours.coords, rows),
        quality(x, labels, full.coords, rows),
    )
    case = f"{n:,} rows × {DIM}-d, {CLUSTERS} clusters; sample {sample:,}"
    out = [
        [
            "map fit",
            case,
            f"sample + placement {ours_s:.1f} s",
            f"full fit {full_s:.1f} s",
            f"{full_s / ours_s:.1f}×",
            f"fitted {ours.params['fitted']:,}, placed {ours.params['placed']:,}",
        ],
        [
            "map quality",
            case + f"; {len(rows):,}-row subsample",
            f"trust {o_trust:.3f}, NN cluster {o_agree:.3f}",
            f"trust {f_trust:.3f}, NN cluster {f_agree:.3f}",
            f"{o_trust / f_trust:.3f}",
            "trustworthiness (k=10, sklearn) and 2-D nearest neighbour of the same cluster",
        ],
        [
            "map memory",
            case,
            f"{ours_mb:,.0f} MiB",
            f"{full_mb:,.0f} MiB",
            f"{full_mb / ours_mb:.1f}×",
            "tracemalloc peak (NumPy + Python heap) during the fit",
        ],
    ]
    rest = np.setdiff1d(np.arange(n), ours.fitted_rows if ours.fitted_rows is not None else [])[: max(sample, 2000)]
    chosen = ours.fitted_rows if ours.fitted_rows is not None else np.arange(n)
    placed, placed_s, _ = measured(lambda: weighted_placement(x[chosen], ours.coords[chosen], x[rest]))
    transformed, transform_s, _ = measured(lambda: ours.place(x[rest], batch=1000))

    def in_cluster(coords: np.ndarray) -> float:  # placed rows whose nearest fitted row (2-D) is of their cluster
        d = ((coords[:, None, :] - ours.coords[None, chosen[:4000], :]) ** 2).sum(-1)  # (placed, ≤ 4,000)
        return float((labels[chosen[:4000]][d.argmin(1)] == labels[rest]).mean())

    out.append(
        [
            "map place",
            f"{len(rest):,} rows into a {sample:,}-row fit",
            f"weighted mean of 10 nearest {placed_s:.2f} s, in cluster {in_cluster(placed):.3f}",
            f"UMAP transform {transform_s:.1f} s, in cluster {in_cluster(transformed):.3f}",
            f"{transform_s / placed_s:.1f}×",
            f"{1000 * placed_s / max(len(rest), 1):.3f} vs {1000 * transform_s / max(len(rest), 1):.2f} ms a row; "
            f"{os.cpu_count()} CPUs",
        ]
    )
    return out


def pages(sizes: list[int], cap: int) -> list[Row]:
    """Figure bytes and build time of the map page, with the ids' share of the bytes."""
    from app.map_view import map_view

    out = []
    per_point = 0.0
    for n in sizes:
        synthetic = SyntheticCollection.make(n)
        start = time.perf_counter()
        view = map_view(synthetic, "lol:x", "zoo", max_points=cap)  # type: ignore[arg-type]
        text = view.figure.to_json()
        seconds = time.perf_counter() - start
        meta = view.figure.layout.meta
        ids_bytes = len(json.dumps(meta.get("id_hex", meta.get("ids"))))
        if not view.sampled:
            per_point = len(text) / n
        every = f"every point ≈ {per_point * n / 2**20:,.0f} MB" if per_point else "every point: not measured"
        out.append(
            [
                "map page",
                f"{n:,} LoRAs, cap {cap:,}",
                f"{len(text) / 2**20:.1f} MB, {seconds:.1f} s",
                every,
                f"{per_point * n / len(text):.1f}×" if per_point else "-",
                f"{view.shown:,} points shipped{' + density' if view.sampled else ''}; ids "
                f"{100 * ids_bytes / len(text):.0f} % of the bytes",
            ]
        )
        console.print(f"page {n:,}: {len(text) / 2**20:.1f} MB in {seconds:.1f} s")
    return out


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke sizes (600 rows, pages of 2k and 30k)")
    size.add_argument("--full", action="store_true", help="100k rows, a 50k sample (the full fit takes many minutes)")
    args = parser.parse_args(argv)
    if args.quick:
        n, sample, sizes, cap = 600, 300, [2_000, 30_000], 10_000
    elif args.full:
        n, sample, sizes, cap = 100_000, 50_000, [100_000, 1_000_000], 100_000
    else:
        n, sample, sizes, cap = 20_000, 5_000, [100_000, 1_000_000], 100_000
    rows = pages(sizes, cap) + fits(n, sample)
    print_rows(f"maps at scale ({os.cpu_count()} CPUs)", rows)
    return rows


if __name__ == "__main__":
    main()
