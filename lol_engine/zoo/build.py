"""Building a zoo: deterministic, resumable, parallel, with a progress bar and a Parquet manifest.

Layout of a zoo folder::

    zoo.json                 recipe, version, settings, package versions: a rebuild must match it
    base/                    the recipe's cached base model and data splits
    loras/00012/             one real PEFT adapter per LoRA (save_pretrained), stored fp16, plus labels.json
    manifest.parquet         one row per LoRA: path, split, hyperparameters (hp_*), labels (y_*), base identity

A LoRA folder appears only once complete (it is trained in ``00012.partial`` and renamed), so an interrupted build
continues where it stopped. A large zoo can be built in chunks (``upto``): LoRAs ``0 .. upto-1`` of the full zoo are
built and the manifest lists them; each chunk can be committed and a later session, on any machine, continues with a
larger ``upto``. The LoRAs of a chunk are exactly those of the full zoo (seeds and choices depend on the index only).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from lol_engine.errors import BadRequestError
from lol_engine.zoo.manifest import write_manifest
from lol_engine.zoo.recipe import Recipe, ZooSettings, lora_seed
from lol_engine.zoo.registry import get_recipe

__all__ = ["ZooMismatchError", "build_zoo"]


class ZooMismatchError(BadRequestError, RuntimeError):
    """The output folder holds a zoo built with other settings."""


def _versions() -> dict[str, str]:
    import peft
    import torch

    import lol_engine

    return {
        "lol_engine": lol_engine.__version__,
        "torch": torch.__version__,
        "peft": peft.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _zoo_record(recipe: Recipe, settings: ZooSettings, n: int) -> dict[str, Any]:
    return {"recipe": recipe.name, "recipe_version": recipe.version, "n": n, "settings": settings.to_dict()}


def _check_or_write_record(out: Path, record: dict[str, Any]) -> None:
    path = out / "zoo.json"
    if path.exists():
        existing = json.loads(path.read_text())
        mine = {k: existing.get(k) for k in record}
        if mine != record:
            raise ZooMismatchError(f"{out} holds a zoo built with {mine}, not {record}; use another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**record, "versions": _versions()}, indent=2))


# Worker state: one recipe context per process, built once by the initializer.
_WORKER: dict[str, Any] = {}


def _init_worker(name: str, base_dir: str, settings: ZooSettings) -> None:
    import torch

    torch.set_num_threads(settings.threads)
    recipe = get_recipe(name)
    _WORKER.update(recipe=recipe, context=recipe.prepare(Path(base_dir), settings))


def _run_job(index: int, choices: dict[str, Any], seed: int, lora_dir: str) -> tuple[int, float]:
    import torch

    recipe, context = _WORKER["recipe"], _WORKER["context"]
    final = Path(lora_dir)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    start = time.perf_counter()
    torch.manual_seed(seed)
    labels = recipe.train_and_label(context, choices, seed, partial)
    seconds = time.perf_counter() - start
    record = {"index": index, "seed": seed, "choices": choices, "labels": labels, "seconds": seconds}
    (partial / "labels.json").write_text(json.dumps(record, indent=1))
    os.replace(partial, final)  # the LoRA exists only once complete
    return index, seconds


def _jobs(
    recipe: Recipe, context: Any, settings: ZooSettings, n: int, loras: Path
) -> Iterator[tuple[int, dict[str, Any], int, str]]:
    for index in range(n):
        seed = lora_seed(settings.seed, index)
        choices = recipe.sample(context, index, np.random.default_rng(seed), settings)
        yield index, choices, seed, str(loras / f"{index:05d}")


def build_zoo(
    name: str,
    out: str | os.PathLike[str],
    settings: ZooSettings | None = None,
    *,
    workers: int = 1,
    progress: bool = True,
    on_done: Callable[[int], None] | None = None,
    upto: int | None = None,
) -> Path:
    """Build (or finish building) zoo ``name`` in ``out``; return the manifest's path.

    ``upto``: build only the first ``upto`` LoRAs of the zoo (a resumable chunk); the manifest then lists those.
    """
    import torch

    if upto is not None and upto < 1:
        raise BadRequestError(f"upto must be positive, got {upto}")
    threads = torch.get_num_threads()
    try:
        return _build(name, Path(out), settings or ZooSettings(), workers, progress, on_done, upto)
    finally:
        torch.set_num_threads(threads)  # the in-process worker set its own thread count; give the caller theirs back


def _build(
    name: str,
    out: Path,
    settings: ZooSettings,
    workers: int,
    progress: bool,
    on_done: Callable[[int], None] | None,
    upto: int | None,
) -> Path:
    recipe = get_recipe(name)
    n = settings.n if settings.n is not None else recipe.default_n(settings)
    _check_or_write_record(out, _zoo_record(recipe, settings, n))
    built = n if upto is None else min(upto, n)
    loras = out / "loras"
    loras.mkdir(exist_ok=True)
    _init_worker(name, str(out / "base"), settings)  # builds and caches the base once, before any worker starts
    jobs = _jobs(recipe, _WORKER["context"], settings, built, loras)
    pending = [job for job in jobs if not Path(job[3], "labels.json").exists()]
    with _progress(progress) as bar:
        task = bar.add_task(f"zoo {name}", total=built, completed=built - len(pending))
        for index, _seconds in _execute(pending, name, out, settings, workers):
            bar.advance(task)
            if on_done is not None:
                on_done(index)
    return write_manifest(out, recipe, settings, built, recipe.base_identity(_WORKER["context"]))


def _execute(
    pending: list[tuple[int, dict[str, Any], int, str]], name: str, out: Path, settings: ZooSettings, workers: int
) -> Iterator[tuple[int, float]]:
    if workers <= 1 or len(pending) <= 1:
        for job in pending:
            yield _run_job(*job)
        return
    context = get_context("spawn")  # fork after torch has started threads is unsafe
    initargs = (name, str(out / "base"), settings)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=initargs) as pool:
        futures = [pool.submit(_run_job, *job) for job in pending]
        for future in as_completed(futures):
            yield future.result()


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, disable=not enabled)
