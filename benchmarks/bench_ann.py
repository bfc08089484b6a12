"""Neighbours at scale: the ANN side index (lol_engine.ann) against exact search, and the explorer at 100k LoRAs.

    python benchmarks/bench_ann.py            # 100k, ~4-5 min on 2 cores
    python benchmarks/bench_ann.py --quick    # a smoke run (5k, seconds)
    python benchmarks/bench_ann.py --full     # adds 1M synthetic embeddings (HNSW build takes many minutes)

Rows (``[benchmark, case, ours, alternative, ratio, notes]``, as in ``run_all.py``):

1. synthetic clustered 100-d embeddings (the fingerprint's size): HNSW (faiss, exact re-scoring) vs the exact NumPy
   scan: build time, per-query latency, recall@10 against the exact scan, resident memory of the index;
2. a generated collection of small LoRAs (``--n``, default 100k): 4 base families with their own module layouts
   (two ranks each), clustered in ΔW (members are perturbed copies of 250 centres per family), each with a distinct
   sha256 and its real fingerprint, stored with ``LoraStore.add_many`` in a DuckDB file. No LoRA file is written:
   the explorer under test serves factors from memory (a subclass overriding ``Explorer.weights``, i.e. a warm
   server whose LoRA cache holds them). Measured: ``Explorer.neighbours_of`` (fingerprint candidates of the family
   from the HNSW index, exact ΔW cosine re-rank of 256 of them, relations) p50/p95 against the exact full scan (ΔW
   cosine against every LoRA of the layout, today's path below the threshold), recall@10 of the re-ranked top-10
   against the full scan, ``neighbours_by_embedding`` through the index against DuckDB's exact scan, and building
   the index at first use against loading it from ``<db>.ann/``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lol_engine.ann as ann  # noqa: E402
from lol_engine.ann import NeighbourIndex, NeighbourIndexes  # noqa: E402
from lol_engine.encoders import FINGERPRINT, FingerprintEncoder  # noqa: E402
from lol_engine.explorer import Explorer  # noqa: E402
from lol_engine.lora.weights import LoraMetadata, LoraModule, LoraWeights  # noqa: E402
from lol_engine.relations import relate  # noqa: E402
from lol_engine.sketch import DW_SKETCH, DeltaSketchEncoder  # noqa: E402
from lol_engine.spec import LayerSpec  # noqa: E402
from lol_engine.store import LoraStore, NewLora  # noqa: E402

Row = list[str]
NO_LIMIT = 2**62
# (base family, module names, d_out, d_in): small LoRAs, one layout per family (two ranks each)
FAMILIES = (
    ("sd1", ("unet.down.0.attn1.to_q", "unet.down.0.attn1.to_v"), 32, 32),
    ("sdxl", ("unet.mid.attn1.to_q", "unet.mid.attn1.to_k", "unet.mid.attn1.to_v"), 32, 48),
    ("llm-decoder", ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"), 48, 32),
    ("flux", ("transformer.single.0.attn.to_q", "transformer.single.0.attn.to_out.0"), 40, 40),
)
RANKS = (4, 8)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _rss_mb() -> float:
    """Resident memory of this process now (Linux ``/proc``; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _latencies(fn: Callable[[Any], Any], items: list[Any]) -> tuple[list[float], list[Any]]:
    times, outs = [], []
    for item in items:
        start = time.perf_counter()
        outs.append(fn(item))
        times.append(time.perf_counter() - start)
    return times, outs


def _recall(found: list[list[Any]], truth: list[list[Any]]) -> float:
    """Mean share of each exact top-10 (``truth``) among the found ones, over the queries ``truth`` has."""
    return float(
        np.mean([len({x.id for x in a} & {x.id for x in b}) / 10 for a, b in zip(found, truth, strict=False)])
    )


def _p(times: list[float], q: float) -> float:
    return float(np.quantile(np.array(times), q))


# ------------------------------------------------------------------------------------------------ 1. synthetic
def clustered(n: int, dim: int, rng: np.random.Generator, clusters: int = 1000) -> np.ndarray:
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x * rng.uniform(0.2, 5.0, (n, 1)).astype(np.float32)


def synthetic(n: int, queries: int, rng: np.random.Generator) -> list[Row]:
    """HNSW vs the exact scan over ``n`` clustered 100-d embeddings."""
    x, ids = clustered(n, 100, rng), [f"{i:08d}" for i in range(n)]
    q = clustered(queries, 100, rng)
    exact = NeighbourIndex("synthetic", None, 100, exact_max_rows=NO_LIMIT)
    start = time.perf_counter()
    exact.add(ids, x)
    exact_build = time.perf_counter() - start
    exact_times, truth = _latencies(lambda v: exact.search(v, 10), list(q))
    rss = _rss_mb()
    hnsw = NeighbourIndex("synthetic", None, 100, exact_max_rows=0)
    start = time.perf_counter()
    hnsw.add(ids, x)
    hnsw_build = time.perf_counter() - start
    memory = _rss_mb() - rss
    hnsw_times, found = _latencies(lambda v: hnsw.search(v, 10), list(q))
    recall = np.mean([len({i for i, _ in a} & {i for i, _ in b}) / 10 for a, b in zip(found, truth, strict=True)])
    label = f"{n:,} clustered 100-d embeddings"
    med_h, med_e = statistics.median(hnsw_times), statistics.median(exact_times)
    return [
        ["ANN index", f"build, {label}", f"HNSW {_ms(hnsw_build)}", f"exact {_ms(exact_build)}", "-", "M=32, efC=80"],
        [
            "ANN index",
            f"top-10 query, {label}",
            f"HNSW {_ms(med_h)} (p95 {_ms(_p(hnsw_times, 0.95))})",
            f"NumPy exact {_ms(med_e)}",
            f"{med_e / med_h:.1f}×",
            f"recall@10 {recall:.3f} over {queries} queries; similarities re-scored exactly",
        ],
        [
            "ANN index",
            f"memory, {label}",
            f"+{memory:.0f} MB RSS (graph + faiss copy + unit rows)",
            f"{x.nbytes / 2**20:.0f} MB raw float32",
            "-",
            "resident-set growth while building",
        ],
    ]


# ------------------------------------------------------------------------------------------------ 2. the collection
def generate(n: int, centres: int, gen: torch.Generator) -> list[LoraWeights]:
    """``n`` small LoRAs, equally many per (family, rank) layout, each a perturbed copy of one of ``centres``."""
    layouts = [(family, mods, o, i, r) for family, mods, o, i in FAMILIES for r in RANKS]
    out: list[LoraWeights] = []
    for k, (family, mods, d_out, d_in, rank) in enumerate(layouts):
        count = n // len(layouts) + (k < n % len(layouts))
        which = torch.randint(0, max(1, centres // len(RANKS)), (count,), generator=gen)
        sigma = torch.empty(count, 1, 1).uniform_(0.2, 1.2, generator=gen)
        factors = []
        for _ in mods:  # a: (count, r, d_in)   b: (count, d_out, r)
            ca = torch.randn(max(1, centres // len(RANKS)), rank, d_in, generator=gen) / d_in**0.5
            cb = torch.randn(max(1, centres // len(RANKS)), d_out, rank, generator=gen) / rank**0.5
            a = ca[which] + sigma * torch.randn(count, rank, d_in, generator=gen) / d_in**0.5
            b = cb[which] + sigma * torch.randn(count, d_out, rank, generator=gen) / rank**0.5
            factors.append((a, b))
        specs = [LayerSpec(name, d_out, d_in, rank) for name in mods]
        for j in range(count):
            modules = tuple(
                LoraModule(spec, a[j], b[j], scale=1.0, alpha=float(rank))
                for spec, (a, b) in zip(specs, factors, strict=True)
            )
            serial = len(out)
            meta = LoraMetadata(format="peft", base_family=family, sha256=f"{serial:064x}", source=f"memory:{serial}")
            out.append(LoraWeights(modules, meta))
    return out


class MemoryExplorer(Explorer):
    """An explorer whose LoRA factors are all in memory (a warm server's cache); nothing is read from files."""

    def __init__(self, store: LoraStore, loras: dict[str, LoraWeights], data_dir: str) -> None:
        super().__init__(store, {}, data_dir)
        self.loras = loras

    def weights(self, lora_id: str) -> LoraWeights:
        """The factors of a stored LoRA, from memory."""
        return self.loras[lora_id]


def collection(n: int, queries: int, exact_queries: int, tmp: str) -> list[Row]:
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(1)
    start = time.perf_counter()
    loras = generate(n, centres=250 * len(RANKS), gen=gen)
    generated = time.perf_counter() - start
    start = time.perf_counter()
    fingerprints = FingerprintEncoder().encode_many(loras)
    fingerprinted = time.perf_counter() - start
    start = time.perf_counter()
    sketches = DeltaSketchEncoder().encode_many(loras)
    sketched = time.perf_counter() - start
    start = time.perf_counter()
    store = LoraStore(Path(tmp) / "lol.duckdb")
    for chunk in range(0, n, 5000):
        part = slice(chunk, chunk + 5000)
        rows = zip(loras[part], fingerprints[part], sketches[part], strict=True)
        items = [NewLora(lora, embeddings={FINGERPRINT: f, DW_SKETCH: s}) for lora, f, s in rows]
        store.add_many(items)
    store.checkpoint()
    stored = time.perf_counter() - start
    by_id = {lo.meta.sha256: lo for lo in loras}
    ids = [lo.meta.sha256 for lo in loras]
    picks = [ids[int(i)] for i in rng.choice(n, size=queries, replace=False)]

    fast = MemoryExplorer(store, by_id, tmp)
    start = time.perf_counter()
    fast.neighbours_of(picks[0], k=10)  # the first query loads (here: builds and writes) the indexes it uses
    first = time.perf_counter() - start
    start = time.perf_counter()
    restart = NeighbourIndexes(store)  # a restart: the same indexes read back from <db>.ann/
    restart.loaded(FINGERPRINT)
    restart.loaded(DW_SKETCH)
    reload = time.perf_counter() - start
    times, found = _latencies(lambda i: fast.neighbours_of(i, k=10), picks)

    def relations_only(k: int) -> float:  # the share of a query spent in lol_engine.relations.relate (k-sized)
        lora, top = by_id[picks[k]], found[k]
        start = time.perf_counter()
        relate(lora, [by_id[x.id] for x in top], [x.id for x in top], [x.name for x in top])
        return time.perf_counter() - start

    relate_p50 = statistics.median(relations_only(k) for k in range(min(20, len(picks))))
    by_fingerprint = MemoryExplorer(store, by_id, tmp)
    by_fingerprint.candidate_encoders = (FINGERPRINT,)
    by_fingerprint.neighbours_of(picks[0], k=10)
    fp_times, fp_found = _latencies(lambda i: by_fingerprint.neighbours_of(i, k=10), picks)

    exact = MemoryExplorer(store, by_id, tmp)
    exact._ann = NeighbourIndexes(store, persist=False, exact_max_rows=NO_LIMIT)  # today's exact path at any size
    start = time.perf_counter()
    exact.neighbours_of(picks[0], k=10)
    exact_first = time.perf_counter() - start
    exact_times, truth = _latencies(lambda i: exact.neighbours_of(i, k=10), picks[:exact_queries])
    recall = _recall(found, truth)
    fp_recall = _recall(fp_found, truth)
    sims_equal = all(
        abs(x.similarity - y.similarity) < 1e-9
        for a, b in zip(found, truth, strict=False)
        for x, y in zip(a, b, strict=False)
        if x.id == y.id
    )

    by_index, hits = _latencies(lambda i: fast.neighbours_by_embedding(i, FINGERPRINT, k=10), picks)

    def duckdb_scan(lora_id: str) -> list[tuple[str, float]]:
        vector = store.embedding(lora_id, FINGERPRINT)
        return store.nearest(FINGERPRINT, vector, 10, lora_id, by_id[lora_id].meta.base_family)

    by_duckdb, want = _latencies(duckdb_scan, picks[:exact_queries])
    emb_recall = np.mean([len({x.id for x in a} & {h for h, _ in b}) / 10 for a, b in zip(hits, want, strict=False)])
    store.close()
    label = f"{n:,} generated small LoRAs, 4 families"
    med, emed = statistics.median(times), statistics.median(exact_times)
    return [
        [
            "neighbours at scale",
            f"set-up, {label}",
            f"generate {_ms(generated)}, fingerprints {_ms(fingerprinted)}, ΔW sketches {_ms(sketched)}",
            f"store.add_many {_ms(stored)}",
            "-",
            f"per LoRA: fingerprint {fingerprinted / n * 1000:.2f} ms, sketch {sketched / n * 1000:.2f} ms",
        ],
        [
            "neighbours at scale",
            f"index at first use, {label}",
            f"read back from <db>.ann/ {_ms(reload)}",
            f"build + write {_ms(first)}",
            f"{first / reload:.1f}×",
            "4 HNSW partitions (one per family) of the ΔW sketch (256-d) and of the fingerprint (100-d)",
        ],
        [
            "neighbours at scale",
            f"Explorer.neighbours_of (ΔW), {label}",
            f"sketch index + ΔW re-rank p50 {_ms(med)}, p95 {_ms(_p(times, 0.95))}",
            f"exact full scan p50 {_ms(emed)} (first {_ms(exact_first)})",
            f"{emed / med:.0f}×",
            f"recall@10 {recall:.3f} vs the full scan over {len(truth)} queries; "
            f"equal cosines where equal ids: {sims_equal}; {queries} timed queries; of which relations "
            f"(lol_engine.relations.relate on the top 10) p50 {_ms(relate_p50)}",
        ],
        [
            "neighbours at scale",
            f"ΔW candidates by sketch vs by fingerprint, {label}",
            f"sketch recall@10 {recall:.3f}, p50 {_ms(med)}",
            f"fingerprint recall@10 {fp_recall:.3f}, p50 {_ms(statistics.median(fp_times))}",
            "-",
            f"the same ΔW re-rank of {ann.RERANK_CANDIDATES} candidates; recall vs the exact full scan",
        ],
        [
            "neighbours at scale",
            f"Explorer.neighbours_by_embedding (fingerprint), {label}",
            f"index p50 {_ms(statistics.median(by_index))}, p95 {_ms(_p(by_index, 0.95))}",
            f"DuckDB exact scan p50 {_ms(statistics.median(by_duckdb))}",
            f"{statistics.median(by_duckdb) / statistics.median(by_index):.0f}×",
            f"recall@10 {emb_recall:.3f} vs DuckDB",
        ],
    ]


def main(argv: list[str] | None = None) -> list[Row]:
    """Run the benchmark; returns its rows (and prints them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with small sizes")
    parser.add_argument("--full", action="store_true", help="add 1M synthetic embeddings")
    parser.add_argument("--n", type=int, default=100_000, help="LoRAs in the generated collection")
    parser.add_argument("--queries", type=int, default=100, help="timed neighbour queries")
    parser.add_argument("--exact-queries", type=int, default=10, help="queries also run by the exact full scan")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.queries, args.exact_queries = 5000, 10, 3
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = synthetic(args.n, 20 if args.quick else 200, rng)
    if args.full:
        rows += synthetic(1_000_000, 200, rng)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:  # below the exact threshold: force the index path on the small collection
            saved, ann.EXACT_MAX_ROWS = ann.EXACT_MAX_ROWS, 500
            try:
                rows += collection(args.n, args.queries, args.exact_queries, tmp)
            finally:
                ann.EXACT_MAX_ROWS = saved
        else:
            rows += collection(args.n, args.queries, args.exact_queries, tmp)
    for row in rows:
        print(" | ".join(row))
    return rows


if __name__ == "__main__":
    main()
