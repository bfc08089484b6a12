"""The benchmark suite: every row a side-by-side ratio measured in this run. ``make bench`` runs it.

    python benchmarks/run_all.py            # ~15 min on 2 cores; prints one table, writes docs/BENCHMARKS.md
    python benchmarks/run_all.py --quick    # a smoke run with small sizes (nothing written)
    python benchmarks/run_all.py --only ann,maps

Rows:
1. spectra — per-module singular values from the factors (batched; the route ``singular_values`` takes) vs dense SVD
   of ΔW vs just reading the file, for SD 1.5 (r32) and a 7B LLM's q/k/v/o (r16) with their real module shapes
   (``bench_spectra.py``; SDXL's dense SVD alone takes ~5 min there: ``bench_spectra.py`` runs it); and the two
   routes side by side — float64 Gram matrices against QR of the float32 factors — for SD 1.5 at ranks 8, 32 and 128,
   SDXL r32 and the 7B file;
2. neighbours — exact top-10 over 1k / 10k / 100k stored LoRAs: fingerprint cosine in DuckDB vs a NumPy brute force,
   and exact ΔW cosine from the factors (batched, ``lol_engine.similarity``) vs NumPy on materialised dense ΔW;
3. LoL prediction vs the standard evaluation of the same LoRAs: fashion-gen quality (33 decoder samples + judge), and
   on a real base, all-MiniLM-L6-v2 adapters' gloss -> lemma retrieval recall@10 (attach each adapter to the real model
   with peft and encode the 512 probe texts, as anyone evaluating it would) against one batched LoL forward;
4. ingest throughput of 1,000 real-format LoRAs (LoRAs/s), where its time goes, and the floor (bytes over memory
   bandwidth);
5. speed — an SDXL r32 upload to predictions (p50 / p95) and small-LoRA ingest, this checkout against the revision
   before the per-file work, with peak memory (``bench_speed.py``);
6. ray — ``lol ingest --engine ray`` with 1 and 2 workers against the single-process ingest on the same files (500
   zoo LoRAs, 2,000 generated mixed-format files), Ray's start-up, per-file cost by format (``bench_ray_ingest.py``);
7. ann — the neighbour index against exact search over 100k embeddings, and neighbours (ΔW-sketch candidates, exact
   ΔW re-rank) in a generated collection of 100k LoRAs (``bench_ann.py``);
8. maps — a sample fitted and the rest placed against one fit over all rows; the map page at 100k and 1M LoRAs
   (``bench_maps_scale.py``);
9. the app — upload-to-prediction p50 / p95 under 1, 4 and 16 concurrent clients on loopback.

``bench_app_scale.py`` (100k LoRA files end to end through the app's API, ~10 min) runs on its own.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import inspect
import os
import pstats
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "tests")]

from bench_spectra import Config, dense_time, llm7b_shapes, sd15_shapes, sdxl_shapes, timed, write_lora  # noqa: E402

from lol_engine import load_lora  # noqa: E402
from lol_engine.symmetry import (  # noqa: E402
    _buckets,
    _gram_route,
    lora_singular_values,
    qr_singular_values,
    singular_values,
    stacked,
)

console = Console()
Row = list[str]


def _fmt(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def spectra(folder: Path, quick: bool) -> list[Row]:
    div, r = (16, 8) if quick else (1, 32)
    configs = {
        f"SD 1.5 kohya r{r}": Config("sd15", sd15_shapes(div), r),
        f"7B q/k/v/o PEFT r{r // 2}": Config("llm7b", llm7b_shapes(div), r // 2),
    }
    rows = []
    gen = torch.Generator().manual_seed(0)
    for label, config in configs.items():
        path = write_lora(config, folder, gen)
        read_s, lora = timed(lambda path=path: load_lora(path), 2)
        factored_s, _ = timed(lambda lora=lora: lora_singular_values(lora, cache=False), 2)
        dense_s, err = dense_time(lora, 1, 1)
        size = f"{len(lora)} modules, {path.stat().st_size / 2**20:.0f} MiB"
        note = f"read {_fmt(read_s)} = {read_s / factored_s:.1f}× the spectra; max rel err {err:.0e}"
        rows.append(
            [
                "spectra",
                f"{label} ({size})",
                f"from the factors {_fmt(factored_s)}",
                f"dense SVD {_fmt(dense_s)}",
                f"{dense_s / factored_s:,.0f}×",
                note,
            ]
        )
        path.unlink()
    routes = {f"SD 1.5 kohya r{rank}": Config("sd15", sd15_shapes(div), rank) for rank in (8, 32, 128)}
    routes["SDXL kohya r32"] = Config("sdxl", sdxl_shapes(div), 8 if quick else 32)
    routes["7B q/k/v/o PEFT r16"] = Config("llm7b", llm7b_shapes(div), 16)
    for label, config in routes.items():
        path = write_lora(config, folder, gen)
        lora = load_lora(path)
        path.unlink()
        stacks = [(stacked([m.a for m in ms]), stacked([m.b for m in ms])) for ms in _buckets(lora)]
        gram_s, gram = timed(lambda stacks=stacks: [singular_values(a, b) for a, b in stacks], 3)
        qr_s, qr = timed(lambda stacks=stacks: [qr_singular_values(a, b) for a, b in stacks], 3)
        gap = max(
            float(((g.double() - q.double()).abs() / q.double()[..., :1]).max()) for g, q in zip(gram, qr, strict=True)
        )
        by_gram = sum(_gram_route(a, b) for a, b in stacks)
        rows.append(
            [
                "spectra route",
                f"{label} ({len(lora)} modules, float32 factors of a fp16 file)",
                f"as routed {_fmt(gram_s)}",
                f"QR (float32) {_fmt(qr_s)}",
                f"{qr_s / gram_s:.1f}×",
                f"{by_gram} of {len(stacks)} batched calls by float64 Grams, best of 3; "
                f"max |routed − QR| / σ₁ {gap:.0e}",
            ]
        )
    return rows


def neighbours(quick: bool) -> list[Row]:
    from lol_engine.similarity import cosine_to_many
    from lol_engine.spec import LayerSpec, LoraSpec
    from lol_engine.store import LoraStore
    from lol_engine.testing import random_lora

    rows = []
    rng = np.random.default_rng(0)
    sizes = (1000, 2000) if quick else (1000, 10_000, 100_000)
    with tempfile.TemporaryDirectory() as tmp, LoraStore(Path(tmp) / "knn.duckdb") as store:
        done = 0
        for n in sizes:
            x = rng.normal(size=(n, 100)).astype(np.float32)
            with store._transaction() as cur:  # bulk-load synthetic 100-d fingerprints for the n-LoRA collection
                cur.execute("DELETE FROM embeddings")
                cur.executemany(
                    "INSERT INTO embeddings VALUES (?, 'fp', 100, ?)",
                    [[f"{i:07d}", v.tolist()] for i, v in enumerate(x)],
                )
            done += n
            query = rng.normal(size=100).astype(np.float32)
            duck_s, hits = timed(lambda q=query: store.nearest("fp", q, k=10), 3)

            def brute(q: np.ndarray = query, x: np.ndarray = x) -> list[int]:
                sims = (x @ q) / (np.linalg.norm(x, axis=1) * np.linalg.norm(q))
                return list(np.argsort(-sims)[:10])

            numpy_s, top = timed(brute, 3)
            assert [int(h[0]) for h in hits] == [int(t) for t in top]
            case = f"fingerprint cosine, {n:,} LoRAs (DuckDB exact scan)"
            rows.append(
                [
                    "neighbours",
                    case,
                    f"DuckDB {_fmt(duck_s)}",
                    f"NumPy {_fmt(numpy_s)}",
                    f"{numpy_s / duck_s:.2f}×",
                    "same top-10",
                ]
            )
    spec = LoraSpec((LayerSpec("fc1", 128, 64, 4), LayerSpec("fc2", 128, 128, 4)))  # the digits zoo's layout
    gen = torch.Generator().manual_seed(0)
    for n in (1000,) if quick else (1000, 10_000):
        loras = [random_lora(spec, generator=gen, dtype=torch.float32) for _ in range(n)]
        query = random_lora(spec, generator=gen, dtype=torch.float32)
        ours_s, sims = timed(lambda loras=loras, query=query: cosine_to_many(query, loras), 2)

        def dense(loras: list = loras, query: Any = query) -> np.ndarray:
            flat = np.stack([np.concatenate([(m.scale * m.b @ m.a).numpy().ravel() for m in lora]) for lora in loras])
            q = np.concatenate([(m.scale * m.b @ m.a).numpy().ravel() for m in query])
            return (flat @ q) / (np.linalg.norm(flat, axis=1) * np.linalg.norm(q))

        dense_s, want = timed(dense, 1)
        assert np.allclose(sims, want, atol=1e-4)
        case = f"exact ΔW cosine, {n:,} digits-layout LoRAs"
        rows.append(
            [
                "neighbours",
                case,
                f"factors {_fmt(ours_s)}",
                f"dense ΔW + NumPy {_fmt(dense_s)}",
                f"{dense_s / ours_s:.1f}×",
                "same cosines (1e-4)",
            ]
        )
    return rows


def prediction_vs_evaluation(quick: bool) -> list[Row]:
    import pyarrow.parquet as pq

    from lol_engine.encoders import load_predictors

    zoo = ROOT / "data" / "zoo" / "fashion-gen"
    table = pq.read_table(zoo / "manifest.parquet").to_pylist()[: 20 if quick else 200]
    loras = [load_lora(zoo / r["path"]) for r in table]
    from lol_engine.nn.batch import LoraBatch

    predictor = load_predictors()["fashion-gen-quality"]
    single_s, _ = timed(lambda: [predictor.predict(lora) for lora in loras], 2)

    @torch.no_grad()
    def batched() -> torch.Tensor:
        batch = LoraBatch.from_loras(loras, fold_scale=predictor.fold_scale, spec=predictor.model.spec)
        return predictor.task.decode(predictor.model.eval()(batch))

    batch_s, _ = timed(batched, 3)
    eval_s = float(sum(r["t_quality_eval"] for r in table))
    note = (
        f"one at a time: {_fmt(single_s)} = {eval_s / single_s:.1f}×; evaluation recorded at build time. This toy "
        "base (a small VAE + linear judge) makes evaluation cheap: the paper's > 50,000× is 660 SD UNet passes"
    )
    return [
        [
            "LoL vs evaluation",
            f"fashion-gen quality of {len(loras)} LoRAs",
            f"LoL batched {_fmt(batch_s)}",
            f"standard evaluation {_fmt(eval_s)}",
            f"{eval_s / batch_s:,.1f}×",
            note,
        ]
    ]


def minilm_prediction_vs_evaluation(quick: bool) -> list[Row]:
    """MiniLM probe recall@10: peft attach + encode the probe per adapter, against one batched LoL forward."""
    import pyarrow.parquet as pq
    from peft import PeftModel

    from lol_engine.encoders import load_predictors
    from lol_engine.zoo.recipes.minilm_wordnet import load_minilm, probe_texts

    name = "minilm-wordnet-probe_r10"
    zoo = ROOT / "data" / "zoo" / "minilm-wordnet"
    predictors = load_predictors()
    if name not in predictors or not (zoo / "manifest.parquet").is_file():
        return [
            ["LoL vs evaluation", "MiniLM probe recall@10", "-", "-", "not run: the predictor or zoo is missing", name]
        ]
    predictor = predictors[name]
    rows = [r for r in pq.read_table(zoo / "manifest.parquet").to_pylist() if r["split"] == "test"]
    rows = rows[: 8 if quick else 64]
    paths = [str(zoo / r["path"]) for r in rows]
    tokenizer, bert = load_minilm()
    glosses, lemmas = probe_texts(toy=False)

    @torch.no_grad()
    def evaluate_all() -> list[float]:  # the standard evaluation: adapter on the real model, encode the probe
        model = PeftModel.from_pretrained(copy.deepcopy(bert), paths[0], adapter_name="a0").eval()
        recalls = []
        for i, path in enumerate(paths):
            if i:
                model.load_adapter(path, adapter_name=f"a{i}")
                model.set_adapter(f"a{i}")
                model.delete_adapter(f"a{i - 1}")
            emb = []
            for texts in (glosses, lemmas):
                for start in range(0, len(texts), 64):
                    enc = tokenizer(texts[start : start + 64], padding=True, truncation=True, return_tensors="pt")
                    hidden = model(**enc).last_hidden_state
                    mask = enc["attention_mask"].unsqueeze(-1).float()
                    emb.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1))
            e = torch.cat(emb)
            scores = e[: len(glosses)] @ e[len(glosses) :].T
            recalls.append(float(((scores > scores.diagonal()[:, None]).sum(1) < 10).float().mean()))
        return recalls

    eval_s, recalls = timed(evaluate_all, 1)
    loras = [load_lora(p) for p in paths]
    batch_s, estimates = timed(lambda: predictor.predict_and_embed_many(loras), 3)
    parse_s, _ = timed(lambda: [load_lora(p) for p in paths], 1)
    error = float(np.mean([abs(float(e.value) - r) for (e, _), r in zip(estimates, recalls, strict=True)]))
    note = (
        f"per adapter: evaluation {_fmt(eval_s / len(paths))}, LoL {_fmt(batch_s / len(paths))} "
        f"(+ reading the file {_fmt(parse_s / len(paths))}: {eval_s / (batch_s + parse_s):,.0f}× with it); "
        f"held-out adapters, mean |LoL − measured recall@10| {error:.3f}"
    )
    return [
        [
            "LoL vs evaluation",
            f"all-MiniLM-L6-v2 adapters' probe recall@10, {len(paths)} adapters",
            f"LoL batched {_fmt(batch_s)}",
            f"peft attach + encode 512 texts {_fmt(eval_s)}",
            f"{eval_s / batch_s:,.0f}×",
            note,
        ]
    ]


def _memory_bandwidth() -> float:
    a = np.ones(64 * 2**20 // 8)
    b = np.empty_like(a)
    seconds, _ = timed(lambda: np.copyto(b, a), 5)
    return a.nbytes / seconds


def ingest_throughput(quick: bool) -> list[Row]:
    from collection import mini_zoo

    from lol_engine.encoders import encoders_for, load_predictors
    from lol_engine.ingest import ingest
    from lol_engine.store import LoraStore

    n = 100 if quick else 1000
    predictors = load_predictors()
    encoders = encoders_for(predictors)
    with tempfile.TemporaryDirectory() as tmp:
        zoo = mini_zoo(Path(tmp) / "zoos", "fashion-gen", n)
        with LoraStore(Path(tmp) / "before.duckdb") as before:  # one LoRA per transaction and per forward
            start = time.perf_counter()
            ingest([str(zoo)], before, encoders, progress=False, batch=1)
            one_by_one = time.perf_counter() - start
        store = LoraStore(Path(tmp) / "ingest.duckdb")
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        report = ingest([str(zoo)], store, encoders, progress=False)
        profile.disable()
        seconds = time.perf_counter() - start
        store.close()
        size = sum(
            (ROOT / "data" / "zoo" / "fashion-gen" / "loras" / f"{i:05d}" / "adapter_model.safetensors").stat().st_size
            for i in range(n)
        )
    assert len(report.ids) == n
    stats = pstats.Stats(profile)
    parts = {
        "read + parse": "lora/parse.py",  # the largest cumulative time of a function in the file: load_lora
        "encode (fingerprint + predictors)": "encode_many",
        "of which fingerprint": "fingerprint.py",
        "store rows (the writes run in the writer thread, unprofiled)": "store.py",
    }
    shares = []
    total = stats.total_tt  # type: ignore[attr-defined]
    for label, key in parts.items():
        cum = max((v[3] for k, v in stats.stats.items() if key in f"{k[0]}:{k[1]}({k[2]})"), default=0.0)  # type: ignore[attr-defined]
        shares.append(f"{label} {cum / total:.0%}")
    shares[-1] += " (cumulative shares of the profiled time)"
    floor = size / _memory_bandwidth()
    fix = [
        "ingest",
        f"the same {n:,} LoRAs: batches of {inspect.signature(ingest).parameters['batch'].default} vs one at a time",
        f"batched {_fmt(seconds)}",
        f"one at a time {_fmt(one_by_one)}",
        f"{one_by_one / seconds:.1f}×",
        "one transaction and one multi-row insert per batch, written while the next is read; one forward per "
        "predictor per batch",
    ]
    return [
        fix,
        [
            "ingest",
            f"{n:,} fashion-gen PEFT LoRAs ({size / 2**20:.1f} MiB) with {len(predictors)} predictors",
            f"{n / seconds:.0f} LoRAs/s ({_fmt(seconds)})",
            f"floor {_fmt(floor)} (bytes / memcpy bandwidth)",
            f"{seconds / floor:,.0f}× the floor",
            "; ".join(shares),
        ],
    ]


def script(name: str, argv: list[str]) -> list[Row]:
    """The rows of ``benchmarks/<name>``'s ``main(argv)`` (each script also runs on its own, with more options)."""
    import runpy

    return list(runpy.run_path(str(HERE / name))["main"](argv))


def app_latency(quick: bool) -> list[Row]:
    from conftest import make_collection
    from gradio_client import Client, handle_file

    from app.ui import build_demo
    from app.uploads import UploadLedger
    from app.web import launch_options, max_upload_bytes

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        explorer = make_collection(Path(tmp))
        ledger = UploadLedger()  # the clients upload one file: Gradio keeps it at one path until all are done
        demo = build_demo(explorer, ledger=ledger)
        demo.queue(default_concurrency_limit=8)
        demo.launch(
            server_name="127.0.0.1",
            prevent_thread_lock=True,
            quiet=True,
            ssr_mode=False,
            **launch_options(max_upload_bytes(), ledger),
        )
        file = ROOT / "data" / "zoo" / "digits" / "loras" / "00011" / "adapter_model.safetensors"
        try:
            baseline = None
            for clients in (1, 4, 16):
                per_client = 3 if quick else 10
                latencies: list[float] = []
                lock = threading.Lock()

                def run(latencies: list[float] = latencies, per_client: int = per_client, lock: Any = lock) -> None:
                    client = Client(demo.local_url, verbose=False)
                    try:
                        for _ in range(per_client):
                            start = time.perf_counter()
                            client.predict([handle_file(str(file))], "", api_name="/analyse")
                            with lock:
                                latencies.append(time.perf_counter() - start)
                    finally:
                        client.close()

                threads = [threading.Thread(target=run) for _ in range(clients)]
                start = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - start
                p50 = statistics.median(latencies)
                p95 = sorted(latencies)[max(0, round(0.95 * len(latencies)) - 1)]
                baseline = baseline or p50
                rows.append(
                    [
                        "app",
                        f"upload → prediction, {clients} concurrent client(s), small LoRA",
                        f"p50 {_fmt(p50)}",
                        f"p95 {_fmt(p95)}",
                        f"{p50 / baseline:.1f}× the 1-client p50",
                        f"{len(latencies) / wall:.1f} requests/s",
                    ]
                )
        finally:
            demo.close()
            explorer.close()
    return rows


SECTIONS: dict[str, Callable[[bool], list[Row]]] = {
    "neighbours": neighbours,
    "LoL vs evaluation": lambda quick: prediction_vs_evaluation(quick) + minilm_prediction_vs_evaluation(quick),
    "ingest": ingest_throughput,
    # per-file speed against the revision before issue 15 (SDXL r32 upload p50/p95, small-LoRA ingest, peak memory)
    "speed": lambda quick: script("bench_speed.py", ["--quick"] if quick else ["--repeats", "5"]),
    # Ray Data ingest with 1 and 2 workers vs one process; per-file cost by format (docs/SCALING.md's inputs)
    "ray": lambda quick: script(
        "bench_ray_ingest.py", ["--quick"] if quick else ["--zoo", "500", "--generated", "2000"]
    ),
    # the neighbour index: HNSW vs exact at 100k embeddings, and 100k generated LoRAs' neighbours with ΔW re-rank
    "ann": lambda quick: script("bench_ann.py", ["--quick"] if quick else []),
    # maps: a sample fitted and the rest placed vs one fit; the map page at 100k and 1M LoRAs
    "maps": lambda quick: script("bench_maps_scale.py", ["--quick"] if quick else []),
    "app": app_latency,
}


def kept_sections(out: Path) -> str:
    """The sections other scripts keep in ``out`` (a ``## `` heading, then ``<!-- name:begin -->`` … ``<!-- name:end
    -->``, e.g. ``bench_map_render.py --write``'s): a rerun of this suite rewrites its own table and keeps them."""
    if not out.is_file():
        return ""
    found = re.findall(r"(## [^\n]*\n\n<!-- ([\w-]+):begin -->.*?<!-- \2:end -->\n)", out.read_text(), flags=re.S)
    return "".join("\n" + section for section, _ in found)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; nothing written")
    parser.add_argument("--only", default=None, help="comma-separated sections (spectra," + ",".join(SECTIONS) + ")")
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    wanted = set(args.only.split(",")) if args.only else None
    rows: list[Row] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if wanted is None or "spectra" in wanted:
            rows += spectra(Path(tmp), args.quick)
            console.print("done: spectra")
    for name, section in SECTIONS.items():
        if wanted is None or name in wanted:
            began = time.perf_counter()
            rows += section(args.quick)
            console.print(f"done: {name} in {time.perf_counter() - began:.0f} s")
    total = time.perf_counter() - start
    columns = ["benchmark", "case", "ours", "alternative", "ratio", "notes"]
    table = Table(title=f"lol-explorer benchmarks ({os.cpu_count()} CPUs, torch {torch.__version__}, {total:.0f} s)")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if not args.quick and wanted is None:
        lines = [
            "# Benchmarks (generated by `make bench` = `python benchmarks/run_all.py`)",
            "",
            f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; the whole run "
            f"took {total:.0f} s. Every ratio compares two ways of doing the same thing in this run.",
            "",
            "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns),
            *["| " + " | ".join(row) + " |" for row in rows],
            "",
            "Deeper, one topic each: near-duplicate detection's precision and recall in "
            "[DUPLICATES_BENCH.md](DUPLICATES_BENCH.md) (`python benchmarks/bench_duplicates.py --write`), "
            "the app in [APP_BENCH.md](APP_BENCH.md), hostile inputs in [HOSTILE_BENCH.md](HOSTILE_BENCH.md).",
            "",
        ]
        Path(args.out).write_text("\n".join(lines) + kept_sections(Path(args.out)))
        console.print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
