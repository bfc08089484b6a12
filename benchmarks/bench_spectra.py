"""Per-module singular values of ΔW from the factors (``singular_values``: float64 Grams or QR) against dense-ΔW SVD,
and against just reading the file.

Side by side in one run, on LoRAs with the real module shapes of SD 1.5 (kohya's default UNet + text-encoder targets,
264 modules, ranks 4 / 32 / 128) and of a 7B-class LLM (q/k/v/o of 32 layers at width 4096, rank 16).

    python benchmarks/bench_spectra.py            # the full table (a few minutes on 2 cores)
    python benchmarks/bench_spectra.py --tiny     # a seconds-long smoke run with small widths

Dense SVD of a 4096 × 4096 ΔW takes seconds, so by default the dense route is timed on ``--dense-per-shape`` modules
of each distinct shape and scaled by the module count of that shape (``--dense-per-shape 0`` times every module).
Reported ratios are what matters: absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from lol_engine import load_lora
from lol_engine.symmetry import lora_singular_values, singular_values


@dataclass(frozen=True)
class Config:
    name: str
    shapes: list[tuple[str, int, int]]  # (kohya stem, d_out, d_in)
    rank: int


def sd15_shapes(width_div: int = 1) -> list[tuple[str, int, int]]:
    """kohya's default SD 1.5 targets: 16 transformer blocks × 12 linear-like modules + 12 CLIP layers × 6."""
    blocks = [("down_blocks", i, j, c) for i, c in enumerate((320, 640, 1280)) for j in range(2)]
    blocks += [("mid_block", None, 0, 1280)]
    blocks += [("up_blocks", i, j, c) for i, c in ((1, 1280), (2, 640), (3, 320)) for j in range(3)]
    out = []
    for part, i, j, c in blocks:
        c //= width_div
        ctx = 768 // width_div
        base = f"lora_unet_{part}_{i}_attentions_{j}" if i is not None else f"lora_unet_{part}_attentions_{j}"
        tb = f"{base}_transformer_blocks_0"
        out += [(f"{base}_proj_in", c, c), (f"{base}_proj_out", c, c)]
        for attn in ("attn1", "attn2"):
            d_kv = c if attn == "attn1" else ctx
            out += [(f"{tb}_{attn}_to_q", c, c), (f"{tb}_{attn}_to_k", c, d_kv), (f"{tb}_{attn}_to_v", c, d_kv)]
            out += [(f"{tb}_{attn}_to_out_0", c, c)]
        out += [(f"{tb}_ff_net_0_proj", 8 * c, c), (f"{tb}_ff_net_2", c, 4 * c)]
    h = 768 // width_div
    for layer in range(12):
        te = f"lora_te_text_model_encoder_layers_{layer}"
        out += [(f"{te}_self_attn_{p}", h, h) for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
        out += [(f"{te}_mlp_fc1", 4 * h, h), (f"{te}_mlp_fc2", h, 4 * h)]
    return out


def sdxl_shapes(width_div: int = 1) -> list[tuple[str, int, int]]:
    """kohya's SDXL targets (SGM names): 70 UNet transformer blocks × 10 + proj_in/out, CLIP-L (12) and bigG (32)."""
    stages = [("input_blocks", i, 640, 2) for i in (4, 5)] + [("input_blocks", i, 1280, 10) for i in (7, 8)]
    stages += [("middle_block", None, 1280, 10)]
    stages += [("output_blocks", i, 1280, 10) for i in (0, 1, 2)] + [("output_blocks", i, 640, 2) for i in (3, 4, 5)]
    ctx = 2048 // width_div
    out = []
    for part, i, c, depth in stages:
        c //= width_div
        base = f"lora_unet_{part}_{i}_1" if i is not None else f"lora_unet_{part}_1"
        out += [(f"{base}_proj_in", c, c), (f"{base}_proj_out", c, c)]
        for t in range(depth):
            tb = f"{base}_transformer_blocks_{t}"
            for attn in ("attn1", "attn2"):
                d_kv = c if attn == "attn1" else ctx
                out += [(f"{tb}_{attn}_to_q", c, c), (f"{tb}_{attn}_to_k", c, d_kv), (f"{tb}_{attn}_to_v", c, d_kv)]
                out += [(f"{tb}_{attn}_to_out_0", c, c)]
            out += [(f"{tb}_ff_net_0_proj", 8 * c, c), (f"{tb}_ff_net_2", c, 4 * c)]
    for te, width, layers in (("te1", 768, 12), ("te2", 1280, 32)):
        h = width // width_div
        for layer in range(layers):
            stem = f"lora_{te}_text_model_encoder_layers_{layer}"
            out += [(f"{stem}_self_attn_{p}", h, h) for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
            out += [(f"{stem}_mlp_fc1", 4 * h, h), (f"{stem}_mlp_fc2", h, 4 * h)]
    return out


def llm7b_shapes(width_div: int = 1) -> list[tuple[str, int, int]]:
    """q/k/v/o of a 32-layer, 4096-wide decoder (Llama-2-7B / Mistral-7B class without GQA)."""
    d = 4096 // width_div
    return [
        (f"base_model.model.model.layers.{i}.self_attn.{p}", d, d)
        for i in range(32)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    ]


def write_lora(config: Config, folder: Path, gen: torch.Generator) -> Path:
    """A fp16 file in the format real LoRAs of that base use (kohya for SD, PEFT for the LLM)."""
    tensors = {}
    for stem, d_out, d_in in config.shapes:
        a = torch.randn(config.rank, d_in, generator=gen) / d_in**0.5
        b = torch.randn(d_out, config.rank, generator=gen) * 0.01
        if stem.startswith("lora_"):
            tensors |= {
                f"{stem}.lora_down.weight": a.half(),
                f"{stem}.lora_up.weight": b.half(),
                f"{stem}.alpha": torch.tensor(config.rank / 2).half(),
            }
        else:
            tensors |= {f"{stem}.lora_A.weight": a.half(), f"{stem}.lora_B.weight": b.half()}
    path = folder / f"{config.name}.safetensors"
    save_file(tensors, str(path))
    return path


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def dense_time(lora, per_shape: int, repeats: int) -> tuple[float, float]:
    """(estimated dense-route seconds for all modules, max relative error of the factors' σ against dense σ)."""
    counts = Counter((m.spec.d_out, m.spec.d_in) for m in lora)
    seen: Counter = Counter()
    total, worst = 0.0, 0.0
    for m in lora:
        shape = (m.spec.d_out, m.spec.d_in)
        if per_shape and seen[shape] >= per_shape:
            continue
        seen[shape] += 1
        seconds, dense = timed(lambda m=m: torch.linalg.svdvals(m.delta_weight())[: m.spec.rank], repeats)
        total += seconds * (counts[shape] / per_shape if per_shape else 1)
        fast = singular_values(m.a, m.b, m.scale)
        worst = max(worst, float(((fast - dense).abs() / dense[0]).max()))
    return total, worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small widths: a smoke run in seconds")
    parser.add_argument(
        "--dense-per-shape", type=int, default=1, help="dense modules timed per distinct shape; 0 = all"
    )
    parser.add_argument("--repeats", type=int, default=3, help="best-of repeats for read and spectra timings")
    args = parser.parse_args(argv)
    div = 16 if args.tiny else 1
    configs = [Config(f"sd15-r{r}", sd15_shapes(div), r) for r in (4, 32, 128)]
    configs.append(Config("llm7b-qkvo-r16", llm7b_shapes(div), 16))
    if args.tiny:
        configs = [Config(c.name, c.shapes, min(c.rank, 8)) for c in configs]
    console = Console(width=None if Console().is_terminal else 160)
    table = Table(
        title=f"Spectra from the factors vs dense SVD vs reading the file (torch threads: {torch.get_num_threads()})"
    )
    for column in (
        "LoRA",
        "modules",
        "read s",
        "factors batched s",
        "factors loop s",
        "dense SVD s",
        "dense / factors",
        "read / factors",
        "max rel err",
    ):
        table.add_column(column, justify="right")
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            path = write_lora(config, Path(tmp), gen)
            read_s, lora = timed(lambda path=path: load_lora(path), args.repeats)
            qr_s, _ = timed(lambda lora=lora: lora_singular_values(lora, cache=False), args.repeats)
            loop_s, _ = timed(lambda lora=lora: [singular_values(m.a, m.b, m.scale) for m in lora], args.repeats)
            dense_s, err = dense_time(lora, args.dense_per_shape, min(args.repeats, 2))
            times = [f"{read_s:.3f}", f"{qr_s:.4f}", f"{loop_s:.4f}", f"{dense_s:.2f}"]
            ratios = [f"{dense_s / qr_s:,.0f}×", f"{read_s / qr_s:.1f}×", f"{err:.1e}"]
            table.add_row(config.name, str(len(lora)), *times, *ratios)
            console.print(f"done: {config.name} ({path.stat().st_size / 2**20:.1f} MiB file)")
    console.print(table)
    estimate = (
        "every module" if args.dense_per_shape == 0 else f"{args.dense_per_shape} module(s) per distinct shape, scaled"
    )
    console.print(f"dense SVD timed on {estimate}; 'read' includes header checks, sha256 and fp16→fp32 conversion.")


if __name__ == "__main__":
    main()
