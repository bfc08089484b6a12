"""The explorer: the one façade the app talks to (a store, the predictors as encoders, 2-D maps, LoRA caches).

Every app action is a method here (or a function of ``app/handlers.py`` calling methods here); none needs gradio, and
the app never reaches past this class to the store. Thread-safe: the app calls it from many request threads at once
(the store hands each call its own cursor; the caches below take a lock).

- :meth:`Explorer.open` builds it (no side effect); :meth:`Explorer.start` is the explicit start-up step: it removes
  staging folders of adds that were killed midway, resolves estimates stored by an older release, and fills an empty
  collection with the default zoos and fits missing maps.
- :meth:`Explorer.analyse` reads an (untrusted) upload and computes everything shown about it, storing nothing; the
  analysis is kept (keyed by the file's sha256 and its config's) so that :meth:`Explorer.add` of the same bytes
  parses nothing again and runs no predictor again. ``add`` copies the files under ``<data dir>/uploads/<sha256>/``
  and stores the LoRA with its estimates and embeddings in one transaction, then places it on every map.
- Neighbours are exact: ΔW cosine over shared modules (:mod:`lol_engine.similarity`) against every stored LoRA that
  shares a module with the query (LoRAs sharing none fall back to the fingerprint's cosine), or the cosine of any
  encoder's embeddings (:meth:`Explorer.neighbours_by_embedding`).
- Maps: one per encoder (``fingerprint`` over everything, ``lol:<predictor>`` over the LoRAs that fit it), fitted with
  :func:`lol_engine.maps.fit_map` and stored. A new LoRA is placed with the fitted reducer's ``transform`` when the map
  was fitted in this process, else at the similarity-weighted mean of its 10 nearest fitted neighbours' coordinates
  (no refit either way; :meth:`Explorer.fit_maps` refits on request).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lol_engine.card import lora_name
from lol_engine.encoders import (
    FINGERPRINT,
    Encoder,
    PredictorEncoder,
    encode,
    encoders_for,
    load_predictors,
    map_title,
)
from lol_engine.errors import BadRequestError, LoraFormatError, NotFoundError, StoreError
from lol_engine.estimate import Estimate
from lol_engine.hub import fetch_repo
from lol_engine.ingest import IngestReport, ingest
from lol_engine.lora.config import read_adapter_config
from lol_engine.lora.locate import LoraLocation, locate_lora
from lol_engine.lora.parse import load_lora
from lol_engine.lora.safe_io import ReadLimits, file_sha256
from lol_engine.lora.weights import LoraWeights
from lol_engine.relations import Relation, relate
from lol_engine.report import card_facts, describe
from lol_engine.similarity import cosine_to_many, module_cosines
from lol_engine.sketch import DW_SKETCH, delta_sketch

if TYPE_CHECKING:
    from lol_engine.ann import NeighbourIndexes
    from lol_engine.labels import LabelMatch, LabelTable
    from lol_engine.maps import EmbeddingMap, FacetedMap
    from lol_engine.settings import Settings
    from lol_engine.store import LoraStore, StoredLora
    from lol_engine.train.checkpoint import Predictor
    from lol_engine.train.collection import TrainingReport

__all__ = [
    "AddResult",
    "Analysis",
    "Explorer",
    "Neighbour",
    "describe_file",
    "hub_lora",
    "map_title",
    "neighbour_placement",
]

StartProgress = Callable[[str, int, int], None]  # (step: "ingest" | "maps", done, total), see Explorer.start
_CACHE_BYTES = 512 * 2**20  # factors kept in memory for neighbour search
USER_PREDICTORS = "predictors"  # the collection's own predictors: a folder beside its database
_ANALYSES = 8  # analysed uploads kept for their add (fewer when they hold more than _CACHE_BYTES of factors)


@dataclass
class Analysis:
    """Everything the app shows about one LoRA, computed without storing anything."""

    lora: LoraWeights
    report: dict[str, Any]
    estimates: dict[str, Estimate]  # per predictor that fits the LoRA
    embeddings: dict[str, np.ndarray]  # per encoder that accepts it
    config_digest: str  # sha256 of the adapter_config.json read with it ("" without one)
    seconds: float

    @property
    def sha256(self) -> str:
        """The LoRA file's sha256, its identity in the store."""
        return str(self.lora.meta.sha256)

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the analysis: the bytes of the LoRA file and of its config."""
        return self.sha256, self.config_digest


@dataclass(frozen=True)
class AddResult:
    """What :meth:`Explorer.add` did: the LoRA's id and stored name, and whether it was stored before."""

    id: str
    name: str
    existed: bool


@dataclass(frozen=True)
class Neighbour:
    """A stored LoRA close to a query; ``by``: ``"ΔW cosine"``, ``"fingerprint cosine"`` or ``"<encoder> cosine"``.

    ``relation``: how the query derives from it (same ΔW, rescale, truncation, merge; :mod:`lol_engine.relations`),
    found among the ΔW-cosine neighbours only; fingerprint or embedding neighbours never have one.
    """

    id: str
    name: str
    zoo: str | None
    similarity: float
    by: str
    base_family: str = "unknown"
    relation: Relation | None = None


def _factor_bytes(lora: LoraWeights) -> int:
    return sum(m.a.numel() * m.a.element_size() + m.b.numel() * m.b.element_size() for m in lora)


def _config_digest(config: Path | None) -> str:
    return "" if config is None else hashlib.sha256(config.read_bytes()).hexdigest()


def _located(
    lora_file: str | os.PathLike[str], config_file: str | os.PathLike[str] | None
) -> tuple[Path, Path | None]:
    """The weights file and its config: as given, or (no config given) as :func:`locate_lora` finds them."""
    if config_file is not None:
        return Path(lora_file), Path(config_file)
    found = locate_lora(lora_file)
    return found.weights, found.config


def describe_file(
    lora_file: str | os.PathLike[str],
    config_file: str | os.PathLike[str] | None = None,
    limits: ReadLimits | None = None,
) -> dict[str, Any]:
    """The Inspect report (:func:`lol_engine.report.describe`) of an (untrusted) LoRA file; nothing else is run."""
    limits = limits or ReadLimits()
    weights, config_path = _located(lora_file, config_file)
    config = read_adapter_config(config_path, limits) if config_path else None
    return describe(load_lora(weights, limits=limits, config=config))


def hub_lora(repo_id: str) -> LoraLocation:
    """The LoRA of a Hugging Face repo (fetched, or found in the cache offline): its snapshot read like any folder.

    Raises :class:`BadRequestError` for text that is not a repo id, :class:`NotFoundError` when it cannot be
    fetched, and :class:`LoraFormatError` (naming the repo) when the snapshot holds no single LoRA.
    """
    folder = fetch_repo(repo_id)
    try:
        return locate_lora(folder)
    except LoraFormatError as exc:  # named by the repo id, not by the snapshot's commit folder
        raise LoraFormatError(str(exc).replace(folder.name, repo_id, 1)) from None


class Explorer:
    """A collection with its predictors and maps. Build it with :meth:`open`, then call :meth:`start` once."""

    def __init__(
        self, store: LoraStore, predictors: Mapping[str, Predictor], data_dir: str | os.PathLike[str]
    ) -> None:
        self.store = store
        self.predictors = dict(predictors)
        self.encoders: list[Encoder] = encoders_for(self.predictors)
        self.data_dir = Path(data_dir)
        self.device: str | None = None  # where the predictors run (set by open)
        self.uploads_dir = self.data_dir / "uploads"
        self._lock = threading.RLock()
        self._add_lock = threading.Lock()
        self._cache: OrderedDict[str, LoraWeights] = OrderedDict()
        self._cache_bytes = 0
        self._analyses: OrderedDict[tuple[str, str], Analysis] = OrderedDict()
        self._maps: dict[str, tuple[EmbeddingMap | FacetedMap, list[str], np.ndarray]] = {}  # fitted here
        self._records: list[dict[str, Any]] | None = None
        self._stored: list[StoredLora] | None = None  # store.all(), cached until the collection changes

    @classmethod
    def open(
        cls,
        db: str | os.PathLike[str] | None = None,
        predictors_dir: str | os.PathLike[str] | None = None,
        settings: Settings | None = None,
    ) -> Explorer:
        """Open (or create) the store ``db`` (default: the settings' ``db_path``) with the shipped predictors and the
        collection's own (``predictors/`` beside the database: :meth:`register`).

        Nothing else happens: call :meth:`start` before serving.
        """
        from lol_engine.settings import settings as current_settings
        from lol_engine.store import LoraStore

        config = settings or current_settings()
        path = Path(db) if db is not None else config.db_path
        predictors = load_predictors(predictors_dir)
        own = {n: p for n, p in load_predictors(path.parent / USER_PREDICTORS).items() if n not in predictors}
        predictors |= own
        device = config.resolved_device()
        for predictor in predictors.values():
            predictor.to(device)
        explorer = cls(LoraStore(path), predictors, path.parent)
        explorer.device = device
        return explorer

    def close(self) -> None:
        """Close the store (checkpointed)."""
        self.store.close()

    @property
    def db_path(self) -> str:
        """Where the collection's database is (``:memory:`` for a test store)."""
        return self.store.path

    # ---------------------------------------------------------------- start-up
    def start(
        self,
        zoos: Iterable[str | os.PathLike[str]] | None = None,
        progress: bool = True,
        on_progress: StartProgress | None = None,
    ) -> bool:
        """The start-up step of one writer process; returns whether the collection changed.

        Removes staging folders of adds killed midway, resolves estimates stored by schema version 1 with the
        predictors at hand, and (:meth:`ensure_default`) fills an empty collection with ``zoos`` (default: the
        settings' default zoos) and fits every missing map; in a collection too large for exact neighbour scans,
        loads the neighbour indexes (:mod:`lol_engine.ann`). ``on_progress(step, done, total)`` follows it
        (``step``: ``"ingest"`` counting files, ``"maps"`` counting maps).
        """
        if self.uploads_dir.is_dir():
            for stale in self.uploads_dir.glob(".*"):  # staging folders, and uploads an earlier run held
                shutil.rmtree(stale, ignore_errors=True)
        resolved = self._resolve_raw_estimates()
        changed = self.ensure_default(zoos, progress=progress, on_progress=on_progress) or resolved > 0
        if self._large():  # the neighbour indexes read back from <db>.ann/ (or built and saved): not on a request
            for encoder in self.candidate_encoders:
                self.neighbour_indexes.loaded(encoder)
        return changed

    def _resolve_raw_estimates(self) -> int:
        """Turn version-1 rows (bare numbers) into estimates for the predictors still present; returns how many."""
        from lol_engine.train.calibrate import estimate_from

        rows = []
        for lora_id, name, raw in self.store.raw_estimates():
            predictor = self.predictors.get(name)
            if predictor is None:
                continue  # kept as it is: resolved when that predictor is back
            task = predictor.task
            names = (task.label,) if task.kind in ("regression", "binary") else task.names
            if set(names) != set(raw):
                continue
            decoded = [raw[n] for n in names]
            rows.append((lora_id, estimate_from(predictor, decoded, in_sample=predictor.has_seen_file(lora_id))))
        if rows:
            self.store.set_estimates(rows)
            self._changed()
        return len(rows)

    def ensure_default(
        self,
        zoos: Iterable[str | os.PathLike[str]] | None = None,
        progress: bool = True,
        on_progress: StartProgress | None = None,
    ) -> bool:
        """Ingest ``zoos`` into an empty store and fit its missing maps; returns whether anything was done."""
        done = False
        if self.store.count() == 0:
            if zoos is None:
                from lol_engine.settings import settings

                zoos = settings().default_zoos
            paths = [str(Path(z).resolve()) for z in zoos]
            if paths:
                hook = None if on_progress is None else functools.partial(on_progress, "ingest")
                self.ingest(paths, progress=progress, on_progress=hook)
                done = True
        missing = [name for name in self._embedded() if name not in self.store.maps()]
        if missing:
            for k, name in enumerate(missing):  # ingest and fit_maps each checkpoint when done
                if on_progress is not None:
                    on_progress("maps", k, len(missing))
                self.fit_maps([name], progress=progress)
            if on_progress is not None:
                on_progress("maps", len(missing), len(missing))
            done = True
        return done

    def ingest(
        self, paths: Iterable[str], progress: bool = True, on_progress: Callable[[int, int], None] | None = None
    ) -> IngestReport:
        """Add every LoRA named by ``paths`` (files, folders, zoos, Hub repo ids) with this explorer's encoders;
        ``on_progress(done, total)`` after each file."""
        report = ingest(paths, self.store, self.encoders, progress=progress, on_progress=on_progress)
        self._changed()
        self._index_sync()
        return report

    @property
    def predictors_dir(self) -> Path:
        """Where this collection's own predictors live (:meth:`register`)."""
        return self.data_dir / USER_PREDICTORS

    def register(self, folder: str | os.PathLike[str], progress: bool = False) -> Predictor:
        """Use the predictor saved in ``folder`` (under :attr:`predictors_dir`) from now on: its estimates and
        embeddings are computed for every stored LoRA it fits, and its map is fitted."""
        from lol_engine.store import NewLora
        from lol_engine.train.checkpoint import load_predictor

        folder = Path(folder)
        if folder.resolve().parent != self.predictors_dir.resolve():
            raise BadRequestError(f"{folder.name}: a collection's predictors live in its predictors/ folder")
        predictor = load_predictor(folder)
        if self.device is not None:
            predictor.to(self.device)
        encoder = PredictorEncoder(predictor)
        with self._lock:
            self.predictors[predictor.name] = predictor
            self.encoders = [e for e in self.encoders if e.name != encoder.name] + [encoder]
        needed = {layer.name for layer in predictor.model.spec.layers}  # read only LoRAs that have its modules
        subsets = predictor.model.accepts_subsets  # module_tokens reads any subset: its fits() decides
        candidates = [s for s in self._all() if subsets or needed <= {m["name"] for m in s.spec}]
        fitting = [s for s in candidates if encoder.accepts(self.weights(s.id))]
        for start in range(0, len(fitting), 64):
            chunk = fitting[start : start + 64]
            loras = [self.weights(s.id) for s in chunk]
            items = [
                NewLora(lora, embeddings={encoder.name: vector}, estimates={predictor.name: estimate})
                for lora, (vector, estimate) in zip(loras, encoder.estimate_many(loras), strict=True)
            ]
            self.store.add_many(items)
        self._changed()
        if fitting:
            self.fit_maps([encoder.name], progress=progress)
        return predictor

    def train(self, label: str, model_name: str = "spectral_glnet", **options: Any) -> TrainingReport:
        """Train a predictor of ``label`` on this collection and register it (see
        :func:`lol_engine.train.collection.train_predictor` for the options: filters, group, epochs, seeds,
        ``on_epoch`` progress and cancellation); it runs on the explorer's device (``LOL_DEVICE``: a GPU when
        there is one)."""
        from lol_engine.train.collection import train_predictor

        return train_predictor(self, label, model_name, **{"device": self.device or "cpu", **options})

    def fingerprints(self, ids: Sequence[str]) -> np.ndarray:
        """The stored fingerprints of ``ids``, one row each, in that order."""
        stored, x = self.store.embeddings(FINGERPRINT)
        at = {i: k for k, i in enumerate(stored)}
        missing = [i for i in ids if i not in at]
        if missing:
            raise NotFoundError(f"LoRA {missing[0][:12]} has no fingerprint")
        return x[[at[i] for i in ids]]

    def apply_labels(self, table: LabelTable) -> LabelMatch:
        """Join a labels table to the stored LoRAs (by stored name, id, or the path of their file) and store the
        labels in one transaction; returns the join, every miss included (:class:`~lol_engine.labels.LabelMatch`)."""
        from lol_engine.labels import LoraKeys, match_labels, path_keys

        keys = [LoraKeys(s.id, s.name, path_keys(Path(s.source), [])) for s in self._all()]
        match = match_labels(table, keys)
        if match.labelled:
            self.store.set_labels(match.labelled)
            self._changed()
        return match

    # ---------------------------------------------------------------- what the collection holds
    def count(self) -> int:
        """How many LoRAs are stored."""
        return self.store.count()

    def get(self, lora_id: str) -> StoredLora:
        """A stored LoRA; :class:`NotFoundError` if it is not in the collection."""
        stored = self.find(lora_id)
        if stored is None:
            raise NotFoundError(f"no LoRA {lora_id[:70]!r} in the collection")
        return stored

    def find(self, lora_id: str) -> StoredLora | None:
        """A stored LoRA, or None."""
        return self.store.get(lora_id)

    def card_facts(self, lora_id: str) -> dict[str, Any]:
        """What a stored LoRA's card shows about its file (:func:`lol_engine.report.card_facts`), as the store keeps
        it: no file is read. A LoRA stored by an earlier release has none kept: its report is made from its file
        once (the factors are read anyway for its neighbours) and kept; if the store cannot be written (read-only),
        it is made again next time.
        """
        facts = self.store.card(lora_id)
        if facts is not None:
            return facts
        self.get(lora_id)  # NotFoundError for an unknown id
        facts = card_facts(describe(self.weights(lora_id)))
        with suppress(StoreError):
            self.store.set_card(lora_id, facts)
        return facts

    def labels(self, lora_id: str) -> dict[str, Any]:
        """The labels stored for a LoRA."""
        return self.store.labels(lora_id)

    def all_labels(self) -> dict[str, dict[str, Any]]:
        """``{lora id: {label: value}}`` of every labelled LoRA (one query)."""
        return self.store.all_labels()

    def estimates(self, lora_id: str) -> dict[str, Estimate]:
        """The estimates stored for a LoRA, per predictor."""
        return self.store.estimates(lora_id)

    def _embedded(self) -> list[str]:
        """Encoders with at least one stored embedding and a map: ``fingerprint`` first, then ``lol:<predictor>``
        (the ΔW sketch only proposes neighbour candidates: across base families its cosines are noise, so no map)."""
        return sorted((n for n in self.store.encoders() if n != DW_SKETCH), key=lambda n: (n != FINGERPRINT, n))

    def maps(self) -> list[str]:
        """Encoders with a stored map, ``fingerprint`` first."""
        stored = self.store.maps()
        return [name for name in self._embedded() if name in stored]

    def map_points(self, encoder: str) -> tuple[list[str], np.ndarray]:
        """Ids and coordinates of the stored map of ``encoder``."""
        return self.store.projection(encoder)

    def fit_maps(self, encoders: Sequence[str] | None = None, progress: bool = False) -> dict[str, float]:
        """(Re)fit the map of each encoder over all LoRAs embedded by it; returns seconds per map.

        The fingerprint's map is faceted (:func:`~lol_engine.maps.fit_faceted`): one layout per base family, side by
        side, since fingerprints of different bases are not comparable. A predictor's encoder embeds LoRAs of one
        module layout only: one layout. Above :data:`~lol_engine.maps.SAMPLE` rows (per layout) a map is fitted on a
        sample and the other rows are placed in parallel batches; ``progress`` shows them placed.
        """
        from rich.progress import Progress, TaskID

        from lol_engine.maps import fit_faceted, fit_map

        seconds = {}
        names = list(encoders) if encoders is not None else self._embedded()
        unknown = [name for name in names if name not in self.store.encoders()]
        if unknown:
            raise NotFoundError(f"no LoRA is embedded by {unknown[0]!r}: no map to fit")
        with Progress(disable=not progress) as bar:
            task = bar.add_task("maps", total=len(names))
            for name in names:
                start = time.perf_counter()
                ids, x = self.store.embeddings(name)
                rows = bar.add_task(f"placing rows on {name}", total=None, visible=False)

                def placed(done: int, total: int, rows: TaskID = rows) -> None:
                    bar.update(rows, completed=done, total=total, visible=True)

                fitted: EmbeddingMap | FacetedMap
                if name == FINGERPRINT:
                    families = self._families()
                    fitted = fit_faceted(x, [families.get(i, "unknown") for i in ids], on_progress=placed)
                else:
                    fitted = fit_map(x, on_progress=placed)
                self.store.set_projection(name, ids, fitted.coords)
                with self._lock:
                    self._maps[name] = (fitted, ids, x)
                seconds[name] = time.perf_counter() - start
                bar.advance(task)
        self.store.checkpoint()
        return seconds

    # ---------------------------------------------------------------- one LoRA
    def analyse(
        self,
        lora_file: str | os.PathLike[str],
        config_file: str | os.PathLike[str] | None = None,
        limits: ReadLimits | None = None,
    ) -> Analysis:
        """Read an (untrusted) LoRA file or folder: its report, estimates and embeddings. Stores nothing.

        ``config_file`` is an ``adapter_config.json`` given separately (a folder's own config is found by itself).
        """
        start = time.perf_counter()
        limits = limits or ReadLimits()
        weights, config_path = _located(lora_file, config_file)  # a file, or a folder with its config
        config = read_adapter_config(config_path, limits) if config_path else None
        lora = load_lora(weights, limits=limits, config=config)
        encoded = encode(lora, self.encoders)
        analysis = Analysis(
            lora,
            describe(lora),
            encoded.estimates,
            encoded.embeddings,
            _config_digest(config_path),
            time.perf_counter() - start,
        )
        self._keep(analysis)
        return analysis

    def _keep(self, analysis: Analysis) -> None:
        with self._lock:
            self._analyses[analysis.key] = analysis
            self._analyses.move_to_end(analysis.key)
            while len(self._analyses) > 1 and (
                len(self._analyses) > _ANALYSES
                or sum(_factor_bytes(a.lora) for a in self._analyses.values()) > _CACHE_BYTES
            ):
                self._analyses.popitem(last=False)

    def _analysed(self, key: tuple[str, str]) -> Analysis | None:
        with self._lock:
            return self._analyses.get(key)

    def add(
        self,
        lora_file: str | os.PathLike[str],
        config_file: str | os.PathLike[str] | None = None,
        name: str | None = None,
        limits: ReadLimits | None = None,
    ) -> AddResult:
        """Store a LoRA file (and its config): copied under ``uploads/<sha256>/`` first, then one transaction.

        ``name``: the name to store it under (default: :func:`lol_engine.card.lora_name` of the files and the
        metadata, never an adapter file's name nor an upload folder's hash). An analysis of the same bytes
        (:meth:`analyse`, kept by sha256) is reused: nothing is parsed or predicted again. Adding a LoRA that is
        already stored changes nothing.
        """
        weights, config = _located(lora_file, config_file)
        lora_id = file_sha256(weights)
        stored = self.find(lora_id)
        if stored is not None:
            return AddResult(lora_id, stored.name, existed=True)
        analysis = self._analysed((lora_id, _config_digest(config))) or self.analyse(weights, config, limits)
        display = name or lora_name(weights, config, analysis.lora.meta)
        with self._add_lock:  # one add at a time from here: two adds of the same bytes store it once
            stored = self.find(analysis.sha256)
            if stored is not None:
                return AddResult(analysis.sha256, stored.name, existed=True)
            folder = self._copy_in(analysis.sha256, weights, config)
            try:
                copy = folder / "adapter_model.safetensors"
                lora = replace(analysis.lora, meta=replace(analysis.lora.meta, source=str(copy)))
                self.store.add(
                    lora,
                    name=display,
                    embeddings=analysis.embeddings,
                    estimates=analysis.estimates,
                    card=analysis.report,
                )
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)  # nothing half-written: the copy goes with the failed add
                raise
            self._changed()
            self._index_added(analysis.sha256, analysis.lora.meta.base_family, analysis.embeddings)
            self._cached(analysis.sha256, lora)
            self._place(analysis.sha256, analysis.lora.meta.base_family, analysis.embeddings)
            self.store.checkpoint()  # the new rows are in lol.duckdb itself, not only in its .wal
        with self._lock:
            self._analyses.pop(analysis.key, None)
        return AddResult(analysis.sha256, display, existed=False)

    def _copy_in(self, lora_id: str, weights: Path, config: Path | None) -> Path:
        """Copy the files into a fresh ``uploads/<sha256>/`` (atomically: complete or absent); checks the copy."""
        folder = self.uploads_dir / lora_id
        if folder.is_dir():  # left by an add whose store write failed after the copy: replaced
            shutil.rmtree(folder, ignore_errors=True)
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{lora_id[:12]}-", dir=self.uploads_dir))
        try:
            shutil.copyfile(weights, staging / "adapter_model.safetensors")
            if config is not None:
                shutil.copyfile(config, staging / "adapter_config.json")
            if file_sha256(staging / "adapter_model.safetensors") != lora_id:
                raise LoraFormatError(f"{weights.name} changed while it was being added; add it again")
            os.replace(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return folder

    def _place(self, lora_id: str, family: str, embeddings: Mapping[str, np.ndarray]) -> None:
        """Put a new LoRA on every stored map of an encoder that embedded it (no refit).

        With the reducer fitted in this process: its ``transform``. Otherwise (after a restart) the similarity-weighted
        mean of its nearest placed neighbours. On the faceted fingerprint map only LoRAs of its own base family count;
        a family new to the map gets a tile of its own (its layout comes with the next refit).
        """
        from lol_engine.maps import TILE_STEP, FacetedMap

        stored_maps = self.store.maps()
        for encoder, vector in embeddings.items():
            if encoder not in stored_maps:
                continue
            faceted = encoder == FINGERPRINT
            with self._lock:
                fitted = self._maps.get(encoder)
            reducer = None if fitted is None else fitted[0]
            xy: np.ndarray | None = None
            if isinstance(reducer, FacetedMap):
                xy = reducer.place(vector[None, :], family)
            elif reducer is not None:
                xy = reducer.place(vector[None, :])
            else:
                ids, coords = self.store.projection(encoder)
                ref_ids, x = self.store.embeddings(encoder)
                at = {i: k for k, i in enumerate(ref_ids)}
                families = self._families() if faceted else {}
                keep = [k for k, i in enumerate(ids) if i in at and (not faceted or families.get(i) == family)]
                if keep:
                    rows = [at[ids[k]] for k in keep]
                    xy = neighbour_placement(x[rows], coords[keep], vector)
            if xy is None:  # the first LoRA of its family on this map: a new tile, right of the others
                _, coords = self.store.projection(encoder)
                right = float(coords[:, 0].max()) if len(coords) else -TILE_STEP
                xy = np.array([right + TILE_STEP - 0.5, 0.5])
            self.store.add_projection(encoder, [lora_id], np.asarray(xy).reshape(1, 2))

    def _families(self) -> dict[str, str]:
        """``{lora id: base family}`` of every stored LoRA."""
        return {s.id: s.base_family for s in self._all()}

    def map_tiles(self, encoder: str) -> dict[str, tuple[float, float, float, float]]:
        """Where each base family lies on the stored map of ``encoder`` (faceted maps only; else ``{}``):
        ``{family: (x0, y0, x1, y1)}``, the bounding box of its points."""
        if encoder != FINGERPRINT:
            return {}
        ids, coords = self.store.projection(encoder)
        families = self._families()
        boxes: dict[str, list[np.ndarray]] = {}
        for i, xy in zip(ids, coords, strict=True):
            boxes.setdefault(families.get(i, "unknown"), []).append(xy)
        out = {}
        for family, points in sorted(boxes.items()):
            p = np.array(points)
            out[family] = (float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max()))
        return out

    def weights(self, lora_id: str) -> LoraWeights:
        """A stored LoRA's factors (read from its file once, then cached within a memory bound)."""
        with self._lock:
            if lora_id in self._cache:
                self._cache.move_to_end(lora_id)
                return self._cache[lora_id]
        stored = self.get(lora_id)
        source = Path(stored.source)
        if not source.exists() and (self.uploads_dir / lora_id).is_dir():
            source = self.uploads_dir / lora_id  # a restored or moved collection: its uploads lie beside its database
        lora = load_lora(source)
        self._cached(lora_id, lora)
        return lora

    def _cached(self, lora_id: str, lora: LoraWeights) -> None:
        with self._lock:
            if lora_id in self._cache:
                return
            self._cache[lora_id] = lora
            self._cache_bytes += _factor_bytes(lora)
            while self._cache_bytes > _CACHE_BYTES and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= _factor_bytes(old)

    _ann: NeighbourIndexes | None = None  # made on first use (neighbour_indexes)
    # where a large collection's ΔW-cosine candidates come from, first choice first (the fingerprint always has them)
    candidate_encoders: tuple[str, ...] = (DW_SKETCH, FINGERPRINT)

    @property
    def neighbour_indexes(self) -> NeighbourIndexes:
        """The collection's neighbour indexes (:mod:`lol_engine.ann`), persisted beside its database."""
        with self._lock:
            if self._ann is None:
                from lol_engine.ann import NeighbourIndexes

                self._ann = NeighbourIndexes(self.store)
            return self._ann

    def _large(self) -> bool:
        """Whether the collection is past the size searched by exact scans (then neighbours go through indexes)."""
        return self.store.count() > self.neighbour_indexes.exact_max_rows

    def _index_added(self, lora_id: str, family: str, embeddings: Mapping[str, np.ndarray]) -> None:
        """Put a newly stored LoRA into the neighbour indexes already in memory (others load it with the rest)."""
        if self._ann is not None:
            self._ann.add(lora_id, family, embeddings)

    def _index_sync(self) -> None:
        """Bring the neighbour indexes in memory up to date with the store (after an ingest)."""
        if self._ann is not None:
            self._ann.sync()

    def neighbours(self, lora: LoraWeights, k: int = 10, exclude: str | None = None) -> list[Neighbour]:
        """The ``k`` stored LoRAs most comparable to ``lora``, most similar first; ``[]`` when none is comparable.

        Exact ΔW cosine over shared modules when stored LoRAs share a module (of the same shape) with it; else the
        fingerprint's cosine among LoRAs of its own base family (never for an ``unknown`` family: nothing says which
        LoRAs are of its base). LoRAs of different bases are never neighbours. The ``k`` ΔW-cosine neighbours carry
        the query's relation to them (:func:`lol_engine.relations.relate`: same ΔW, rescaled, rank-truncated, or
        part of a weighted merge of them); the cost of that grows with ``k``, not with the collection.

        A collection larger than the indexes' exact size (:data:`lol_engine.ann.EXACT_MAX_ROWS`) is not scanned:
        the ΔW cosine is computed for the :data:`~lol_engine.ann.RERANK_CANDIDATES` LoRAs of the query's base family
        nearest by ΔW sketch (:mod:`lol_engine.sketch`; by fingerprint where the family's LoRAs have no sketch) —
        all of them when the family is smaller — and the best ``k`` kept.
        """
        if self._large():
            return self._indexed_neighbours(lora, k, exclude)
        names = {m.name for m in lora}
        candidates = [s for s in self._all() if s.id != exclude and names & {m["name"] for m in s.spec}]
        if candidates:
            return self._delta_neighbours(lora, candidates, k)
        family = lora.meta.base_family
        if not family or family == "unknown":
            return []
        vector = self._query_vector(lora, FINGERPRINT)
        hits = self.store.nearest(FINGERPRINT, vector, k=k, exclude=exclude, base_family=family)
        return self._neighbours(hits, "fingerprint cosine")

    def _query_vector(self, lora: LoraWeights, encoder: str) -> np.ndarray:
        """The query's ``encoder`` embedding (fingerprint or ΔW sketch): the stored one when it is stored, else
        computed."""
        stored = None
        if lora.meta.sha256:
            indexes = self._ann
            indexed = None
            if indexes is not None and indexes.is_loaded(encoder):  # never loads an index for this
                indexed = indexes.vector(encoder, lora.meta.sha256, lora.meta.base_family)
            stored = indexed if indexed is not None else self.store.embedding(lora.meta.sha256, encoder)
        if stored is not None:
            return stored
        if encoder == DW_SKETCH:
            return delta_sketch(lora)
        from lol_engine.fingerprint import fingerprint

        return fingerprint(lora).numpy()

    def _delta_neighbours(self, lora: LoraWeights, candidates: Sequence[StoredLora], k: int) -> list[Neighbour]:
        """The ``k`` of ``candidates`` nearest by exact ΔW cosine, with their relations."""
        loras = [self.weights(s.id) for s in candidates]
        sims = cosine_to_many(lora, loras)
        order = [i for i in np.argsort(-np.nan_to_num(sims, nan=-2.0), kind="stable") if not np.isnan(sims[i])]
        top = order[:k]
        relations = relate(
            lora, [loras[i] for i in top], [candidates[i].id for i in top], [candidates[i].name for i in top]
        )
        return [
            Neighbour(c.id, c.name, c.zoo, float(sims[i]), "ΔW cosine", c.base_family, relation)
            for i, relation in zip(top, relations, strict=True)
            for c in (candidates[i],)
        ]

    def _indexed_neighbours(self, lora: LoraWeights, k: int, exclude: str | None) -> list[Neighbour]:
        """:meth:`neighbours` of a large collection: candidates of the query's base family from an index (the ΔW
        sketch where every LoRA of the family has one, else the fingerprint), re-ranked by exact ΔW cosine.

        Only the ``k`` best (and any tied with the last) are read from the store; ties rank as in the exact scan
        (oldest first, then by id)."""
        from lol_engine.ann import RERANK_CANDIDATES

        family = lora.meta.base_family or "unknown"
        indexes = self.neighbour_indexes
        everyone = max(1, indexes.rows(FINGERPRINT, family))
        by = next(e for e in self.candidate_encoders if e == FINGERPRINT or indexes.rows(e, family) >= everyone)
        wide = max(RERANK_CANDIDATES, 4 * k)
        hits = indexes.search(by, self._query_vector(lora, by), wide, exclude, family)
        names = set(lora.names)
        pool = [(i, w) for i, _ in hits for w in (self.weights(i),) if names & set(w.names)]
        sims = cosine_to_many(lora, [w for _, w in pool])
        valid = [j for j in range(len(pool)) if not np.isnan(sims[j])]
        if valid:
            cut = sorted((sims[j] for j in valid), reverse=True)[min(k, len(valid)) - 1]
            best = [j for j in valid if sims[j] >= cut]
            rows = self.store.get_many([pool[j][0] for j in best])
            best = sorted(
                (j for j in best if pool[j][0] in rows),
                key=lambda j: (-sims[j], rows[pool[j][0]].added_at, pool[j][0]),
            )[:k]
            relations = relate(
                lora, [pool[j][1] for j in best], [pool[j][0] for j in best], [rows[pool[j][0]].name for j in best]
            )
            return [
                Neighbour(c.id, c.name, c.zoo, float(sims[j]), "ΔW cosine", c.base_family, relation)
                for j, relation in zip(best, relations, strict=True)
                for c in (rows[pool[j][0]],)
            ]
        if family == "unknown":
            return []
        hits = indexes.search(FINGERPRINT, self._query_vector(lora, FINGERPRINT), k, exclude, family)
        return self._neighbours(hits, "fingerprint cosine")

    def neighbours_of(self, lora_id: str, k: int = 10, by: str | None = None) -> list[Neighbour]:
        """A stored LoRA's neighbours: by exact ΔW cosine (``by=None``) or by the cosine of encoder ``by``."""
        if by is None:
            return self.neighbours(self.weights(lora_id), k=k, exclude=lora_id)
        return self.neighbours_by_embedding(lora_id, by, k=k)

    def neighbours_by_embedding(self, lora_id: str, encoder: str, k: int = 10) -> list[Neighbour]:
        """The ``k`` stored LoRAs nearest to a stored one by cosine of their ``encoder`` embeddings (an exact scan
        of the store; in a large collection a search of the encoder's index, :mod:`lol_engine.ann`)."""
        if self._large():  # the vector as indexed: no scan of the embeddings table
            family = self.get(lora_id).base_family if encoder == FINGERPRINT else None
            vector = self.neighbour_indexes.vector(encoder, lora_id, family)
            vector = self.store.embedding(lora_id, encoder) if vector is None else vector  # stored since the load
            if vector is None:
                raise NotFoundError(f"LoRA {lora_id[:12]} has no {encoder} embedding")
            if family == "unknown":
                return []
            hits = self.neighbour_indexes.search(encoder, vector, k=k, exclude=lora_id, family=family)
            return self._neighbours(hits, f"{encoder} cosine")
        vector = self.store.embedding(lora_id, encoder)
        if vector is None:
            raise NotFoundError(f"LoRA {lora_id[:12]} has no {encoder} embedding")
        family = self.get(lora_id).base_family if encoder == FINGERPRINT else None  # fingerprints: within a base
        if family == "unknown":
            return []
        hits = self.store.nearest(encoder, vector, k=k, exclude=lora_id, base_family=family)
        return self._neighbours(hits, f"{encoder} cosine")

    def _neighbours(self, hits: Sequence[tuple[str, float]], by: str) -> list[Neighbour]:
        stored = self.store.get_many([i for i, _ in hits])
        return [
            Neighbour(i, stored[i].name, stored[i].zoo, s, by, stored[i].base_family) for i, s in hits if i in stored
        ]

    def compare(self, first: str, second: str) -> tuple[float | None, list[tuple[str, float, float, float]]]:
        """Overall ΔW cosine over shared modules (None if none) and per-module rows of :func:`module_cosines`.

        LoRAs of different base families are refused (:class:`BadRequestError`): their ΔW live in different models.
        """
        one, other = self.get(first), self.get(second)
        if one.base_family != other.base_family:
            raise BadRequestError(
                f"{one.name} is a {one.base_family} LoRA and {other.name} a {other.base_family} LoRA: LoRAs of "
                "different base models cannot be compared"
            )
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

    def _all(self) -> list[StoredLora]:
        with self._lock:
            if self._stored is not None:
                return self._stored
        stored = self.store.all()
        with self._lock:
            self._stored = stored
        return stored

    def records(self) -> list[dict[str, Any]]:
        """One flat dict per stored LoRA: its columns, ``label:<name>`` and ``pred:<predictor>`` summaries.

        0/1-list labels become their sum (e.g. the number of classes), lists of names the names joined by ``;``;
        estimates their
        :attr:`~lol_engine.estimate.Estimate.summary` (a number, p(1), a class, or how many entries are 1).
        """
        with self._lock:
            if self._records is not None:
                return self._records
        labels = self.store.all_labels()
        estimates = self.store.all_estimates()
        out = []
        for s in self._all():
            row: dict[str, Any] = {
                "id": s.id,
                "name": s.name,
                "zoo": s.zoo or "uploads",
                "format": s.format,
                "base_family": s.base_family,
                "rank": s.rank_max,
                "modules": s.n_modules,
                "size_kb": round(s.size_bytes / 1024, 1),
                "dtype": s.dtype,
                "added": str(s.added_at)[:19],
            }
            for key, value in sorted(labels.get(s.id, {}).items()):
                row[f"label:{key}"] = _label_cell(value)
            for predictor, estimate in sorted(estimates.get(s.id, {}).items()):
                row[f"pred:{predictor}"] = estimate.summary
            out.append(row)
        with self._lock:
            self._records = out
        return out


def _label_cell(value: Any) -> Any:
    """One table cell for a label: a number or text as it is; a 0/1 list its sum (how many are 1), a list of names
    the names joined by ``;``."""
    if not isinstance(value, list):
        return value
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return sum(value)
    return "; ".join(str(v) for v in value)


def neighbour_placement(x: np.ndarray, coords: np.ndarray, vector: np.ndarray, k: int = 10) -> np.ndarray:
    """Place ``vector`` at the similarity-weighted mean of the map coordinates of its ``k`` nearest rows of ``x``
    (:func:`lol_engine.maps.weighted_placement`, the rule that places a sampled map's other rows). Used when the
    fitted reducer is not in memory (after a restart)."""
    from lol_engine.maps import weighted_placement

    return weighted_placement(x, np.asarray(coords, dtype=float), np.asarray(vector).reshape(1, -1), k=k)[0]
