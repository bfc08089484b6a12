"""A JSON-ready description of a loaded LoRA: what ``lol inspect --json`` prints and the app shows."""

from __future__ import annotations

import math
from typing import Any

from lol_engine.lora.weights import LoraWeights
from lol_engine.symmetry import lora_fro_norms, lora_singular_values

__all__ = ["describe"]

_MAX_TEXT = 2000  # metadata strings longer than this are shortened in reports (thumbnails, tag lists)


def _short(value: Any) -> Any:
    """Metadata made fit for a report: long strings shortened, non-finite numbers as text (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str) and len(value) > _MAX_TEXT:
        return value[:_MAX_TEXT] + f"…[{len(value) - _MAX_TEXT:,} more chars]"
    if isinstance(value, dict):
        return {str(k): _short(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_short(v) for v in value]
    return value


def describe(lora: LoraWeights) -> dict[str, Any]:
    """Everything ``lol inspect`` reports. Norms and singular values are of the *scaled* update ``scale·B·A``."""
    spectra = lora_singular_values(lora)
    norms = lora_fro_norms(lora)
    modules = []
    for m in lora:
        modules.append(
            {
                "name": m.name,
                "kind": m.spec.kind,
                "rank": m.spec.rank,
                "alpha": m.alpha,
                "scale": m.scale,
                "d_in": m.spec.d_in,
                "d_out": m.spec.d_out,
                "orig_shape": list(m.spec.orig_shape),
                "delta_fro_norm": float(norms[m.name]),
                "singular_values": [float(s) for s in spectra[m.name]],
                "dora_magnitude": m.magnitude_axis,
            }
        )
    total = sum(float(n) ** 2 for n in norms.values()) ** 0.5
    meta = lora.meta
    return {
        "source": meta.source,
        "format": meta.format,
        "base_family": meta.base_family,
        "evidence": list(meta.family_evidence),
        "dtype": meta.dtype,
        "n_modules": len(lora),
        "ranks": sorted({m.spec.rank for m in lora}),
        "is_dora": meta.is_dora,
        "modules": modules,
        "total_delta_fro_norm": total,
        "sha256": meta.sha256,
        "size_bytes": meta.size_bytes,
        "skipped_keys": list(meta.skipped_keys),
        "kohya_metadata": _short(dict(meta.kohya)),
        "modelspec": _short(dict(meta.modelspec)),
        "adapter_config": _short(dict(meta.adapter_config)),
        "warnings": list(meta.warnings),
    }
