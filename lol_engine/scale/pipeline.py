"""Batch ingest on Ray Data: the same LoRAs, labels, fingerprints and predictions as :func:`lol_engine.ingest.ingest`,
from many processes or machines, written as Parquet shards that the store then loads.

The pipeline::

    tasks (driver: paths, zoo manifests, list files, Hub ids, labels joined)
      → map_batches(parse_batch)          CPU tasks: read, fingerprint, card facts, metadata labels, store rows
      → map_batches(EncoderStage)         actor pool: predictors loaded once per actor (a GPU each, when there are)
      → driver: Parquet parts under OUT   (lol_engine.scale.shards), then LoraStore.load_shards

Resuming: a task whose path, size and modification time are recorded as done in OUT is not read again; a file whose
sha256 is in the store or in OUT is hashed and skipped. One bad file is recorded in ``errors.parquet`` with its reason
and never stops the run. Ray starts locally unless ``address`` names a cluster (``"auto"``: the one this machine
belongs to); see docs/SCALING.md.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lol_engine.labels import LabelMatch, LabelTable, LoraKeys, match_labels
from lol_engine.scale.shards import ShardWriter, done_keys, parts, stored_ids
from lol_engine.scale.sources import Task, make_tasks

if TYPE_CHECKING:
    from lol_engine.store import LoraStore

__all__ = ["RayIngestReport", "ray_ingest"]

PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_PASSED_ENV = ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_HOME", "LOL_DEVICE", "LOL_DATA_DIR", "TRANSFORMERS_OFFLINE")


@dataclass
class RayIngestReport:
    """What a Ray ingest did: ids ingested this run, how many were skipped as done before, refusals, the parts."""

    out: Path
    ids: list[str] = field(default_factory=list)
    skipped: int = 0  # tasks or files ingested before (resumed), or already in the store
    refused: list[tuple[str, str]] = field(default_factory=list)
    parts: list[Path] = field(default_factory=list)
    added: int = 0  # LoRAs new to the store
    labels: LabelMatch | None = None
    tasks: int = 0
    startup_seconds: float = 0.0
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for the terminal."""
        rate = len(self.ids) / self.seconds if self.seconds else 0.0
        return (
            f"{len(self.ids)} ingested, {self.skipped} skipped (done before), {len(self.refused)} refused in "
            f"{self.seconds:.1f} s ({rate:.1f} LoRAs/s, Ray start-up {self.startup_seconds:.1f} s); "
            f"{len(self.parts)} part(s) written to {self.out}"
        )


def ray_ingest(
    paths: Sequence[str],
    out: str | os.PathLike[str],
    store: LoraStore | None = None,
    *,
    predictors: str | None = None,
    labels: LabelTable | None = None,
    metadata: bool = True,
    workers: int | None = None,
    address: str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
    batch_size: int = 8,
    rows_per_part: int = 2048,
) -> RayIngestReport:
    """Ingest ``paths`` (local paths, ``http(s)`` URLs, Hub repo ids) on Ray into Parquet parts under ``out``, then
    into ``store`` (when given; only LoRAs it lacks are added).

    ``workers``: parallel parse tasks, and the size of the CPU encoder pool (default: the CPUs Ray sees); with GPUs
    in the cluster, one encoder actor per GPU. ``labels``, ``metadata``, ``predictors`` as for ``lol ingest``.
    """
    start = time.perf_counter()
    report = RayIngestReport(Path(out))
    tasks, report.labels = make_tasks(paths, labels, cache_dir)
    report.tasks = len(tasks)
    before = done_keys(out)
    todo = [t for t in tasks if t.kind != "path" or t.size < 0 or before.get(t.key) != (t.size, t.mtime_ns)]
    report.skipped = len(tasks) - len(todo)
    done = stored_ids(out) | (set(store.ids()) if store is not None else set())
    loaded: dict[str, str] = {}  # sha256 -> name of each LoRA read, for a sha256-keyed table's report
    writer = ShardWriter(out, rows_per_part)
    by_sha = labels.rows if labels is not None and labels.key == "sha256" else None
    try:  # whatever arrived is written, even when the run fails: a rerun goes on from there
        for row in _run(todo, done, report, workers, address, predictors, metadata, cache_dir, progress, batch_size):
            if row["status"] == "ok" and row["sha256"] in loaded:
                row = row | {"status": "stored"}  # the same file twice in one run: the first one is kept
            writer.add(row, by_sha.get(row["sha256"], {}) if by_sha is not None else None)
            if row["status"] == "ok":
                report.ids.append(row["sha256"])
                loaded[row["sha256"]] = row["key"]
            elif row["status"] == "error":
                report.refused.append((row["path"], row["reason"]))
            else:
                report.skipped += 1
    finally:
        report.parts = writer.close()
    if labels is not None and labels.key == "sha256":
        report.labels = match_labels(labels, [LoraKeys(sha, key) for sha, key in loaded.items()])
    if store is not None:
        report.added = store.load_shards(parts(out))
        store.checkpoint()
    report.seconds = time.perf_counter() - start
    return report


def _run(
    tasks: list[Task],
    done: set[str],
    report: RayIngestReport,
    workers: int | None,
    address: str | None,
    predictors: str | None,
    metadata: bool,
    cache_dir: str | None,
    progress: bool,
    batch_size: int,
) -> Iterator[dict[str, Any]]:
    """The worker rows of ``tasks``, as they finish (Ray started here, and stopped after, unless it was running)."""
    if not tasks:
        return
    import ray
    from rich.progress import Progress

    from lol_engine.scale.work import COLUMNS, EncoderStage, parse_batch

    started = time.perf_counter()
    owned = _start(address, workers)
    try:
        workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // 2)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        data = ray.data.DataContext.get_current()
        data.enable_progress_bars = False  # ours is below
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        done_ref = ray.put(np.array(sorted(done), dtype="S64"))
        blocks = min(len(tasks), max(4 * workers, -(-len(tasks) // 64)), 20_000)  # ≤ 64 tasks a block: steady
        items = ray.data.from_items([t.to_row() for t in tasks], override_num_blocks=blocks)
        dataset = items.map_batches(
            parse_batch,
            batch_size=batch_size,
            batch_format="numpy",
            fn_kwargs={"done": [done_ref], "metadata": metadata, "predictors": predictors, "cache_dir": cache_dir},
            compute=ray.data.TaskPoolStrategy(size=workers),
            num_cpus=1,
        )
        dataset = dataset.map_batches(
            EncoderStage,
            batch_size=64,
            batch_format="numpy",
            fn_constructor_kwargs={"predictors": predictors},
            compute=ray.data.ActorPoolStrategy(size=min(gpus, workers) if gpus else workers),
            num_cpus=1,
            num_gpus=1 if gpus else 0,
        )
        seen: set[int] = set()
        with Progress(disable=not progress) as bar:
            task = bar.add_task("ingest (ray)", total=len(tasks))
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                if not report.startup_seconds:
                    report.startup_seconds = time.perf_counter() - started
                n = len(batch["seq"])
                for i in range(n):
                    row = {name: batch[name][i] for name in COLUMNS if name != "weights"}
                    if int(row["seq"]) not in seen:
                        seen.add(int(row["seq"]))
                        bar.advance(task)
                    yield row
    finally:
        if owned:
            ray.shutdown()


def _start(address: str | None, workers: int | None) -> bool:
    """Connect to ``address``, or start a local Ray whose workers import this checkout; returns whether it was
    started here (and is to be stopped here). Nothing is done when Ray is running in this process already."""
    import ray

    if ray.is_initialized():
        return False
    env = {k: os.environ[k] for k in _PASSED_ENV if k in os.environ}
    if address is not None:  # a cluster: lol-explorer is installed in its image; only the settings travel
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
        return True
    python_path = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
    cpus = max(os.cpu_count() or 1, 2 * (workers or 1))  # room for the parse tasks and the encoder actors
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        runtime_env={"env_vars": env | {"PYTHONPATH": python_path}},
        log_to_driver=False,
    )
    return True
