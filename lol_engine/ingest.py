"""Ingest LoRAs into the store: files, folders, built zoos (with their labels) or Hugging Face repos.

For every LoRA it stores the architecture-agnostic invariant fingerprint (encoder ``fingerprint``), the embedding and
predictions of every shipped predictor whose module spec the LoRA fits, and, for zoo folders, the manifest's labels.
A file that cannot be read is reported and skipped; nothing of it is stored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lol_engine.errors import LoraFormatError
from lol_engine.fingerprint import fingerprint
from lol_engine.lora.parse import load_lora
from lol_engine.lora.weights import LoraWeights

__all__ = ["FINGERPRINT", "LOL_PREFIX", "IngestReport", "encode", "encode_many", "fetch_repo", "ingest",
           "lora_sources", "shipped_predictors"]  # fmt: skip

FINGERPRINT = "fingerprint"  # encoder name of the architecture-agnostic invariant fingerprint
LOL_PREFIX = "lol:"  # encoder name prefix of a shipped predictor's LoL embedding

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DEFAULT_PREDICTORS = Path(__file__).resolve().parent / "predictors"


@dataclass
class IngestReport:
    """What an ingest did: ids added (or already present), and ``(path, reason)`` for what was refused."""

    ids: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)


def fetch_repo(repo_id: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download (or, with ``HF_HUB_OFFLINE=1``, find in the cache) a Hub repo's safetensors and JSON files."""
    from huggingface_hub import snapshot_download

    cache = None if cache_dir is None else str(cache_dir)
    folder = snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json"], cache_dir=cache)
    return Path(folder)


def lora_sources(paths: Iterable[str], cache_dir: str | None = None) -> list[tuple[Path, dict[str, Any], str | None]]:
    """``(lora path, labels, zoo name)`` for every LoRA named by ``paths`` (files, PEFT folders, zoos, repo ids)."""
    out: list[tuple[Path, dict[str, Any], str | None]] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists() and REPO_ID.match(raw):
            path = fetch_repo(raw, cache_dir)
        if (path / "manifest.parquet").is_file():
            from lol_engine.zoo.manifest import read_manifest

            zoo = path.name
            for row in read_manifest(path):
                labels = {k[2:]: v for k, v in row.items() if k.startswith("y_")}
                out.append((path / row["path"], labels, zoo))
        elif path.is_dir() and (path / "adapter_model.safetensors").is_file():
            out.append((path, {}, None))
        elif path.is_dir():
            files = sorted(path.rglob("*.safetensors"))
            out += [(f.parent if f.name == "adapter_model.safetensors" else f, {}, None) for f in files]
        else:
            out.append((path, {}, None))
    return out


def shipped_predictors(folder: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``{name: Predictor}`` for every predictor folder under ``folder`` (default: the shipped ``data/predictors``)."""
    from lol_engine.train.checkpoint import load_predictor

    root = Path(folder) if folder is not None else DEFAULT_PREDICTORS
    if not root.is_dir():
        return {}
    return {p.parent.name: load_predictor(p.parent) for p in sorted(root.glob("*/config.json"))}


def encode(
    lora: LoraWeights, predictors: Mapping[str, Any]
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """What the store keeps for a LoRA: ``({predictor: {target: value}}, {encoder: vector})``.

    Encoders are ``fingerprint`` (any LoRA) and ``lol:<predictor>`` (the predictor's LoL embedding) for every
    predictor whose module spec the LoRA fits; the others are skipped.
    """
    return encode_many([lora], predictors)[0]


def encode_many(
    loras: Sequence[LoraWeights], predictors: Mapping[str, Any]
) -> list[tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]]:
    """:func:`encode` for many LoRAs: one batched forward per predictor over the LoRAs that fit it."""
    out: list[tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]] = [
        ({}, {FINGERPRINT: fingerprint(lora).numpy()}) for lora in loras
    ]
    for name, predictor in predictors.items():
        members = [i for i, lora in enumerate(loras) if predictor.fits(lora)]
        if not members:
            continue
        results = predictor.predict_and_embed_many([loras[i] for i in members])
        for i, (output, vector) in zip(members, results, strict=True):
            value = output[predictor.task.label]
            out[i][0][name] = value if isinstance(value, dict) else {predictor.task.label: value}
            out[i][1][f"{LOL_PREFIX}{name}"] = vector.numpy()
    return out


def ingest(
    paths: Iterable[str],
    store: Any,
    predictors: Mapping[str, Any] | None = None,
    *,
    progress: bool = True,
    cache_dir: str | None = None,
    batch: int = 64,
) -> IngestReport:
    """Add every LoRA named by ``paths`` to ``store`` (a :class:`lol_engine.store.LoraStore`).

    LoRAs are written ``batch`` at a time, each batch one transaction (all of it or none); a file that cannot be read
    is refused on its own. A database failure (:class:`~lol_engine.errors.StoreError`) stops the ingest: the batches
    before it are stored, the failing one is not. The store is checkpointed at the end.
    """
    from rich.progress import Progress

    predictors = shipped_predictors() if predictors is None else predictors
    report = IngestReport()
    sources = lora_sources(paths, cache_dir)
    pending: list[tuple[Path, LoraWeights, dict[str, Any]]] = []

    def encoded(path: Path, lora: LoraWeights) -> Any:
        try:  # one LoRA on its own, so that a failure refuses that file only
            return encode(lora, predictors)
        except (LoraFormatError, ValueError) as exc:
            report.refused.append((str(path), str(exc)))
            return None

    def flush() -> None:
        try:
            results: list[Any] = list(encode_many([p[1] for p in pending], predictors))
        except (LoraFormatError, ValueError):
            results = [encoded(path, lora) for path, lora, _ in pending]
        items = []
        for (path, lora, entry), result in zip(pending, results, strict=True):
            if result is None:
                continue
            predictions, embeddings = result
            bad = [name for name, v in embeddings.items() if not np.isfinite(v).all()]
            if bad:
                report.refused.append((str(path), f"embedding {bad[0]!r} has non-finite values"))
                continue
            items.append((lora, {**entry, "embeddings": embeddings, "predictions": predictions}))
        report.ids.extend(store.add_many(items))
        pending.clear()

    with Progress(disable=not progress) as bar:
        task = bar.add_task("ingest", total=len(sources))
        for path, labels, zoo in sources:
            try:
                pending.append((path, load_lora(path), {"zoo": zoo, "labels": labels}))
            except (LoraFormatError, OSError, ValueError) as exc:
                report.refused.append((str(path), str(exc)))
            if len(pending) >= batch:
                flush()
            bar.advance(task)
        if pending:
            flush()
    store.checkpoint()
    return report
