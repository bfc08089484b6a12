"""Neighbour indexes: cosine top-k over one encoder's stored embeddings, exact when small, HNSW (faiss) when large.

A :class:`NeighbourIndex` holds the L2-normalised rows of one *partition*: one encoder's embeddings, split by base
family for the fingerprint (fingerprints of different bases are never compared) and whole for any other encoder.
Below :data:`EXACT_MAX_ROWS` rows, or without faiss installed, a search is an exact NumPy scan (``x̂ @ q̂``), the
reference every other path is tested against. Above it, a faiss ``IndexHNSWFlat`` over the same unit vectors (inner
product = cosine) proposes ``max(4k, 64)`` candidates, which are re-scored exactly from the rows kept here, so
similarities are exact and only the recall is approximate (≥ 0.95 at k = 10, tested; the benchmark reports it).

:class:`NeighbourIndexes` keeps the partitions of a store: loaded per encoder on first use, grown in place by
:meth:`~NeighbourIndexes.add` (the explorer's add), brought up to date by :meth:`~NeighbourIndexes.sync` (after an
ingest) and rebuilt by :meth:`~NeighbourIndexes.rebuild` (``lol index build``). HNSW partitions persist beside the
database in ``<db>.ann/`` (never for ``:memory:``): ``index.faiss`` (``faiss.write_index``), ``ids.json`` (label →
store id) and ``manifest.json`` (encoder, family, dim, count, parameters, and the sha256 of both files and of the
stored vectors they were built from). Each file is written to a temporary name and moved into place, the manifest
last; on load a file whose digest differs (a torn write, a corrupt file), a stored vector that changed, a deleted
id or another dimension makes the partition rebuild (one log line says why); ids stored since are added
incrementally. Nothing is unpickled; faiss is imported only inside functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lol_engine.errors import StoreError

if TYPE_CHECKING:
    from lol_engine.store import LoraStore

__all__ = [
    "EXACT_MAX_ROWS",
    "RERANK_CANDIDATES",
    "IndexStatus",
    "NeighbourIndex",
    "NeighbourIndexes",
    "faiss_available",
    "index_folder",
]

log = logging.getLogger(__name__)

EXACT_MAX_ROWS = 10_000  # a partition this small is searched exactly (NumPy, a few ms); larger ones use HNSW
HNSW_M = 32  # graph degree: recall ≥ 0.99 at 100k-200k rows of 100-128 dims (docs/SCALE.md)
EF_CONSTRUCTION = 80
EF_SEARCH = 512  # at least the candidates asked for; 128 / 256 / 512 gave recall@10 .94 / .98 / .998 at 40k rows
RERANK_CANDIDATES = 256  # fingerprint candidates whose exact ΔW cosine the explorer computes per query
SAVE_EVERY = 1_000  # rows added to a persisted partition before its file is written again
_FORMAT = 1  # manifest version


def faiss_available() -> bool:
    """Whether faiss (the ``scale`` extra) can be imported; without it every search is exact."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def index_folder(db_path: str) -> Path | None:
    """Where the indexes of the database ``db_path`` persist (``<db>.ann/``); None for ``:memory:``."""
    return None if db_path == ":memory:" else Path(f"{db_path}.ann")


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero: similarity 0 to everything)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class IndexStatus:
    """One partition as the next load would find it: encoder, family (None: not split by family), stored rows,
    kind (``"exact"`` or ``"hnsw"``), size of its files, rows stored but not in its file, and its state in words."""

    encoder: str
    family: str | None
    rows: int
    kind: str
    file_bytes: int
    stale: int
    state: str


class NeighbourIndex:
    """Cosine top-k over one partition, keyed by store id; exact below ``exact_max_rows`` rows, else HNSW."""

    def __init__(self, encoder: str, family: str | None, dim: int, exact_max_rows: int = EXACT_MAX_ROWS) -> None:
        self.encoder, self.family, self.dim = encoder, family, dim
        self.exact_max_rows = exact_max_rows
        self.ids: list[str] = []
        self._pos: dict[str, int] = {}
        self._x = np.zeros((0, dim), dtype=np.float32)  # (n, dim) unit rows, row i = faiss label i
        self._raw = np.zeros((0, dim), dtype=np.float32)  # the stored vectors as given (digest in the manifest)
        self._hnsw: Any = None
        self.saved = 0  # rows in the persisted file

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def kind(self) -> str:
        """``"hnsw"`` when searched through the faiss graph, else ``"exact"``."""
        return "exact" if self._hnsw is None else "hnsw"

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> int:
        """Add rows not indexed yet (ids already present are skipped); returns how many were added."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        seen: set[str] = set()
        keep = []
        for k, i in enumerate(ids):
            if i not in self._pos and i not in seen:
                seen.add(i)
                keep.append(k)
        if not keep:
            return 0
        unit = _unit(vectors[keep])
        for k in keep:
            self._pos[ids[k]] = len(self.ids)
            self.ids.append(ids[k])
        self._raw = np.concatenate([self._raw, vectors[keep]])
        self._x = np.concatenate([self._x, unit])
        if self._hnsw is not None:
            self._hnsw.add(unit)
        elif len(self.ids) >= self.exact_max_rows and faiss_available():
            self._build_hnsw()
        return len(keep)

    def holds(self, stored: Mapping[str, np.ndarray]) -> bool:
        """Whether every indexed row is in ``stored`` (``{id: vector}``) with the same vector: then the rows of
        ``stored`` not indexed yet can simply be added."""
        if any(i not in stored for i in self.ids):
            return False
        now = np.array([stored[i] for i in self.ids], dtype=np.float32).reshape(len(self.ids), self.dim)
        return bool(np.array_equal(now, self._raw))

    def _build_hnsw(self) -> None:
        import faiss

        index = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = EF_CONSTRUCTION
        index.add(self._x)
        self._hnsw = index

    def search(self, vector: np.ndarray, k: int = 10, exclude: str | None = None) -> list[tuple[str, float]]:
        """The ``k`` nearest rows by cosine: ``[(id, similarity)]``, most similar first (ties by id)."""
        n = len(self.ids)
        if n == 0 or k <= 0:
            return []
        q = _unit(np.asarray(vector, dtype=np.float32).reshape(1, self.dim))[0]
        want = k + (exclude is not None)
        wide = max(min(4 * want, want + 256), 64)  # oversampled for recall; re-scored exactly below
        if self._hnsw is None or wide >= n:  # an exact scan of every row
            rows = np.arange(n)
            sims = self._x @ q
        else:
            self._hnsw.hnsw.efSearch = max(EF_SEARCH, wide)
            _, labels = self._hnsw.search(q[None, :], wide)
            rows = labels[0][labels[0] >= 0]
            sims = self._x[rows] @ q  # exact cosines of the candidates, from the rows kept here
        pick = np.arange(len(rows))
        if len(rows) > want:  # keep the best `want` (and any row tied with the last of them) before sorting
            cut = float(sims[np.argpartition(-sims, want - 1)[:want]].min())
            pick = np.flatnonzero(sims >= cut)
        order = sorted(pick.tolist(), key=lambda j: (-float(sims[j]), self.ids[rows[j]]))
        out = [(self.ids[rows[j]], float(sims[j])) for j in order if self.ids[rows[j]] != exclude]
        return out[:k]

    # ------------------------------------------------------------------ persistence
    def manifest(self) -> dict[str, Any]:
        """What the persisted file holds and was built from."""
        return {
            "format": _FORMAT,
            "encoder": self.encoder,
            "family": self.family,
            "dim": self.dim,
            "count": len(self.ids),
            "params": {"M": HNSW_M, "efConstruction": EF_CONSTRUCTION},
            "vectors_sha256": self.vectors_digest(len(self.ids)),
        }

    def vectors_digest(self, count: int) -> str:
        """sha256 of the first ``count`` stored vectors (float32, label order)."""
        return _digest(np.ascontiguousarray(self._raw[:count]).tobytes())

    def save(self, folder: Path) -> None:
        """Write the HNSW partition into ``folder`` (each file atomically; the manifest last). Exact ones: nothing."""
        if self._hnsw is None:
            return
        import faiss

        folder.mkdir(parents=True, exist_ok=True)
        manifest = self.manifest()
        ids_bytes = json.dumps(self.ids).encode()
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=folder)
        try:
            faiss.write_index(self._hnsw, os.path.join(tmp, "index.faiss"))
            manifest["index_sha256"] = _digest(Path(tmp, "index.faiss").read_bytes())
            manifest["ids_sha256"] = _digest(ids_bytes)
            Path(tmp, "ids.json").write_bytes(ids_bytes)
            Path(tmp, "manifest.json").write_text(json.dumps(manifest, indent=1))
            for name in ("index.faiss", "ids.json", "manifest.json"):
                os.replace(os.path.join(tmp, name), folder / name)
        finally:
            for leftover in Path(tmp).iterdir():
                leftover.unlink()
            os.rmdir(tmp)
        self.saved = len(self.ids)

    @classmethod
    def load(
        cls,
        folder: Path,
        encoder: str,
        family: str | None,
        stored: Mapping[str, np.ndarray],
        exact_max_rows: int = EXACT_MAX_ROWS,
    ) -> NeighbourIndex:
        """The partition persisted in ``folder``, checked against ``stored`` (``{id: vector}`` now in the store);
        raises :class:`StoreError` saying why when it cannot be used as it is (the caller rebuilds)."""
        import faiss

        try:
            manifest = json.loads((folder / "manifest.json").read_text())
            ids_bytes = (folder / "ids.json").read_bytes()
            index_bytes_digest = _digest((folder / "index.faiss").read_bytes())
        except (OSError, ValueError) as exc:
            raise StoreError(f"unreadable ({exc.__class__.__name__})") from None
        expected = {"format": _FORMAT, "encoder": encoder, "family": family}
        if any(manifest.get(key) != value for key, value in expected.items()):
            raise StoreError("written by another version or for another partition")
        if manifest.get("params") != {"M": HNSW_M, "efConstruction": EF_CONSTRUCTION}:
            raise StoreError("built with other parameters")
        if manifest.get("ids_sha256") != _digest(ids_bytes) or manifest.get("index_sha256") != index_bytes_digest:
            raise StoreError("a file does not match its manifest (torn write or corrupt file)")
        ids = json.loads(ids_bytes)
        missing = [i for i in ids if i not in stored]
        if missing:
            raise StoreError(f"{len(missing)} indexed LoRA(s) are no longer stored")
        dim = int(manifest["dim"])
        if any(len(stored[i]) != dim for i in ids[:1]) or len(ids) != manifest.get("count"):
            raise StoreError("the dimension or count changed")
        part = cls(encoder, family, dim, exact_max_rows)
        raw = np.array([stored[i] for i in ids], dtype=np.float32).reshape(-1, dim)
        if _digest(np.ascontiguousarray(raw).tobytes()) != manifest.get("vectors_sha256"):
            raise StoreError("stored embeddings changed since it was built")
        hnsw = faiss.read_index(str(folder / "index.faiss"))
        if hnsw.ntotal != len(ids) or hnsw.d != dim:
            raise StoreError("the index file does not hold the manifest's rows")
        part.ids, part._pos = list(ids), {i: k for k, i in enumerate(ids)}
        part._raw, part._x, part._hnsw, part.saved = raw, _unit(raw), hnsw, len(ids)
        return part


def _slug(encoder: str, family: str | None) -> str:
    text = f"{encoder}--{family or 'all'}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60] + "-" + _digest(text.encode())[:8]


class NeighbourIndexes:
    """The neighbour indexes of one store, per encoder (and per base family for ``by_family`` encoders).

    ``folder``: where HNSW partitions persist (default :func:`index_folder` of the store); ``persist=False`` keeps
    them in memory only.
    Thread-safe: one lock guards loading and growing; searches of a loaded partition hold it too (they take
    milliseconds).
    """

    def __init__(
        self,
        store: LoraStore,
        folder: str | os.PathLike[str] | None = None,
        exact_max_rows: int | None = None,
        by_family: Sequence[str] = ("fingerprint", "dw-sketch"),
        persist: bool = True,
    ) -> None:
        self.store = store
        self.folder = None if not persist else Path(folder) if folder is not None else index_folder(store.path)
        self.exact_max_rows = EXACT_MAX_ROWS if exact_max_rows is None else exact_max_rows
        self.by_family = set(by_family)
        self._parts: dict[str, dict[str | None, NeighbourIndex]] = {}
        self._lock = threading.RLock()

    def _family(self, encoder: str, family: str) -> str | None:
        return family if encoder in self.by_family else None

    def loaded(self, encoder: str) -> dict[str | None, NeighbourIndex]:
        """The partitions of ``encoder`` (loaded from disk and the store on first use)."""
        with self._lock:
            if encoder not in self._parts:
                self._parts[encoder] = self._load(encoder, rebuild=False)
            return self._parts[encoder]

    def _load(
        self, encoder: str, rebuild: bool, current: Mapping[str | None, NeighbourIndex] | None = None
    ) -> dict[str | None, NeighbourIndex]:
        """The partitions of ``encoder`` as stored now: ``current`` ones (in memory) grown where the store only
        added rows, else read from disk and grown, else built."""
        ids, families, x = self.store.index_rows(encoder)
        groups: dict[str | None, list[int]] = {}
        for k, family in enumerate(families):
            groups.setdefault(self._family(encoder, family), []).append(k)
        parts: dict[str | None, NeighbourIndex] = {}
        for key, rows in groups.items():
            stored = {ids[k]: x[k] for k in rows}
            part = None if current is None else current.get(key)
            keep = part is not None and part.dim == x.shape[1] and part.holds(stored)
            parts[key] = self._partition(encoder, key, stored, x.shape[1], rebuild, part if keep else None)
        return parts

    def _partition(
        self,
        encoder: str,
        family: str | None,
        stored: dict[str, np.ndarray],
        dim: int,
        rebuild: bool,
        part: NeighbourIndex | None = None,
    ) -> NeighbourIndex:
        folder = None if self.folder is None else self.folder / _slug(encoder, family)
        if (
            part is None
            and folder is not None
            and not rebuild
            and len(stored) >= self.exact_max_rows
            and faiss_available()
        ):
            if (folder / "manifest.json").exists():
                try:
                    part = NeighbourIndex.load(folder, encoder, family, stored, self.exact_max_rows)
                except StoreError as exc:
                    log.warning("neighbour index %s: %s; rebuilding it (%d rows)", folder, exc, len(stored))
            else:
                log.info("neighbour index %s: none on disk; building it (%d rows)", folder, len(stored))
        if part is None:
            part = NeighbourIndex(encoder, family, dim, self.exact_max_rows)
        new = [i for i in stored if i not in part._pos]
        start = time.perf_counter()
        part.add(new, np.array([stored[i] for i in new], dtype=np.float32).reshape(len(new), dim))
        if folder is not None and part.kind == "hnsw" and (part.saved == 0 or len(part) - part.saved >= SAVE_EVERY):
            part.save(folder)
            log.info("neighbour index %s: %d rows saved (%.1f s)", folder, len(part), time.perf_counter() - start)
        return part

    def add(self, lora_id: str, family: str, embeddings: Mapping[str, np.ndarray]) -> None:
        """Index a newly stored LoRA in the partitions already loaded (others pick it up when they load)."""
        with self._lock:
            for encoder, vector in embeddings.items():
                parts = self._parts.get(encoder)
                if parts is None:
                    continue
                key = self._family(encoder, family)
                v = np.asarray(vector, dtype=np.float32).reshape(1, -1)
                if key not in parts:
                    parts[key] = NeighbourIndex(encoder, key, v.shape[1], self.exact_max_rows)
                part = parts[key]
                if v.shape[1] == part.dim:
                    part.add([lora_id], v)

    def sync(self) -> None:
        """Bring every loaded encoder up to date with the store (after an ingest): new rows are added, a changed
        or deleted one makes its partition rebuild."""
        with self._lock:
            for encoder, current in list(self._parts.items()):
                self._parts[encoder] = self._load(encoder, rebuild=False, current=current)

    def rebuild(self, encoders: Sequence[str] | None = None) -> dict[str, float]:
        """Rebuild (and persist) the indexes of ``encoders`` (default: every stored one); ``{encoder: seconds}``."""
        out = {}
        with self._lock:
            for encoder in encoders or list(self.store.encoders()):
                start = time.perf_counter()
                self._parts[encoder] = self._load(encoder, rebuild=True)
                out[encoder] = time.perf_counter() - start
        return out

    def search(
        self, encoder: str, vector: np.ndarray, k: int = 10, exclude: str | None = None, family: str | None = None
    ) -> list[tuple[str, float]]:
        """Cosine top-k among ``encoder``'s embeddings (only ``family``'s for a ``by_family`` encoder)."""
        parts = self.loaded(encoder)
        part = parts.get(self._family(encoder, family or "unknown"))
        if part is None or np.asarray(vector).size != part.dim:
            return []
        with self._lock:
            return part.search(vector, k, exclude)

    def is_loaded(self, encoder: str) -> bool:
        """Whether ``encoder``'s partitions are in memory."""
        return encoder in self._parts

    def vector(self, encoder: str, lora_id: str, family: str | None = None) -> np.ndarray | None:
        """The stored ``encoder`` embedding of ``lora_id`` as indexed (None when its partition does not hold it):
        saves the store a point query."""
        part = self.loaded(encoder).get(self._family(encoder, family or "unknown"))
        pos = None if part is None else part._pos.get(lora_id)
        return None if part is None or pos is None else part._raw[pos].copy()

    def rows(self, encoder: str, family: str | None = None) -> int:
        """Rows indexed for ``encoder`` (in ``family``'s partition for a ``by_family`` encoder)."""
        part = self.loaded(encoder).get(self._family(encoder, family or "unknown"))
        return 0 if part is None else len(part)

    def status(self) -> list[IndexStatus]:
        """One line per partition of every stored encoder, as a load would find it (nothing is built or written)."""
        out = []
        for encoder in self.store.encoders():
            ids, families, x = self.store.index_rows(encoder)
            groups: dict[str | None, dict[str, np.ndarray]] = {}
            for k, family in enumerate(families):
                groups.setdefault(self._family(encoder, family), {})[ids[k]] = x[k]
            for key, stored in sorted(groups.items(), key=lambda item: str(item[0])):
                out.append(self._status(encoder, key, stored))
        return out

    def _status(self, encoder: str, family: str | None, stored: dict[str, np.ndarray]) -> IndexStatus:
        if len(stored) < self.exact_max_rows or not faiss_available():
            return IndexStatus(encoder, family, len(stored), "exact", 0, 0, "exact scan (nothing on disk)")
        folder = None if self.folder is None else self.folder / _slug(encoder, family)
        if folder is None or not (folder / "manifest.json").exists():
            return IndexStatus(encoder, family, len(stored), "hnsw", 0, len(stored), "not built (built on first use)")
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        try:
            part = NeighbourIndex.load(folder, encoder, family, stored, self.exact_max_rows)
        except StoreError as exc:
            return IndexStatus(encoder, family, len(stored), "hnsw", size, len(stored), f"{exc} (rebuilt on load)")
        stale = len(stored) - len(part)
        state = "up to date" if stale == 0 else f"{stale} row(s) behind (added on load)"
        return IndexStatus(encoder, family, len(stored), "hnsw", size, stale, state)
