"""Plain functions behind the app's events. No gradio here: every handler is testable on its own.

Uploads are hostile until parsed: only ``.safetensors`` and ``adapter_config.json`` are accepted, sizes are bounded
by :class:`lol_engine.ReadLimits` (the server also caps uploads with ``launch(max_file_size=…)``), and every refusal
comes back as a :class:`LoraFormatError` whose message names the problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lol_engine import LoraFormatError, ReadLimits, load_lora
from lol_engine.lora.config import read_adapter_config
from lol_engine.report import describe

__all__ = ["MODULE_COLUMNS", "InspectResult", "inspect_upload"]

MODULE_COLUMNS = ["module", "kind", "rank", "alpha", "scale", "d_out", "d_in", "‖ΔW‖_F", "σ₁", "σ₁² / Σσ²"]


@dataclass(frozen=True)
class InspectResult:
    """What the Inspect tab shows: a Markdown summary, one row per module, and the full JSON report."""

    summary: str
    rows: list[list[Any]]
    report: dict[str, Any]


def _pick_files(paths: Sequence[str]) -> tuple[Path, Path | None]:
    files = [Path(p) for p in paths if p]
    lora = [p for p in files if p.suffix.lower() == ".safetensors"]
    configs = [p for p in files if p.name.endswith(".json")]
    others = [p.name for p in files if p not in lora and p not in configs]
    if others:
        raise LoraFormatError(f"{others[0]}: only .safetensors files and adapter_config.json are accepted")
    if len(lora) != 1:
        raise LoraFormatError(f"upload exactly one .safetensors file (got {len(lora)})")
    if len(configs) > 1:
        raise LoraFormatError("upload at most one adapter_config.json")
    return lora[0], (configs[0] if configs else None)


def inspect_upload(paths: Sequence[str] | str | None, limits: ReadLimits | None = None) -> InspectResult:
    """Read an uploaded LoRA (plus an optional ``adapter_config.json``) and describe it.

    Raises :class:`LoraFormatError` for anything that is not a readable LoRA.
    """
    if not paths:
        raise LoraFormatError("no file uploaded")
    file, config_path = _pick_files([paths] if isinstance(paths, str) else paths)
    limits = limits or ReadLimits()
    config = read_adapter_config(config_path, limits) if config_path else None
    report = describe(load_lora(file, limits=limits, config=config))
    rows = []
    for m in report["modules"]:
        sigma = m["singular_values"]
        energy = sum(s * s for s in sigma)
        top = sigma[0] ** 2 / energy if energy > 0 else 0.0
        alpha = "" if m["alpha"] is None else round(m["alpha"], 4)
        rows.append([m["name"], m["kind"], m["rank"], alpha, round(m["scale"], 4), m["d_out"], m["d_in"],
                     round(m["delta_fro_norm"], 5), round(sigma[0], 5), round(top, 3)])  # fmt: skip
    return InspectResult(_summary(report, file.name), rows, report)


def _summary(report: dict[str, Any], name: str) -> str:
    lines = [
        f"### {name}",
        f"**format** `{report['format']}` · **base** `{report['base_family']}` · **dtype** `{report['dtype']}` · "
        f"**modules** {report['n_modules']} · **ranks** {report['ranks']} · **DoRA** {report['is_dora']}",
        f"**total ‖ΔW‖_F** {report['total_delta_fro_norm']:.4g} · **sha256** `{report['sha256'][:16]}…`",
        f"**evidence:** {'; '.join(report['evidence'])}",
    ]
    warnings = "\n".join(f"- ⚠️ {w}" for w in report["warnings"])
    return "\n\n".join([*lines, warnings] if warnings else lines)
