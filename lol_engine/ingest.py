"""The batch pipeline: put LoRAs (files, folders, built zoos with their labels, Hugging Face repos) into a store.

Every LoRA gets what its encoders make of it (:mod:`lol_engine.encoders`: the fingerprint, and each predictor's
embedding and estimate where the predictor fits) and its labels: a zoo manifest's, the file's own metadata
(:func:`lol_engine.labels.metadata_labels`, unless turned off) and a labels table's (:mod:`lol_engine.labels`; a
table's label wins over the others of the same name). A file that cannot be read is reported and skipped; nothing of
it is stored.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lol_engine.encoders import Encoded, Encoder, encode_many, encoders_for, load_predictors
from lol_engine.errors import LoraFormatError
from lol_engine.hub import fetch_repo, is_repo_id
from lol_engine.labels import LabelMatch, LabelTable, LoraKeys, match_labels, metadata_labels, path_keys
from lol_engine.lora.locate import LoraLocation, display_name, find_loras, locate_lora, path_kind, scan_tree
from lol_engine.lora.parse import load_lora
from lol_engine.lora.weights import LoraWeights
from lol_engine.report import describe

if TYPE_CHECKING:
    from lol_engine.store import LoraStore

BATCH_BYTES = 512 * 2**20  # a batch is written once its files add up to this much (their factors stay in memory)

__all__ = ["IngestReport", "LoraSource", "ingest", "lora_sources", "table_labels"]


@dataclass
class IngestReport:
    """What an ingest did: ids added (or already present), and ``(path, reason)`` for what was refused."""

    ids: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    labels: LabelMatch | None = None  # how a labels table was joined, when one was given


@dataclass(frozen=True)
class LoraSource:
    """One LoRA to ingest: where it is, its labels (from a zoo manifest), its zoo's name and the name to store it
    under (None: :func:`~lol_engine.lora.locate.display_name` of its file); ``location``: its file and config as a
    folder walk found them, read from there without looking again."""

    path: Path
    labels: dict[str, Any] = field(default_factory=dict)
    zoo: str | None = None
    name: str | None = None
    location: LoraLocation | None = None


def lora_sources(paths: Iterable[str], cache_dir: str | None = None) -> list[LoraSource]:
    """Every LoRA named by ``paths``: files, LoRA folders, folders of LoRAs, built zoos, Hub repo ids."""
    out: list[LoraSource] = []
    for raw in paths:
        path = Path(raw)
        kind = path_kind(path)
        if kind is None and is_repo_id(raw):
            out += _repo_sources(raw, fetch_repo(raw, cache_dir))
        elif kind != "folder":  # a file, or nothing there: refused with its reason when read
            out.append(LoraSource(path))
        elif (path / "manifest.parquet").is_file():
            out += _zoo_sources(path)
        else:
            # A folder of zoos (data/zoo): each built zoo with its manifest's labels, then any other LoRA in it.
            found, zoos = scan_tree(path, marked_by=("manifest.parquet", "zoo.json"))
            for zoo in zoos:
                out += _zoo_sources(zoo)
            loose = [f for f in found if not any(f.weights.is_relative_to(z) for z in zoos)]
            out += [LoraSource(f.weights, location=f) for f in loose] or ([] if zoos else [LoraSource(path)])
    return out


def _zoo_sources(zoo: Path) -> list[LoraSource]:
    """The LoRAs of a built zoo, with its manifest's labels (``y_*`` columns) and the zoo's name."""
    from lol_engine.zoo.manifest import read_manifest

    return [
        LoraSource(zoo / row["path"], {k[2:]: v for k, v in row.items() if k.startswith("y_")}, zoo.name)
        for row in read_manifest(zoo)
    ]


def _repo_sources(repo_id: str, snapshot: Path) -> list[LoraSource]:
    """The LoRAs of a fetched Hub repo, named by the repo id (not by the snapshot's commit folder): the repo's one
    LoRA as ``owner/name``, several as ``owner/name/<path of each in the repo>``."""
    found = find_loras(snapshot)
    if len(found) == 1:
        return [LoraSource(found[0].weights, name=repo_id)]
    named = []
    for location in found:
        inner = location.weights.relative_to(snapshot)
        part = inner.parent if location.name == inner.parent.name else inner.with_suffix("")
        named.append(LoraSource(location.weights, name=f"{repo_id}/{part.as_posix()}"))
    return named or [LoraSource(snapshot, name=repo_id)]  # none: refused with the folder's reason when read


def ingest(
    paths: Iterable[str],
    store: LoraStore,
    encoders: Sequence[Encoder] | None = None,
    *,
    progress: bool = True,
    cache_dir: str | None = None,
    batch: int = 256,
    labels: LabelTable | None = None,
    metadata: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> IngestReport:
    """Add every LoRA named by ``paths`` to ``store`` with what ``encoders`` (default: the shipped ones) make of it.

    LoRAs are written ``batch`` at a time (fewer when their files reach :data:`BATCH_BYTES`: 256 SDXL LoRAs would
    hold ~56 GB of factors), each batch one transaction (all of it or none; each statement and commit costs a few
    milliseconds whatever its size, so small LoRAs go in large batches); a file that cannot be read is refused on its
    own. A writer thread stores each batch while the next is read (its statements run without the GIL). A database
    failure (:class:`~lol_engine.errors.StoreError`) stops the ingest: the batches before it are stored, the failing
    one and those after it are not. The store is checkpointed at the end.

    ``labels``: a table joined by its key (every miss is in the report's ``labels``); ``metadata``: also store the
    labels the files carry (kohya training fields and tags, PEFT config fields, modelspec). ``on_progress(done,
    total)`` is called after each file is read (for a page that shows the build).
    """
    from rich.progress import Progress

    from lol_engine.store import NewLora, rows_of

    encoders = encoders_for(load_predictors()) if encoders is None else encoders
    report = IngestReport()
    paths = list(paths)
    sources = lora_sources(paths, cache_dir)
    pending: list[tuple[LoraSource, LoraWeights]] = []
    by_source = _table_labels(labels, sources, [p for p in paths if Path(p).is_dir()], report)
    loaded: list[tuple[str, str]] = []  # (sha256, name) of every LoRA read, for a sha256-keyed table
    writing: Future[list[str]] | None = None  # the batch being stored while the next is read

    def encoded(source: LoraSource, lora: LoraWeights) -> Encoded | None:
        try:  # one LoRA on its own, so that a failure refuses that file only
            return encode_many([lora], encoders)[0]
        except (LoraFormatError, ValueError) as exc:
            report.refused.append((str(source.path), str(exc)))
            return None

    def flush() -> None:
        nonlocal writing
        results: list[Encoded | None]
        try:
            results = list(encode_many([lora for _, lora in pending], encoders))
        except (LoraFormatError, ValueError):
            results = [encoded(source, lora) for source, lora in pending]
        items = []
        for (source, lora), result in zip(pending, results, strict=True):
            if result is None:
                continue
            bad = [name for name, v in result.embeddings.items() if not np.isfinite(v).all()]
            if bad:
                report.refused.append((str(source.path), f"embedding {bad[0]!r} has non-finite values"))
                continue
            attached = {**(metadata_labels(lora.meta) if metadata else {}), **source.labels}
            if labels is not None and labels.key == "sha256":
                attached |= labels.rows.get(lora.meta.sha256, {})
            else:
                attached |= by_source.get(id(source), {})
            described = describe(lora)  # its card's facts are kept: a stored LoRA's card needs no file
            items.append(
                NewLora(lora, source.name, source.zoo, attached, result.embeddings, result.estimates, described)
            )
        rows = rows_of(items)  # made here (Python work); the statements run in the writer thread, without the GIL
        pending.clear()
        stored()
        writing = writer.submit(store.add_rows, rows)

    def stored() -> None:  # wait for the batch being written: its ids, or its StoreError
        nonlocal writing
        if writing is not None:
            written, writing = writing, None
            report.ids.extend(written.result())

    pending_bytes = 0  # of the files in pending
    with (
        _young_heap_only(),
        ThreadPoolExecutor(1, thread_name_prefix="lol-ingest-store") as writer,
        Progress(disable=not progress) as bar,
    ):
        task = bar.add_task("ingest", total=len(sources))
        for done, source in enumerate(sources, 1):
            try:
                lora = load_lora(source.location or source.path)
                pending.append((source, lora))
                pending_bytes += lora.meta.size_bytes
                if labels is not None and labels.key == "sha256":  # only a sha256-keyed table needs the names now
                    loaded.append((lora.meta.sha256, source.name or display_name(lora.meta.source)))
            except (LoraFormatError, OSError, ValueError) as exc:
                report.refused.append((str(source.path), str(exc)))
            if len(pending) >= batch or pending_bytes >= BATCH_BYTES:
                flush()
                pending_bytes = 0
            bar.advance(task)
            if on_progress is not None:
                on_progress(done, len(sources))
        if pending:
            flush()
        stored()
    store.checkpoint()
    if labels is not None and labels.key == "sha256":  # joined as the files were read: report it the same way
        report.labels = match_labels(labels, [LoraKeys(sha, name) for sha, name in dict(loaded).items()])
    return report


_FROZEN_LOCK = threading.Lock()
_frozen_ingests = 0  # ingests running now in this process (threads): the heap is frozen while there is one


@contextmanager
def _young_heap_only() -> Iterator[None]:
    """Keep the objects that exist before an ingest (modules, models, the app's state) out of garbage collections
    until it ends (:func:`gc.freeze`).

    Reading a LoRA makes hundreds of short-lived objects, which trigger collections; a full one rescans the whole heap
    (0.11–0.14 s with torch loaded on a 2-core machine: 7 % of an ingest of 1,000 small LoRAs). Frozen objects are
    only skipped, not lost: they are collected as usual after :func:`gc.unfreeze`. The freeze is the process's, so
    ingests running at once in several threads share it: the first to start freezes, the last to end unfreezes.
    """
    global _frozen_ingests
    with _FROZEN_LOCK:
        if _frozen_ingests == 0:
            gc.freeze()
        _frozen_ingests += 1
    try:
        yield
    finally:
        with _FROZEN_LOCK:
            _frozen_ingests -= 1
            if _frozen_ingests == 0:
                gc.unfreeze()


def _table_labels(
    table: LabelTable | None, sources: list[LoraSource], roots: list[str], report: IngestReport
) -> dict[int, dict[str, Any]]:
    """``{id(source): labels}`` of a ``name``- or ``path``-keyed table, joined before anything is read (names and
    paths need no parsing), so that a row matching two LoRAs is refused before either is stored."""
    if table is None or table.key == "sha256":
        return {}
    keys = []
    for source in sources:
        try:
            weights = locate_lora(source.path).weights
        except LoraFormatError:
            continue  # refused when it is read
        keys.append(LoraKeys(str(id(source)), source.name or display_name(weights), path_keys(weights, roots)))
    report.labels = match_labels(table, keys)
    return {int(i): values for i, values in report.labels.labelled.items()}


def table_labels(
    table: LabelTable | None, sources: list[LoraSource], roots: list[str]
) -> tuple[LabelMatch | None, dict[int, dict[str, Any]]]:
    """How :func:`ingest` joins a ``name``- or ``path``-keyed labels table before reading anything: the match (for
    the report) and ``{id(source): labels}``; for a distributed ingest, which ships each source's labels with it."""
    report = IngestReport()
    by_source = _table_labels(table, sources, roots, report)
    return report.labels, by_source
