"""What the workers of a distributed ingest do, as plain functions over batches (no Ray in here: testable alone).

:func:`parse_batch` (a CPU task): resolve each task (a path, a downloaded URL, a fetched Hub repo), read the LoRA,
compute its invariant fingerprint, its card's facts and its file's metadata labels, and make its store rows with
:meth:`lol_engine.store.LoraStore.rows_of` — the rows the single-process ingest would write. A LoRA that some predictor
fits keeps its weights for the next stage; the others are done.

:class:`EncoderStage` (an actor: the predictors are loaded once, on a GPU when the actor has one): the LoL embeddings
and estimates of the LoRAs that kept their weights, batched as :func:`lol_engine.ingest.ingest` does.

A batch is ``{column: numpy array}``; each output row is one LoRA (or one refusal): ``seq``, ``key``, ``path``,
``status`` (``ok``, ``error``, ``stored``: already in the collection), ``reason``, ``sha256``, ``size``,
``mtime_ns``, ``rows_json`` (its store rows by table, JSON) and ``weights`` (the LoRA, or None).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from lol_engine.encoders import FingerprintEncoder, PredictorEncoder, encode_many, encoders_for, load_predictors
from lol_engine.errors import LolError, LoraFormatError
from lol_engine.ingest import LoraSource, lora_sources
from lol_engine.labels import metadata_labels
from lol_engine.lora.locate import locate_lora
from lol_engine.lora.parse import load_lora
from lol_engine.lora.safe_io import file_sha256
from lol_engine.lora.weights import LoraWeights
from lol_engine.report import describe
from lol_engine.scale.sources import download, url_name
from lol_engine.sketch import DeltaSketchEncoder
from lol_engine.store import LoraStore, NewLora

__all__ = ["COLUMNS", "Carried", "EncoderStage", "is_done", "parse_batch"]

log = logging.getLogger(__name__)
COLUMNS = ("seq", "key", "path", "status", "reason", "sha256", "size", "mtime_ns", "rows_json", "weights")
_REFUSED = (LolError, OSError, ValueError)  # what ingest() refuses a file for


@dataclass(frozen=True)
class Carried:
    """A LoRA on its way to the encoder stage, opaque to Ray Data (which would take a :class:`LoraWeights`, a
    sequence of modules, for an array)."""

    lora: LoraWeights


def is_done(sha256: str, done: np.ndarray) -> bool:
    """Whether ``sha256`` is in ``done``, a sorted array of ``S64`` hex digests (shared by every worker)."""
    if len(done) == 0:
        return False
    key = np.bytes_(sha256.encode())
    i = int(np.searchsorted(done, key))
    return i < len(done) and done[i] == key


@lru_cache(maxsize=4)
def _predictors(folder: str | None) -> tuple[PredictorEncoder, ...]:
    """The predictor encoders, loaded once per worker process (to know which LoRAs go on to the encoder stage)."""
    return tuple(e for e in encoders_for(load_predictors(folder)) if isinstance(e, PredictorEncoder))


def parse_batch(
    batch: dict[str, np.ndarray],
    *,
    done: Sequence[Any] = (),
    metadata: bool = True,
    predictors: str | None = None,
    cache_dir: str | None = None,
) -> dict[str, np.ndarray]:
    """Read, fingerprint and describe the tasks of ``batch`` (see the module); ``done``: ``[sorted S64 array]``
    (or an object reference to one) of the sha256s already ingested, skipped unread past their hash."""
    done_ids = _resolve(done[0]) if len(done) else np.array([], dtype="S64")
    out: list[dict[str, Any]] = []
    for task in _rows(batch):
        base = {"seq": int(task["seq"]), "key": f"{task['kind']}:{task['target']}", "path": str(task["target"])}
        base |= {"size": int(task["size"]), "mtime_ns": int(task["mtime_ns"])}
        try:
            with ExitStack() as stack:
                for source in _sources(task, stack, cache_dir):
                    out.append(base | _parse_one(source, task, done_ids, metadata, predictors))
        except _REFUSED as exc:
            out.append(base | _error(str(exc)))
        except Exception as exc:  # a bug must not abort the batch: recorded, and logged with its traceback
            log.exception("unexpected error ingesting %s", task["target"])
            out.append(base | _error(f"unexpected {type(exc).__name__}: {exc}"))
    return _columns(out)


def _resolve(done: Any) -> np.ndarray:
    if isinstance(done, np.ndarray):
        return done
    import ray  # an object reference: the array lives once per node, read without a copy

    return np.asarray(ray.get(done))


def _sources(task: dict[str, Any], stack: ExitStack, cache_dir: str | None) -> Iterator[tuple[LoraSource, str]]:
    """``(source, how to store its source)`` for each LoRA of a task: the URL of a download, the folder a relative
    path was given in, or nothing (the file's path as read)."""
    kind, target = task["kind"], str(task["target"])
    if kind == "url":
        path = stack.enter_context(download(target))
        yield LoraSource(path, name=url_name(target)), target
    elif kind == "hub":
        for source in lora_sources([target], cache_dir):
            yield source, ""
    else:
        labels = json.loads(task["labels_json"])
        yield LoraSource(Path(target), labels, task["zoo"] or None, task["name"] or None), task["cwd"]


def _parse_one(
    item: tuple[LoraSource, str], task: dict[str, Any], done: np.ndarray, metadata: bool, predictors: str | None
) -> dict[str, Any]:
    source, shown_source = item
    if len(done):
        sha = file_sha256(locate_lora(source.path).weights)
        if is_done(sha, done):
            return {"status": "stored", "reason": "", "sha256": sha, "rows_json": "", "weights": None}
    lora = load_lora(source.path)
    if shown_source:  # a download: store the URL, not the temporary file; a relative path given: relative to it
        shown = _relative(lora.meta.source, shown_source) if task["kind"] == "path" else shown_source
        lora = dataclasses.replace(lora, meta=dataclasses.replace(lora.meta, source=shown))
    fingerprint = encode_many([lora], [FingerprintEncoder(), DeltaSketchEncoder()])[0].embeddings  # and its sketch
    labels = {**(metadata_labels(lora.meta) if metadata else {}), **source.labels}
    try:
        rows = LoraStore.rows_of(NewLora(lora, source.name, source.zoo, labels, fingerprint, {}, describe(lora)))
    except ValueError as exc:  # a non-finite fingerprint
        return _error(str(exc), lora.meta.sha256)
    rows["loras"] = [[v.isoformat() if isinstance(v, datetime.datetime) else v for v in rows["loras"][0]]]
    fits = any(e.accepts(lora) for e in _predictors(predictors))
    return {
        "status": "ok",
        "reason": "",
        "sha256": lora.meta.sha256,
        "rows_json": json.dumps(rows, allow_nan=False),
        "weights": Carried(lora) if fits else None,
    }


def _relative(source: str, cwd: str) -> str:
    """``source`` relative to ``cwd`` when it lies under it (as the single-process ingest stores a relative path)."""
    prefix = cwd.rstrip(os.sep) + os.sep
    return source[len(prefix) :] if source.startswith(prefix) else source


def _error(reason: str, sha256: str = "") -> dict[str, Any]:
    return {"status": "error", "reason": " ".join(reason.split())[:500], "sha256": sha256, "rows_json": ""} | {
        "weights": None
    }


def _rows(batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    n = len(next(iter(batch.values()))) if batch else 0
    for i in range(n):
        yield {k: v[i] for k, v in batch.items()}


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    out = {}
    for name in COLUMNS:
        values = [r[name] for r in rows]
        if name in ("seq", "size", "mtime_ns"):
            out[name] = np.array(values, dtype=np.int64)
        else:
            column = np.empty(len(values), dtype=object)
            column[:] = values
            out[name] = column
    return out


class EncoderStage:
    """The LoL embeddings and estimates of the LoRAs that kept their weights (an actor: predictors loaded once).

    ``device``: where the predictors run (default: the settings' device, a GPU when torch sees one)."""

    def __init__(self, predictors: str | None = None, device: str | None = None) -> None:
        if device is None:
            from lol_engine.settings import settings

            device = settings().resolved_device()
        self.encoders = [PredictorEncoder(e.predictor.to(device)) for e in _predictors(predictors)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Add the predictors' rows to each LoRA's ``rows_json`` and drop its weights."""
        rows = list(_rows(batch))
        todo = [r for r in rows if isinstance(r["weights"], Carried)]
        for row, result in zip(todo, self._encode([r["weights"].lora for r in todo]), strict=True):
            if isinstance(result, str):
                row |= _error(result, row["sha256"])
                continue
            tables = json.loads(row["rows_json"])
            tables["embeddings"] += result["embeddings"]
            tables["estimates"] += result["estimates"]
            row["rows_json"] = json.dumps(tables, allow_nan=False)
        for row in rows:
            row["weights"] = None
        return _columns(rows)

    def _encode(self, loras: list[LoraWeights]) -> list[dict[str, list[list[Any]]] | str]:
        """Each LoRA's embedding and estimate rows, or why it is refused (as :func:`lol_engine.ingest.ingest`: the
        batch at once, else one by one so that a failure refuses that LoRA only; non-finite embeddings refuse it)."""
        if not loras:
            return []
        try:
            results = encode_many(loras, self.encoders)
        except (LoraFormatError, ValueError) as exc:
            if len(loras) == 1:
                return [str(exc)]
            return [self._encode([lora])[0] for lora in loras]
        out: list[dict[str, list[list[Any]]] | str] = []
        for lora, result in zip(loras, results, strict=True):
            try:
                made = LoraStore.rows_of(NewLora(lora, embeddings=result.embeddings, estimates=result.estimates))
                out.append({"embeddings": made["embeddings"], "estimates": made["estimates"]})
            except ValueError as exc:
                out.append(str(exc))
        return out
