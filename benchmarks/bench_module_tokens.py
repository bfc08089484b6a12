"""``module_tokens`` against ``spectral_glnet`` and GL-net, on the shipped zoos and on a mixed-layout copy of them.

    python benchmarks/bench_module_tokens.py                       # 3 seeds, 10 epochs (~2 min on one core)
    python benchmarks/bench_module_tokens.py --results docs/RESULTS.md   # also write its section there
    python benchmarks/bench_module_tokens.py --tiny                # a smoke run

1. **Same data.** Every model on the same zoo split (test split, mean ± std over seeds), beside the mean / majority
   and ridge / logistic regression on the GL-invariant fingerprint (fit on train + val).
2. **Mixed layouts.** The same zoo, each LoRA given (from a seed) one of the module subsets {all, all but one, one}
   and, for half of them, re-factored exactly at rank 8 (SVD of ΔW, zero-padded, α = 8: the same ΔW, other factors).
   ``module_tokens`` trains one predictor on all of them. A fixed-layout model can only learn from the most common
   layout (what collection training gives it; ranks padded to one so that its batches stack) and predicts only test
   LoRAs of that layout: its coverage is reported beside the metric, and ``module_tokens`` is scored on the same
   LoRAs as well as on all of them.
"""

from __future__ import annotations

import argparse
import platform
import re
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from lol_engine.fingerprint import fingerprint
from lol_engine.lora.weights import LoraModule, LoraWeights
from lol_engine.nn import ModelConfig
from lol_engine.train import TrainConfig, evaluate, load_zoo, train_on_zoo
from lol_engine.train.collection import CollectionData, baselines
from lol_engine.train.loop import LoadedZoo, Split
from lol_engine.train.tasks import infer_task

ROOT = Path(__file__).resolve().parent.parent
TASKS = [("digits", "acc_own", "r2"), ("fashion-gen", "quality", "r2"), ("fashion-gen", "class", "accuracy")]
MIXED_TASKS = [("digits", "acc_own", "r2"), ("fashion-gen", "quality", "r2")]
MODELS = ("module_tokens", "spectral_glnet", "gl_net")
BEGIN, END = "<!-- bench_module_tokens: begin -->", "<!-- bench_module_tokens: end -->"


def fmt(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def refactor(module: LoraModule, rank: int) -> LoraModule:
    """The same ΔW at ``rank``: ``B = U√S``, ``A = √S Vᵀ`` of its SVD, zero-padded, scale 1 (α = rank)."""
    delta = module.delta_weight().to(torch.float64)  # (d_out, d_in)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(module.spec.rank, rank, len(s))
    a = torch.zeros(rank, module.spec.d_in, dtype=torch.float64)
    b = torch.zeros(module.spec.d_out, rank, dtype=torch.float64)
    a[:r], b[:, :r] = s[:r].sqrt()[:, None] * vh[:r], u[:, :r] * s[:r].sqrt()
    spec = replace(module.spec, rank=rank)
    return replace(module, spec=spec, a=a.to(module.a.dtype), b=b.to(module.b.dtype), scale=1.0, alpha=float(rank))


def pad_rank(lora: LoraWeights, rank: int) -> LoraWeights:
    """Zero rows of A and zero columns of B up to ``rank``: the same ΔW."""

    def pad(m: LoraModule) -> LoraModule:
        extra = rank - m.spec.rank
        a = torch.cat([m.a, m.a.new_zeros(extra, m.spec.d_in)])
        b = torch.cat([m.b, m.b.new_zeros(m.spec.d_out, extra)], dim=1)
        return replace(m, spec=replace(m.spec, rank=rank), a=a, b=b)

    return lora.map_modules(pad)


def mixed(zoo: LoadedZoo, seed: int) -> LoadedZoo:
    """Each LoRA keeps all its modules, all but one, or one (a third each), and half are re-factored at rank 8."""
    rng = np.random.default_rng(seed)
    loras = []
    for lora in zoo.loras:
        names = list(lora.spec.names)
        size = [len(names), len(names) - 1, 1][int(rng.integers(3))]
        keep = set(rng.choice(names, size=max(size, 1), replace=False).tolist())
        modules = tuple(m for m in lora if m.name in keep)
        if rng.random() < 0.5:
            modules = tuple(refactor(m, 8) for m in modules)
        loras.append(LoraWeights(modules, lora.meta))
    return LoadedZoo(zoo.path, zoo.rows, loras)


def common_layout(zoo: LoadedZoo) -> LoadedZoo:
    """The LoRAs of the most common module layout, ranks padded to the largest among them (a fixed-layout model's
    training data in a collection of mixed layouts)."""
    layouts = [lora.spec.names for lora in zoo.loras]
    common, _ = Counter(layouts).most_common(1)[0]
    keep = [i for i, layout in enumerate(layouts) if layout == common]
    rank = max(max(zoo.loras[i].spec.ranks) for i in keep)
    return LoadedZoo(zoo.path, [zoo.rows[i] for i in keep], [pad_rank(zoo.loras[i], rank) for i in keep])


def fingerprint_baselines(zoo: LoadedZoo, label: str) -> dict[str, float]:
    """Mean / majority and ridge / logistic on the fingerprint, fit on train + val, scored on test."""
    task = infer_task(zoo.rows, label, zoo.split("train"))
    data = CollectionData(zoo, [str(i) for i in range(len(zoo.rows))], "the zoo's split")
    prints = np.stack([fingerprint(lora).numpy() for lora in zoo.loras])
    return baselines(data, task, prints)


def same_data(zoos: dict[str, LoadedZoo], args: argparse.Namespace) -> list[str]:
    lines = [
        "| zoo · label (metric) | " + " | ".join(MODELS) + " | mean / majority | ridge / logistic on fingerprint |"
    ]
    lines.append("|---|" + "---|" * (len(MODELS) + 2))
    for zoo_name, label, metric in TASKS:
        zoo = zoos[zoo_name]
        cells = []
        for model in MODELS:
            runs = [
                train_on_zoo(zoo, label, model, ModelConfig(), TrainConfig(epochs=args.epochs, seed=s))
                for s in range(args.seeds)
            ]
            values = [r[2]["test"][metric] for r in runs]
            cells.append(fmt(values))
            print(f"{zoo_name}/{label}/{model}: {fmt(values)}", flush=True)
        base = list(fingerprint_baselines(zoo, label).values())
        lines.append(
            f"| {zoo_name} · `{label}` ({metric}) | " + " | ".join(cells) + f" | {base[0]:.3f} | {base[-1]:.3f} |"
        )
    return lines


def mixed_layouts(zoos: dict[str, LoadedZoo], args: argparse.Namespace) -> list[str]:
    head = "| zoo · label (metric) | LoRAs of the common layout | module_tokens, all test LoRAs | module_tokens, "
    head += "common-layout test LoRAs | " + " | ".join(f"{m}, common-layout test LoRAs" for m in MODELS[1:])
    lines = [head + " | ridge on fingerprint, all test LoRAs |", "|---|" + "---|" * (len(MODELS) + 3)]
    for zoo_name, label, metric in MIXED_TASKS:
        zoo = mixed(zoos[zoo_name], seed=0)
        fixed = common_layout(zoo)
        common = set(fixed.loras[0].spec.names)
        test = zoo.split("test")
        in_common = np.array([i for i in test if set(zoo.loras[i].spec.names) == common])
        everything, covered = [], []
        for s in range(args.seeds):
            model, task, result = train_on_zoo(
                zoo, label, "module_tokens", config=TrainConfig(epochs=args.epochs, seed=s)
            )
            everything.append(result["test"][metric])
            subset = Split.make(zoo, in_common, task, True, module_sets=True)
            covered.append(evaluate(model, task, subset)[metric])
        cells = [
            f"{len(fixed.rows)} of {len(zoo.rows)}; {len(in_common)} of {len(test)} test",
            fmt(everything),
            fmt(covered),
        ]
        print(
            f"mixed {zoo_name}/{label}/module_tokens: all {fmt(everything)}, common layout {fmt(covered)}", flush=True
        )
        for name in MODELS[1:]:
            values = [
                train_on_zoo(fixed, label, name, config=TrainConfig(epochs=args.epochs, seed=s))[2]["test"][metric]
                for s in range(args.seeds)
            ]
            cells.append(fmt(values))
            print(f"mixed {zoo_name}/{label}/{name}: {fmt(values)}", flush=True)
        ridge = list(fingerprint_baselines(zoo, label).values())[-1]
        lines.append(f"| {zoo_name} · `{label}` ({metric}) | " + " | ".join(cells) + f" | {ridge:.3f} |")
    return lines


def write_section(path: Path, lines: list[str]) -> None:
    """Replace this benchmark's section of ``path`` (between its markers), or append it."""
    section = "\n".join([BEGIN, *lines, END])
    text = path.read_text() if path.exists() else ""
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--n", type=int, default=None, help="use the first N LoRAs of each zoo (default all)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: 1 seed, 1 epoch, 120 LoRAs per zoo")
    parser.add_argument("--results", type=Path, default=None, help="write this benchmark's section into this file")
    args = parser.parse_args(argv)
    if args.tiny:
        args.seeds, args.epochs, args.n = 1, 1, 120
    start = time.perf_counter()
    zoos = {}
    for name in ("digits", "fashion-gen"):
        zoo = load_zoo(ROOT / "data" / "zoo" / name)
        n = args.n or len(zoo.rows)
        zoos[name] = LoadedZoo(zoo.path, zoo.rows[:n], zoo.loras[:n])
    mixed_table = mixed_layouts(zoos, args)
    table = same_data(zoos, args)
    minutes = (time.perf_counter() - start) / 60
    lines = [
        "## module_tokens against spectral_glnet and GL-net",
        "",
        f"Generated by `python benchmarks/bench_module_tokens.py` ({args.seeds} seeds, {args.epochs} epochs, "
        f"{'first ' + str(args.n) if args.n else 'all'} LoRAs of each zoo; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}; {minutes:.1f} min). Test split, "
        "mean ± std over seeds; the epoch is chosen on the validation split; default `ModelConfig`.",
        "",
        "### The same LoRAs, one module layout",
        "",
        *table,
        "",
        "### Mixed module layouts and ranks (one predictor for all of them)",
        "",
        "Each LoRA keeps all its modules, all but one, or one (a third each, seed 0); half are re-factored exactly at "
        "rank 8. `module_tokens` learns from all of them; the fixed-layout models learn from the most common layout "
        "only (ranks padded) and can predict only its test LoRAs.",
        "",
        *mixed_table,
        "",
    ]
    print("\n".join(lines))
    if args.results is not None:
        write_section(args.results, lines)
    return lines


if __name__ == "__main__":
    main()
