"""Near-duplicate detection (:mod:`lol_engine.relations`): precision and recall on generated variants, and its cost.

A collection of base LoRAs of one base (the 12 modules of SD 1.5's first UNet transformer block, kohya's targets,
ranks 8–32; half with Gaussian factors, half with decaying spectra under a GL(r) mixing, all sharing a common rank-4
component so that unrelated LoRAs have ΔW cosines around 0.2, as LoRAs of one base do) is stored in fp16. Queries,
never stored, are variants of them, each with the relation it truly has:

* convert — a GL(r) re-factorisation (condition number 10) re-saved in fp16 or bf16, or α ↔ B traded in f32: *same*;
* rescale — α changed (×0.25 … ×4), fp16: *rescale* by c;
* resize — per-module SVD truncation to r/2 or r/4, or kohya's dynamic ``sv_fro`` (each module keeps the fewest
  singular values holding 90 % of its Frobenius energy), √σ into both factors, fp16: *truncation*;
* merge — 2 or 3 stored LoRAs with random weights as concatenated factors, fp16: *merge* with those weights;
* none — an unrelated LoRA of the same base, a stored LoRA moved by 5 % of an unrelated ΔW (a continued training),
  and a merge of a stored LoRA with one that is not stored.

Each query goes the explorer's way: exact ΔW cosine against the whole collection, top-``k``, then
:func:`lol_engine.relations.relate` on those ``k``; the query's answer is the first relation in neighbour order. It is
right when the kind and the LoRAs it names are right. Also timed against the collection size (fillers added).

    python benchmarks/bench_duplicates.py                # ~10 min on 2 busy cores; prints the tables
    python benchmarks/bench_duplicates.py --write        # and writes docs/DUPLICATES_BENCH.md
    python benchmarks/bench_duplicates.py --tiny         # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lol_engine.lora.weights import LoraModule, LoraWeights
from lol_engine.relations import Relation, relate
from lol_engine.similarity import cosine_to_many
from lol_engine.spec import LayerSpec
from lol_engine.symmetry import act_gl, delta_fro_norm, random_gl, random_gl_like

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("same", "rescale", "truncation", "merge", "none")
COMMAND = "python benchmarks/bench_duplicates.py --write"
SETTINGS = (  # (title, weight of the shared component): unrelated bases have ΔW cosine w² / (1 + w²)
    ("Setting 1: unrelated LoRAs at ΔW cosine ≈ 0.2", 0.5),
    ("Setting 2, crowded: unrelated LoRAs at ΔW cosine ≈ 0.7", 1.5),
)


def block_shapes(width: int = 320, ctx: int = 768) -> list[tuple[str, int, int]]:
    """SD 1.5's first UNet transformer block as kohya targets it: (name, d_out, d_in)."""
    tb = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0"
    out = [("proj_in", width, width), ("proj_out", width, width)]
    for attn in ("attn1", "attn2"):
        kv = width if attn == "attn1" else ctx
        out += [(f"{tb}_{attn}_to_{p}", width, d) for p, d in (("q", width), ("k", kv), ("v", kv), ("out_0", width))]
    return [*out, (f"{tb}_ff_net_0_proj", 8 * width, width), (f"{tb}_ff_net_2", width, 4 * width)]


@dataclass(frozen=True)
class Query:
    variant: str  # how it was made
    kind: str  # the relation it truly has ("none": none)
    sources: tuple[int, ...]  # indices of the stored LoRAs it derives from
    value: tuple[float, ...] = ()  # c, the merge weights, or the energy kept
    lora: LoraWeights | None = None


def _svd(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U, σ, Vᵀ`` of the module's ΔW from a QR of each factor (the generator's own SVD, float64)."""
    q_b, r_b = torch.linalg.qr(m.b.double())
    q_a, r_a = torch.linalg.qr(m.a.double().mT)
    u, s, vh = torch.linalg.svd(m.scale * r_b @ r_a.mT)
    return q_b @ u, s, vh @ q_a.mT


def make_base(
    shapes: list[tuple[str, int, int]], common: LoraWeights, gen: torch.Generator, shared: float = 0.5
) -> LoraWeights:
    """Own factors of rank 8–32 (Gaussian, or σ_j ∝ 0.8^j GL-mixed) plus ``shared`` × the common rank-4 component.

    Both parts have norm ``(d_out d_in)^¼`` per module, so two bases have ΔW cosine ``shared² / (1 + shared²)``.
    """
    rank = int(torch.randint(1, 5, (1,), generator=gen)) * 8 - 4
    decaying = bool(torch.rand((), generator=gen) < 0.5)
    modules = []
    for (name, d_out, d_in), part in zip(shapes, common, strict=True):
        if decaying:
            u = torch.linalg.qr(torch.randn(d_out, rank, generator=gen, dtype=torch.float64))[0]
            v = torch.linalg.qr(torch.randn(d_in, rank, generator=gen, dtype=torch.float64))[0]
            g = random_gl(rank, generator=gen, cond_max=10.0)
            sigma = 0.8 ** torch.arange(rank, dtype=torch.float64) * 2.5
            a, b = g @ v.mT, (u * sigma) @ torch.linalg.inv(g)
        else:
            a = torch.randn(rank, d_in, generator=gen, dtype=torch.float64) / d_in**0.5
            b = torch.randn(d_out, rank, generator=gen, dtype=torch.float64) / rank**0.5
        b = b / delta_fro_norm(a, b) * (d_out * d_in) ** 0.25  # ‖own ΔW‖ = (d_out d_in)^¼ in every module
        shared_b = shared * part.b / delta_fro_norm(part.a, part.b) * (d_out * d_in) ** 0.25
        a, b = torch.cat([a, part.a]), torch.cat([b, shared_b], dim=1)
        modules.append(LoraModule(LayerSpec(name, d_out, d_in, rank + 4), a, b, scale=1.0, alpha=float(rank + 4)))
    return LoraWeights(tuple(modules))


def truncate(lora: LoraWeights, keep: list[int]) -> tuple[LoraWeights, float]:
    """Per-module SVD truncation (√σ into both factors, as kohya's resize) and the share of energy kept."""
    modules, kept, total = [], 0.0, 0.0
    for m, k in zip(lora, keep, strict=True):
        u, s, vh = _svd(m)
        kept, total = kept + float(s[:k].square().sum()), total + float(s.square().sum())
        root = s[:k].sqrt()
        modules.append(LoraModule(replace(m.spec, rank=k), root[:, None] * vh[:k], u[:, :k] * root, 1.0, float(k)))
    return LoraWeights(tuple(modules)), kept / total


def sv_fro_ranks(lora: LoraWeights, target: float = 0.9) -> list[int]:
    """kohya's dynamic ``sv_fro``: per module, the fewest singular values whose energy reaches ``target``."""
    ranks = []
    for m in lora:
        s2 = _svd(m)[1].square()
        ranks.append(int(torch.searchsorted(s2.cumsum(0) / s2.sum(), target)) + 1)
    return ranks


def merge(weights: list[float], loras: list[LoraWeights]) -> LoraWeights:
    """``Σ w_j ΔW_j`` as concatenated factors."""
    modules = []
    for ms in zip(*loras, strict=True):
        a = torch.cat([m.a for m in ms])
        b = torch.cat([w * m.scale * m.b for w, m in zip(weights, ms, strict=True)], dim=1)
        modules.append(LoraModule(replace(ms[0].spec, rank=a.shape[0]), a, b, 1.0))
    return LoraWeights(tuple(modules))


def variants(bases: list[LoraWeights], fresh: list[LoraWeights], per_kind: int, gen: torch.Generator) -> list[Query]:
    """``per_kind`` queries of each variant; stored bases are ``bases`` (float64 originals)."""
    n = len(bases)
    out: list[Query] = []
    for i in range(per_kind):
        x = i % n
        src = bases[x]
        half = torch.float16
        mixed = act_gl(src, random_gl_like(src, generator=gen, cond_max=10.0))
        out.append(Query("convert: GL + fp16", "same", (x,), lora=mixed.to(half)))
        out.append(Query("convert: GL + bf16", "same", (x,), lora=mixed.to(torch.bfloat16)))
        trade = float(torch.empty(()).uniform_(0.2, 5.0, generator=gen))
        traded = src.map_modules(lambda m, t=trade: replace(m, b=m.b / t, scale=m.scale * t))
        out.append(Query("convert: α ↔ B, f32", "same", (x,), lora=traded.to(torch.float32)))
        c = float(2 ** torch.empty(()).uniform_(-2, 2, generator=gen))
        c = c if abs(c - 1) > 0.05 else 1.5
        scaled = src.map_modules(lambda m, c=c: replace(m, scale=m.scale * c))
        out.append(Query("rescale: α × c", "rescale", (x,), (c,), scaled.to(half)))
        ranks = [m.spec.rank // (2 if i % 2 else 4) for m in src]
        cut, energy = truncate(src, ranks)
        out.append(Query("resize: r/2 or r/4", "truncation", (x,), (energy,), cut.to(half)))
        cut, energy = truncate(src, sv_fro_ranks(src))
        out.append(Query("resize: dynamic sv_fro 0.9", "truncation", (x,), (energy,), cut.to(half)))
        for terms in (2, 3):
            picked = [int(j) for j in torch.randperm(n, generator=gen)[:terms]]
            w = torch.distributions.Dirichlet(torch.full((terms,), 3.0)).sample().tolist()
            w = [0.15 + (1 - 0.15 * terms) * v for v in w]  # every weight ≥ 0.15
            merged = merge(w, [bases[j] for j in picked])
            out.append(Query(f"merge: {terms} terms", "merge", tuple(picked), tuple(w), merged.to(half)))
        stranger = fresh[i % len(fresh)]
        out.append(Query("none: unrelated, same base", "none", (), lora=stranger.to(half)))
        moved = merge([1.0, 0.05 * _norm(src) / _norm(stranger)], [src, stranger])
        out.append(Query("none: X + 5 % retraining", "none", (), lora=moved.to(half)))
        outsider = merge([0.6, 0.4], [src, stranger])
        out.append(Query("none: merge with an unstored LoRA", "none", (), lora=outsider.to(half)))
    return out


def _norm(lora: LoraWeights) -> float:
    from lol_engine.relations import delta_gram

    return float(np.sqrt(delta_gram([lora])[0, 0]))


def answer(query: LoraWeights, stored: list[LoraWeights], k: int) -> tuple[Relation | None, float, float]:
    """The explorer's route: ΔW cosine over all, relate on the top k. Returns (first relation, cosine s, relate s)."""
    start = time.perf_counter()
    sims = cosine_to_many(query, stored)
    top = [int(i) for i in np.argsort(-np.nan_to_num(sims, nan=-2.0), kind="stable")[:k]]
    middle = time.perf_counter()
    relations = relate(query, [stored[i] for i in top], [str(i) for i in top])
    done = time.perf_counter()
    return next((r for r in relations if r is not None), None), middle - start, done - middle


def judge(q: Query, found: Relation | None) -> tuple[str, bool, float | None]:
    """(predicted kind, right kind and right LoRAs, parameter error)."""
    kind = found.kind if found else "none"
    if found is None or kind != q.kind:
        return kind, found is None and q.kind == "none", None
    named = tuple(int(i) for i in found.others)
    if sorted(named) != sorted(q.sources):
        return kind, False, None
    if kind == "rescale":
        return kind, True, abs(found.weights[0] - q.value[0]) / abs(q.value[0])
    if kind == "truncation":
        return kind, True, abs((found.energy or 0.0) - q.value[0])
    if kind == "merge":
        want = dict(zip(q.sources, q.value, strict=True))
        return kind, True, max(abs(w - want[i]) for i, w in zip(named, found.weights, strict=True))
    return kind, True, None


def accuracy(queries: list[Query], stored: list[LoraWeights], k: int) -> tuple[list[str], dict[str, float]]:
    """Markdown lines: per-variant results, precision/recall per kind, the confusion matrix; and timings."""
    rows: dict[str, list[tuple[str, bool, float | None]]] = {}
    predicted: Counter[str] = Counter()
    right: Counter[str] = Counter()
    truth: Counter[str] = Counter()
    confusion: Counter[tuple[str, str]] = Counter()
    cos_s, rel_s = [], []
    for done, q in enumerate(queries):
        assert q.lora is not None
        found, c_s, r_s = answer(q.lora, stored, k)
        if done % 20 == 19:
            print(f"{done + 1} of {len(queries)} queries", file=sys.stderr)
        cos_s.append(c_s)
        rel_s.append(r_s)
        kind, ok, err = judge(q, found)
        rows.setdefault(q.variant, []).append((kind, ok, err))
        truth[q.kind] += 1
        predicted[kind] += 1
        right[kind] += ok
        confusion[(q.kind, kind if kind != q.kind or ok or kind == "none" else f"{kind} (wrong LoRAs)")] += 1
    lines = ["| variant | truth | n | right | answered as | worst parameter error |", "|---|---|---:|---:|---|---:|"]
    for q_variant, results in rows.items():
        true_kind = next(q.kind for q in queries if q.variant == q_variant)
        errors = [e for _, ok, e in results if ok and e is not None]
        worst = f"{max(errors):.1e}" if errors else ""
        answered = ", ".join(f"{kind} {n}" for kind, n in Counter(kind for kind, _, _ in results).most_common())
        n_ok = sum(ok for _, ok, _ in results)
        lines.append(f"| {q_variant} | {true_kind} | {len(results)} | {n_ok} | {answered} | {worst} |")
    lines += ["", "| relation | true | predicted | right | precision | recall |", "|---|---:|---:|---:|---:|---:|"]
    for kind in KINDS:
        precision = right[kind] / predicted[kind] if predicted[kind] else float("nan")
        recall = right[kind] / truth[kind] if truth[kind] else float("nan")
        lines.append(
            f"| {kind} | {truth[kind]} | {predicted[kind]} | {right[kind]} | {precision:.3f} | {recall:.3f} |"
        )
    answers = sorted({p for _, p in confusion}, key=lambda p: (KINDS.index(p.split()[0]), p))
    lines += ["", "Confusion (rows: truth, columns: answer):", ""]
    lines += ["| truth \\ answer | " + " | ".join(answers) + " |", "|---|" + "---:|" * len(answers)]
    for kind in KINDS:
        lines.append(f"| {kind} | " + " | ".join(str(confusion[(kind, a)]) for a in answers) + " |")
    timing = {"cosine": statistics.median(cos_s), "relate": statistics.median(rel_s), "relate_max": max(rel_s)}
    return lines, timing


def scaling(
    queries: list[Query], stored: list[LoraWeights], sizes: list[int], k: int, gen: torch.Generator
) -> list[str]:
    """Median time per query of the cosine pass and of relate as fillers (rank-8 LoRAs) grow the collection."""
    shapes = [(m.name, m.spec.d_out, m.spec.d_in) for m in stored[0]]
    lines = ["| stored LoRAs | ΔW cosine over all (median) | relate on the top k (median) | relate (max) |"]
    lines.append("|---:|---:|---:|---:|")
    fillers: list[LoraWeights] = []
    for size in sizes:
        while len(stored) + len(fillers) < size:
            modules = [
                LoraModule(
                    LayerSpec(n, d_out, d_in, 8),
                    torch.randn(8, d_in, generator=gen).half(),
                    torch.randn(d_out, 8, generator=gen).half(),
                    1.0,
                )
                for n, d_out, d_in in shapes
            ]
            fillers.append(LoraWeights(tuple(modules)))
        collection = stored + fillers
        times = [answer(q.lora, collection, k)[1:] for q in queries if q.lora is not None]
        cos = statistics.median(t[0] for t in times)
        rel = [t[1] for t in times]
        lines.append(
            f"| {len(collection):,} | {cos * 1000:.1f} ms | {statistics.median(rel) * 1000:.1f} ms | "
            f"{max(rel) * 1000:.1f} ms |"
        )
    return lines


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", type=int, default=40, help="stored base LoRAs")
    parser.add_argument("--per-kind", type=int, default=10, help="queries per variant")
    parser.add_argument("--k", type=int, default=10, help="neighbours examined (the explorer's default)")
    parser.add_argument("--sizes", default="40,400,1000", help="collection sizes for the timing table")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (narrow modules)")
    parser.add_argument("--write", nargs="?", const=str(ROOT / "docs" / "DUPLICATES_BENCH.md"), default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.bases, args.per_kind, args.sizes = 6, 1, "6,12"
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # torch.distributions draws the merge weights from the global generator
    shapes = block_shapes(32, 48) if args.tiny else block_shapes()
    common = LoraWeights(
        tuple(
            LoraModule(
                LayerSpec(n, o, i, 4),
                torch.randn(4, i, generator=gen, dtype=torch.float64) / i**0.5,
                torch.randn(o, 4, generator=gen, dtype=torch.float64) / 2.0,
                1.0,
            )
            for n, o, i in shapes
        )
    )
    start, load = time.perf_counter(), os.getloadavg()[0]
    sections, timing_lines, n_queries = [], [], 0
    for title, shared in SETTINGS:
        bases = [make_base(shapes, common, gen, shared) for _ in range(args.bases)]
        fresh = [make_base(shapes, common, gen, shared) for _ in range(args.per_kind)]
        stored = [b.to(torch.float16) for b in bases]  # the collection keeps fp16 files
        queries = variants(bases, fresh, args.per_kind, gen)
        n_queries = len(queries)
        lines, timing = accuracy(queries, stored, args.k)
        sections += [f"## {title}", "", *lines, ""]
        sections.append(
            f"Time per query with {args.bases} stored: ΔW cosine over all {timing['cosine'] * 1000:.1f} ms (median), "
            f"`relate` on the top {args.k} {timing['relate'] * 1000:.1f} ms (median, max "
            f"{timing['relate_max'] * 1000:.1f} ms)."
        )
        sections.append("")
        if not timing_lines:
            sizes = [int(s) for s in args.sizes.split(",")]
            timing_lines = scaling(
                queries[: n_queries // args.per_kind], stored, sizes, args.k, gen
            )  # one per variant
    total = time.perf_counter() - start
    doc = [
        "# Near-duplicate detection (generated by `benchmarks/bench_duplicates.py`)",
        "",
        f"Command: `{COMMAND}`; {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{total:.0f} s; load average {load:.1f} at the start (times are noisy when other jobs share the CPUs). "
        f"{args.bases} stored LoRAs (fp16) of one base: the 12 kohya modules of SD 1.5's first UNet "
        "transformer block (widths 320–2560), ranks 8–32 plus a rank-4 component all share; half with Gaussian "
        "factors, half with decaying spectra under a GL mixing. "
        f"{n_queries} queries (never stored) per setting, {args.per_kind} per variant; each is answered the "
        f"explorer's way (ΔW cosine over the collection, `relate` on the top {args.k}, first relation in neighbour "
        "order) and is right when its kind and the LoRAs it names are right. Parameter error: |ĉ − c|/|c| for "
        "rescales, |energy − truth| for truncations (truth: the generator's SVD), max |ŵ − w| for merges.",
        "",
        *sections,
        "Limits: a relation is found only when its sources are among the top k by ΔW cosine. In a development run "
        "of this script whose bases were not normalised per module (unrelated LoRAs at cosine 0.7–0.9, the shared "
        'part dominating), 12 of 20 three-term merges and 2 of 20 resizes to r/4 were answered "none" because a '
        "source ranked about 20th; none was answered with a wrong relation. A resize that also changes α, and merges "
        "re-factorised to a lower rank (kohya's svd_merge), are not modelled (not measured here).",
        "",
        "## Cost against the collection's size",
        "",
        "The first setting's queries (one per variant) as rank-8 fp16 fillers of the same base grow the collection: "
        f"only the cosine pass grows; `relate` looks at the top {args.k} whatever the size.",
        "",
        *timing_lines,
        "",
    ]
    text = "\n".join(doc)
    print(text)
    if args.write:
        Path(args.write).write_text(text)
        print(f"wrote {args.write}", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
