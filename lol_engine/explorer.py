"""The explorer service behind the app: a store, the shipped predictors, 2-D maps and a cache of loaded LoRAs.

Every app action is a method here or a function in ``app/handlers.py``; none needs gradio. Thread-safe: the app calls
it from many request threads at once (the store hands each call its own cursor; the caches below take a lock).

- :meth:`Explorer.analyse` reads an upload and computes everything shown about it, storing nothing;
  :meth:`Explorer.add` stores an analysed upload (a copy of its files under ``<data dir>/uploads/<sha256>/``) and
  places it on every map it belongs to.
- Neighbours are exact: ΔW cosine over shared modules (:mod:`lol_engine.similarity`) against every stored LoRA that
  shares a module with the query (LoRAs sharing none fall back to the fingerprint's cosine), or, for stored LoRAs,
  the cosine of any encoder's embeddings (:meth:`Explorer.neighbours_by_embedding`).
- Maps: one per encoder (``fingerprint`` over everything, ``lol:<predictor>`` over the LoRAs that fit it), fitted with
  :func:`lol_engine.maps.fit_map` and stored. A new LoRA is placed with the fitted reducer's ``transform`` when the map
  was fitted in this process, else at the similarity-weighted mean of its 10 nearest fitted neighbours' coordinates
  (no refit either way; :meth:`Explorer.fit_maps` refits on request).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lol_engine.errors import LoraFormatError
from lol_engine.ingest import FINGERPRINT, encode, ingest, shipped_predictors
from lol_engine.lora.config import read_adapter_config
from lol_engine.lora.parse import load_lora, locate_lora
from lol_engine.lora.safe_io import ReadLimits
from lol_engine.lora.weights import LoraWeights
from lol_engine.report import describe
from lol_engine.similarity import cosine_to_many, module_cosines
from lol_engine.train.calibrate import Estimate, estimates_from

__all__ = ["DEFAULT_ZOOS", "Analysis", "Explorer", "Neighbour"]

_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ZOOS = (_ROOT / "data" / "zoo" / "digits", _ROOT / "data" / "zoo" / "fashion-gen")
_CACHE_BYTES = 512 * 2**20  # factors kept in memory for neighbour search


@dataclass
class Analysis:
    """Everything the app shows about one LoRA, computed without storing anything."""

    lora: LoraWeights
    report: dict[str, Any]
    estimates: dict[str, list[Estimate]]  # per matching predictor
    predictions: dict[str, dict[str, float]]
    embeddings: dict[str, np.ndarray]
    files: tuple[Path, ...]  # the LoRA file and, if given, its adapter_config.json
    seconds: float

    @property
    def sha256(self) -> str:
        """The LoRA file's sha256, its identity in the store."""
        return str(self.lora.meta.sha256)


@dataclass(frozen=True)
class Neighbour:
    """A stored LoRA close to a query: ``by`` is ``"ΔW cosine"`` or ``"fingerprint cosine"``."""

    id: str
    name: str
    zoo: str | None
    similarity: float
    by: str


def _factor_bytes(lora: LoraWeights) -> int:
    return sum(m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size() for m in lora)


class Explorer:
    """A collection with its predictors and maps. Build it with :meth:`open`."""

    def __init__(self, store: Any, predictors: Mapping[str, Any], data_dir: str | os.PathLike[str]) -> None:
        self.store = store
        self.predictors = dict(predictors)
        self.data_dir = Path(data_dir)
        self.uploads_dir = self.data_dir / "uploads"
        self._lock = threading.RLock()
        self._cache: OrderedDict[str, LoraWeights] = OrderedDict()
        self._cache_bytes = 0
        self._maps: dict[
            str, tuple[Any, list[str], np.ndarray]
        ] = {}  # encoder -> (EmbeddingMap, ids, x), this process
        self._records: list[dict[str, Any]] | None = None
        self._stored: list[Any] | None = None  # store.all(), cached until the collection changes
        if self.uploads_dir.is_dir():  # staging folders of adds that were killed midway (one writer process)
            for stale in self.uploads_dir.glob(".*"):
                shutil.rmtree(stale, ignore_errors=True)

    @classmethod
    def open(
        cls, db: str | os.PathLike[str] | None = None, predictors_dir: str | os.PathLike[str] | None = None
    ) -> Explorer:
        """Open (or create) the store ``db`` (default ``$LOL_DATA_DIR/lol.duckdb``) with the shipped predictors."""
        from lol_engine.store import LoraStore, default_db_path

        path = Path(db) if db is not None else default_db_path()
        store = LoraStore(path)
        predictors = shipped_predictors(predictors_dir)
        device = os.environ.get("LOL_DEVICE") or _auto_device()
        for predictor in predictors.values():
            predictor.to(device)
        return cls(store, predictors, path.parent)

    def close(self) -> None:
        """Close the store."""
        self.store.close()

    # ---------------------------------------------------------------- collection set-up
    def ensure_default(self, zoos: Iterable[str | os.PathLike[str]] = DEFAULT_ZOOS, progress: bool = True) -> bool:
        """Ingest ``zoos`` into an empty store and fit its maps; returns whether anything was done."""
        done = False
        if self.store.count() == 0:
            ingest([str(Path(z).resolve()) for z in zoos], self.store, self.predictors, progress=progress)
            self._changed()
            done = True
        missing = [name for name in self.encoders() if name not in self.store.maps()]
        if missing:
            self.fit_maps(missing, progress=progress)  # ingest and fit_maps each checkpoint when done
            done = True
        return done

    def encoders(self) -> list[str]:
        """Encoders with at least one stored embedding: ``fingerprint`` first, then ``lol:<predictor>``."""
        names = list(self.store.encoders())
        return sorted(names, key=lambda n: (n != FINGERPRINT, n))

    def fit_maps(self, encoders: Sequence[str] | None = None, progress: bool = False) -> dict[str, float]:
        """(Re)fit the map of each encoder over all LoRAs embedded by it; returns seconds per map."""
        from rich.progress import Progress

        from lol_engine.maps import fit_map

        seconds = {}
        names = list(encoders) if encoders is not None else self.encoders()
        with Progress(disable=not progress) as bar:
            task = bar.add_task("maps", total=len(names))
            for name in names:
                start = time.perf_counter()
                ids, x = self.store.embeddings(name)
                fitted = fit_map(x) if len(ids) else None
                if fitted is not None:
                    self.store.set_projection(name, ids, fitted.coords)
                    with self._lock:
                        self._maps[name] = (fitted, ids, x)
                seconds[name] = time.perf_counter() - start
                bar.advance(task)
        self.store.checkpoint()
        return seconds

    # ---------------------------------------------------------------- one LoRA
    def analyse(
        self, lora_file: str | os.PathLike[str], config_file: str | os.PathLike[str] | None = None,
        limits: ReadLimits | None = None,
    ) -> Analysis:  # fmt: skip
        """Read an (untrusted) LoRA file or PEFT folder: its report, predictions and embeddings. Stores nothing.

        ``config_file`` is an ``adapter_config.json`` uploaded separately (a folder's own config is found by itself).
        """
        start = time.perf_counter()
        limits = limits or ReadLimits()
        if config_file is None:
            lora_file, config_file = locate_lora(lora_file)  # a file, or a PEFT folder with its config
        config = read_adapter_config(Path(config_file), limits) if config_file else None
        lora = load_lora(lora_file, limits=limits, config=config)
        report = describe(lora)
        predictions, embeddings = encode(lora, self.predictors)
        per_predictor: dict[str, list[Estimate]] = {}
        for name, targets in predictions.items():  # ranges from the outputs encode() computed: no second forward
            task = self.predictors[name].task
            raw = targets[task.label] if task.kind in ("regression", "binary") else targets
            per_predictor[name] = estimates_from(self.predictors[name], raw)
        files = (Path(lora_file),) + ((Path(config_file),) if config_file else ())
        return Analysis(lora, report, per_predictor, predictions, embeddings, files, time.perf_counter() - start)

    def add(self, analysis: Analysis, name: str | None = None) -> str:
        """Store an analysed upload: its files are copied under ``uploads/<sha256>/`` first, then one transaction.

        Adding a LoRA that is already stored changes nothing and returns its id.
        """
        lora_id = analysis.sha256
        if self.store.get(lora_id) is not None:
            return lora_id
        folder = self.uploads_dir / lora_id
        created = False
        if not folder.is_dir():
            self.uploads_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{lora_id[:12]}-", dir=self.uploads_dir))
            try:
                shutil.copyfile(analysis.files[0], staging / "adapter_model.safetensors")
                if len(analysis.files) > 1:
                    shutil.copyfile(analysis.files[1], staging / "adapter_config.json")
                os.replace(staging, folder)  # atomic: a folder is complete or absent
                created = True
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
                if not folder.is_dir():
                    raise
        try:
            stored = load_lora(folder, limits=ReadLimits())
            if stored.meta.sha256 != lora_id:
                raise LoraFormatError(f"stored copy of {lora_id[:12]} does not match the upload")
            display = name or Path(analysis.lora.meta.source).stem
            self.store.add(stored, name=display, embeddings=analysis.embeddings, predictions=analysis.predictions)
        except BaseException:
            if created:  # nothing half-written: the copy goes with the failed add
                shutil.rmtree(folder, ignore_errors=True)
            raise
        self._changed()
        self._place(lora_id, analysis.embeddings)
        self.store.checkpoint()  # the new rows are in lol.duckdb itself, not only in its .wal
        return lora_id

    def _place(self, lora_id: str, embeddings: Mapping[str, np.ndarray]) -> None:
        """Put a new LoRA on every stored map of an encoder that embedded it (no refit)."""
        stored_maps = self.store.maps()
        for encoder, vector in embeddings.items():
            if encoder not in stored_maps:
                continue
            with self._lock:
                fitted = self._maps.get(encoder)
            if fitted is not None:
                xy = fitted[0].place(vector[None, :])[0]
            else:
                ids, coords = self.store.projection(encoder)
                ref_ids, x = self.store.embeddings(encoder)
                at = {i: k for k, i in enumerate(ref_ids)}
                rows = [at[i] for i in ids if i in at]
                xy = neighbour_placement(x[rows], coords[[k for k, i in enumerate(ids) if i in at]], vector)
            self.store.add_projection(encoder, [lora_id], np.asarray(xy).reshape(1, 2))

    def weights(self, lora_id: str) -> LoraWeights:
        """A stored LoRA's factors (read from its file once, then cached within a memory bound)."""
        with self._lock:
            if lora_id in self._cache:
                self._cache.move_to_end(lora_id)
                return self._cache[lora_id]
        stored = self.store.get(lora_id)
        if stored is None:
            raise KeyError(f"no LoRA {lora_id!r} in the collection")
        source = Path(stored.source)
        if not source.exists() and (self.uploads_dir / lora_id).is_dir():
            source = self.uploads_dir / lora_id  # a restored or moved collection: its uploads lie beside its database
        lora = load_lora(source)
        with self._lock:
            self._cache[lora_id] = lora
            self._cache_bytes += _factor_bytes(lora)
            while self._cache_bytes > _CACHE_BYTES and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= _factor_bytes(old)
        return lora

    def neighbours(self, lora: LoraWeights, k: int = 10, exclude: str | None = None) -> list[Neighbour]:
        """The ``k`` stored LoRAs most similar to ``lora``: exact ΔW cosine if any share a module, else fingerprint."""
        names = {m.name for m in lora}
        records = {r["id"]: r for r in self.records()}
        candidates = [s for s in self._all() if s.id != exclude and names & {m["name"] for m in s.spec}]
        if candidates:
            loras = [self.weights(s.id) for s in candidates]
            sims = cosine_to_many(lora, loras)
            order = [i for i in np.argsort(-np.nan_to_num(sims, nan=-2.0), kind="stable") if not np.isnan(sims[i])]
            return [Neighbour(candidates[i].id, candidates[i].name, candidates[i].zoo, float(sims[i]), "ΔW cosine")
                    for i in order[:k]]  # fmt: skip
        from lol_engine.fingerprint import fingerprint

        hits = self.store.nearest(FINGERPRINT, fingerprint(lora).numpy(), k=k, exclude=exclude)
        return [Neighbour(i, records[i]["name"], records[i]["zoo"], s, "fingerprint cosine") for i, s in hits]

    def neighbours_by_embedding(self, lora_id: str, encoder: str, k: int = 10) -> list[Neighbour]:
        """The ``k`` stored LoRAs nearest to a stored one by cosine of their ``encoder`` embeddings (exact scan)."""
        vector = self.store.embedding(lora_id, encoder)
        if vector is None:
            raise KeyError(f"LoRA {lora_id[:12]} has no {encoder} embedding")
        records = {r["id"]: r for r in self.records()}
        hits = self.store.nearest(encoder, vector, k=k, exclude=lora_id)
        return [Neighbour(i, records[i]["name"], records[i]["zoo"], s, f"{encoder} cosine") for i, s in hits]

    def compare(self, first: str, second: str) -> tuple[float | None, list[tuple[str, float, float, float]]]:
        """Overall ΔW cosine over shared modules (None if none) and per-module rows of :func:`module_cosines`."""
        a, b = self.weights(first), self.weights(second)
        rows = module_cosines(a, b)
        if not rows:
            return None, []
        return float(cosine_to_many(a, [b])[0]), rows

    # ---------------------------------------------------------------- tables for the UI
    def _changed(self) -> None:
        with self._lock:
            self._records = None
            self._stored = None

    def _all(self) -> list[Any]:
        with self._lock:
            if self._stored is not None:
                return self._stored
        stored = self.store.all()
        with self._lock:
            self._stored = stored
        return stored

    def records(self) -> list[dict[str, Any]]:
        """One flat dict per stored LoRA: its columns, ``label:<name>`` and ``pred:<predictor>`` summaries.

        List-valued labels become their sum (e.g. the number of classes); categorical predictions the most likely
        class, binary ones the probability, multilabel ones the number of entries with probability ≥ ½.
        """
        with self._lock:
            if self._records is not None:
                return self._records
        labels = self.store.all_labels()
        predictions = self.store.all_predictions()
        out = []
        for s in self._all():
            row: dict[str, Any] = {"id": s.id, "name": s.name, "zoo": s.zoo or "uploads", "format": s.format,
                                   "base_family": s.base_family, "rank": s.rank_max, "modules": s.n_modules,
                                   "size_kb": round(s.size_bytes / 1024, 1), "dtype": s.dtype,
                                   "added": str(s.added_at)[:19]}  # fmt: skip
            for key, value in sorted(labels.get(s.id, {}).items()):
                row[f"label:{key}"] = sum(value) if isinstance(value, list) else value
            for predictor, targets in sorted(predictions.get(s.id, {}).items()):
                row[f"pred:{predictor}"] = self._summary(predictor, targets)
            out.append(row)
        with self._lock:
            self._records = out
        return out

    def _summary(self, predictor: str, targets: Mapping[str, float]) -> float | str:
        kind = self.predictors[predictor].task.kind if predictor in self.predictors else "regression"
        if kind == "categorical":
            return max(targets, key=lambda t: targets[t])
        if kind == "multilabel":
            return int(sum(v >= 0.5 for v in targets.values()))
        return round(float(next(iter(targets.values()))), 4)

    def map_points(self, encoder: str) -> tuple[list[str], np.ndarray]:
        """Ids and coordinates of the stored map of ``encoder``."""
        return self.store.projection(encoder)


def neighbour_placement(x: np.ndarray, coords: np.ndarray, vector: np.ndarray, k: int = 10) -> np.ndarray:
    """Place ``vector`` at the similarity-weighted mean of the map coordinates of its ``k`` nearest rows of ``x``.

    Cosine similarity on the raw embeddings (maps normalise rows first, so this matches their geometry); weights are
    ``max(similarity, 0) + 1e-9``. Used when the fitted reducer is not in memory (after a restart).
    """
    x = np.asarray(x, dtype=np.float64)
    v = np.asarray(vector, dtype=np.float64).reshape(-1)
    norms = np.linalg.norm(x, axis=1) * max(np.linalg.norm(v), 1e-300)
    sims = (x @ v) / np.where(norms > 0, norms, 1.0)
    top = np.argsort(-sims, kind="stable")[: min(k, len(sims))]
    weights = np.clip(sims[top], 0.0, None) + 1e-9
    return (coords[top] * weights[:, None]).sum(0) / weights.sum()


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
