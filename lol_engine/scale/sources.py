"""What a distributed ingest reads: tasks made from paths, a list file (paths or URLs) and Hugging Face repos.

A :class:`Task` is one unit of work a worker resolves on its own: a local path (a file, a LoRA folder; folders of
LoRAs and zoos are expanded here, on the driver, by :func:`lol_engine.ingest.lora_sources`), an ``http(s)`` URL
(downloaded by the worker, size-bounded) or a Hub repo id (fetched by the worker through
:func:`lol_engine.hub.fetch_repo`; a repo may hold several LoRAs). Tasks are plain data, so they travel to workers as
table rows.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lol_engine.errors import BadRequestError, LoraFormatError, NotFoundError
from lol_engine.hub import is_repo_id
from lol_engine.ingest import LoraSource, lora_sources, table_labels
from lol_engine.labels import LabelMatch, LabelTable
from lol_engine.lora.safe_io import ReadLimits

__all__ = ["MAX_LIST_LINES", "Task", "download", "hub_repo_ids", "is_url", "make_tasks", "read_list", "url_name"]

MAX_LIST_LINES = 10_000_000
MAX_LIST_BYTES = 2 * 2**30


@dataclass(frozen=True)
class Task:
    """One thing to ingest: ``kind`` is ``path``, ``url`` or ``hub``; ``target`` the path, URL or repo id."""

    seq: int
    kind: str
    target: str
    name: str | None = None
    zoo: str | None = None
    labels_json: str = "{}"  # the zoo manifest's labels, then a name- or path-keyed table's
    size: int = -1  # of a local path, for resuming without reading it again (-1: unknown)
    mtime_ns: int = -1
    cwd: str = ""  # the driver's folder, when the path was given relative: the LoRA's source is stored relative

    @property
    def key(self) -> str:
        """What resuming recognises the task by."""
        return f"{self.kind}:{self.target}"

    def to_row(self) -> dict[str, Any]:
        """The task as a table row (no None: Arrow columns keep one type)."""
        return asdict(self) | {"name": self.name or "", "zoo": self.zoo or ""}


def read_list(path: str | os.PathLike[str]) -> list[str]:
    """The paths, URLs or repo ids of a list file: one a line; blank lines and ``#`` comments are skipped."""
    file = Path(path)
    if not file.is_file():
        raise NotFoundError(f"{file.name}: no such list file")
    if file.stat().st_size > MAX_LIST_BYTES:
        raise BadRequestError(f"{file.name}: a list file over {MAX_LIST_BYTES:,} bytes")
    lines = [line.strip() for line in file.read_text(encoding="utf-8", errors="replace").splitlines()]
    out = [line for line in lines if line and not line.startswith("#")]
    if len(out) > MAX_LIST_LINES:
        raise BadRequestError(f"{file.name}: more than {MAX_LIST_LINES:,} entries")
    return out


def is_url(text: str) -> bool:
    """Whether ``text`` names a URL (any scheme; only http and https are read)."""
    return "://" in text[:16]


def hub_repo_ids(text: str, limit: int = 1000) -> list[str]:
    """Repo ids from ``--hub``: comma-separated ids, or else a search query answered by the Hub's model listing
    (LoRA adapters matching the words, most downloaded first, at most ``limit``)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if items and all(is_repo_id(t) for t in items):
        return items
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise BadRequestError(
            f"--hub {text[:100]!r} is a search, and this machine works offline (HF_HUB_OFFLINE): give repo ids "
            "(owner/name, comma-separated) that are in the local cache"
        )
    try:
        models = HfApi().list_models(search=text, filter="lora", sort="downloads", limit=limit)
        return [m.id for m in models]
    except Exception as exc:  # network or Hub failure: one clear message, no server detail
        raise NotFoundError(f"the Hub search for {text[:100]!r} failed ({type(exc).__name__})") from None


def make_tasks(
    paths: Sequence[str], table: LabelTable | None = None, cache_dir: str | None = None
) -> tuple[list[Task], LabelMatch | None]:
    """Tasks for ``paths`` (local paths, ``http(s)`` URLs, Hub repo ids), in order, and how a ``name``- or
    ``path``-keyed ``table`` matched them (joined here, before anything is read, as :func:`lol_engine.ingest.ingest`
    does; Hub LoRAs are named only once fetched, so such a table does not reach them)."""
    local = [p for p in paths if not is_url(p) and (Path(p).exists() or not is_repo_id(p))]
    sources = lora_sources(local, cache_dir)
    match, by_source = table_labels(table, sources, [p for p in local if Path(p).is_dir()])
    tasks: list[Task] = []
    for source in sources:
        labels = {**source.labels, **by_source.get(id(source), {})}
        tasks.append(_path_task(len(tasks), source, json.dumps(labels, default=_plain)))
    for raw in paths:
        if is_url(raw):
            tasks.append(Task(len(tasks), "url", raw))
        elif not Path(raw).exists() and is_repo_id(raw):
            tasks.append(Task(len(tasks), "hub", raw))
    return tasks, match


def _path_task(seq: int, source: LoraSource, labels_json: str) -> Task:
    path = source.path.absolute()
    try:
        stat = path.stat()
        size, mtime = stat.st_size, stat.st_mtime_ns
    except OSError:
        size, mtime = -1, -1  # refused by the worker, with the reason
    cwd = "" if source.path.is_absolute() else os.getcwd()
    return Task(seq, "path", str(path), source.name, source.zoo, labels_json, size, mtime, cwd)


def _plain(value: Any) -> Any:
    """NumPy scalars and arrays of a manifest, as JSON does them."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"a label of type {type(value).__name__} is not JSON")


def url_name(url: str) -> str:
    """The display name of a LoRA read from a URL: its file's stem."""
    stem = Path(urllib.parse.urlsplit(url).path).name
    return stem.removesuffix(".safetensors") or "download"


@contextmanager
def download(url: str, limits: ReadLimits | None = None, timeout: float = 60.0) -> Iterator[Path]:
    """A temporary local copy of the ``http(s)`` file at ``url``, at most ``limits.max_file_bytes`` long; removed
    on exit. Refuses other schemes and, with ``HF_HUB_OFFLINE=1``, any download (:class:`LoraFormatError`)."""
    limit = (limits or ReadLimits()).max_file_bytes
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise LoraFormatError(f"{scheme or 'this'} URLs are not read: give an http(s) URL or a local path")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise LoraFormatError("this machine works offline (HF_HUB_OFFLINE): URLs are not downloaded")
    with tempfile.TemporaryDirectory(prefix="lol-url-") as folder:
        target = Path(folder) / f"{url_name(url)}.safetensors"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, target.open("wb") as out:
                declared = int(response.headers.get("Content-Length") or 0)
                if declared > limit:
                    raise LoraFormatError(f"the download is {declared:,} bytes, over the limit of {limit:,}")
                total = 0
                while chunk := response.read(2**20):
                    total += len(chunk)
                    if total > limit:
                        raise LoraFormatError(f"the download is over the limit of {limit:,} bytes")
                    out.write(chunk)
        except OSError as exc:  # URLError, HTTPError, timeouts: the kind only, no server detail
            raise LoraFormatError(f"the download failed ({type(exc).__name__})") from None
        yield target
