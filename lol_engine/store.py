"""The LoRA store: a DuckDB database of LoRAs, labels, embeddings, estimates and map coordinates.

The only module that imports duckdb. One :class:`LoraStore` per process owns one connection; every call works on its
own cursor, so many reader threads can share it (one writer process per database file, a cursor per thread). Every
ingest is one transaction: a LoRA and everything attached to it land together or not at all. The sha256 of the file is
the LoRA's identity, so ingesting the same file twice stores one LoRA.

Committed writes first land in DuckDB's write-ahead log (``lol.duckdb.wal``) beside the file.
:meth:`LoraStore.checkpoint` moves them into the file itself (the explorer calls it after every add and ingest, and
:meth:`LoraStore.close` does), so that ``lol.duckdb`` alone is the whole collection; :meth:`LoraStore.backup` writes
such a copy while the store is open.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lol_engine.errors import StoreError
from lol_engine.estimate import Estimate
from lol_engine.lora.locate import display_name
from lol_engine.lora.weights import LoraWeights

__all__ = ["SCHEMA_VERSION", "LoraStore", "NewLora", "NewRows", "StoredLora", "rows_of"]

SCHEMA_VERSION = 3
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta(key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE IF NOT EXISTS loras(
        id VARCHAR PRIMARY KEY, name VARCHAR, source VARCHAR, format VARCHAR, base_family VARCHAR,
        spec_json VARCHAR, n_modules INTEGER, rank_min INTEGER, rank_max INTEGER, size_bytes BIGINT,
        dtype VARCHAR, metadata_json VARCHAR, zoo VARCHAR, added_at TIMESTAMP DEFAULT current_timestamp,
        card_json VARCHAR)""",
    "CREATE TABLE IF NOT EXISTS labels(lora_id VARCHAR, name VARCHAR, value_json VARCHAR, PRIMARY KEY(lora_id, name))",
    """CREATE TABLE IF NOT EXISTS embeddings(
        lora_id VARCHAR, encoder VARCHAR, dim INTEGER, v FLOAT[], PRIMARY KEY(lora_id, encoder))""",
    """CREATE TABLE IF NOT EXISTS estimates(
        lora_id VARCHAR, predictor VARCHAR, estimate_json VARCHAR, PRIMARY KEY(lora_id, predictor))""",
    """CREATE TABLE IF NOT EXISTS projections(
        lora_id VARCHAR, map VARCHAR, x DOUBLE, y DOUBLE, PRIMARY KEY(lora_id, map))""",
)
# Migrations from version v to v + 1, applied in order (in the opening transaction) when an older database is opened.
# 1 → 2: predictions were bare numbers per target; they become estimates. The store cannot know a task's kind, so a
# version-1 row is kept as ``{"raw": {target: value}}`` until the explorer, which has the predictors, resolves it
# (:meth:`LoraStore.raw_estimates`, :meth:`lol_engine.explorer.Explorer.start`).
# 2 → 3: each LoRA keeps its card's facts (:func:`lol_engine.report.card_facts`) in ``card_json``; rows stored before
# have none (NULL) until the explorer makes them from the file once (:meth:`lol_engine.explorer.Explorer.card_facts`).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """INSERT INTO estimates SELECT lora_id, predictor, to_json({'raw': map(list(target), list(value))})::VARCHAR
           FROM predictions GROUP BY lora_id, predictor""",
        "DROP TABLE predictions",
    ),
    2: ("ALTER TABLE loras ADD COLUMN IF NOT EXISTS card_json VARCHAR",),  # absent unless made as version 3
}


# Column types of the tables _insert_many writes, in table order (DuckDB's names; _arrow_type gives Arrow's).
_COLUMN_TYPES: dict[str, tuple[str, ...]] = {
    "labels": ("VARCHAR", "VARCHAR", "VARCHAR"),
    "embeddings": ("VARCHAR", "VARCHAR", "INTEGER", "FLOAT[]"),
    "estimates": ("VARCHAR", "VARCHAR", "VARCHAR"),
    "projections": ("VARCHAR", "VARCHAR", "DOUBLE", "DOUBLE"),
}


def _insert_many(cur: Any, table: str, rows: Sequence[Sequence[Any]]) -> None:
    """One multi-row ``INSERT OR REPLACE`` (one statement instead of one per row): :func:`_insert_rows`."""
    if rows:
        _insert_rows(cur, f"INSERT OR REPLACE INTO {table}", _COLUMN_TYPES[table], rows)


def _insert_rows(cur: Any, head: str, types: Sequence[str], rows: Sequence[Sequence[Any]], tail: str = "") -> None:
    """``{head} SELECT * FROM <rows> {tail}``, ``rows`` handed over as one Arrow table of typed columns.

    pyarrow builds the columns in C++ (a list column from NumPy vectors without a Python float per value), and DuckDB
    scans Arrow buffers without holding the GIL: a batch is written while another thread goes on reading files.
    Several times faster than DuckDB's binding of Python lists, which holds the GIL throughout.
    """
    import pyarrow as pa

    columns = list(zip(*rows, strict=True))
    if len(columns) != len(types):
        raise ValueError(f"rows of {len(columns)} values for {len(types)} columns")
    table = pa.table(
        {f"c{i}": pa.array(c, _arrow_type(t)) for i, (c, t) in enumerate(zip(columns, types, strict=True))}
    )
    cur.register("lol_new_rows", table)  # a view of this cursor's own connection: other threads' do not clash
    try:
        cur.execute(f"{head} SELECT * FROM lol_new_rows {tail}")
    finally:
        cur.unregister("lol_new_rows")


def _arrow_type(duckdb_type: str) -> Any:
    import pyarrow as pa

    return {
        "VARCHAR": pa.string(),
        "INTEGER": pa.int32(),
        "BIGINT": pa.int64(),
        "DOUBLE": pa.float64(),
        "TIMESTAMP": pa.timestamp("us"),
        "FLOAT[]": pa.list_(pa.float32()),
    }[duckdb_type]


_LORA_COLUMNS = (
    "id, name, source, format, base_family, spec_json, n_modules, rank_min, rank_max, size_bytes, dtype, "
    "metadata_json, zoo, added_at"
)


# The loras columns as _lora_row gives them: _LORA_COLUMNS, then card_json.
_LORA_TYPES: tuple[str, ...] = (*("VARCHAR",) * 6, "INTEGER", "INTEGER", "INTEGER", "BIGINT", *("VARCHAR",) * 3)
_LORA_TYPES += ("TIMESTAMP", "VARCHAR")
_KEEP = "ON CONFLICT DO NOTHING"  # a LoRA stored before keeps its row (its labels and embeddings are updated)


def _stored(row: Sequence[Any]) -> StoredLora:
    return StoredLora(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        json.loads(row[5]),
        row[6],
        row[7],
        row[8],
        row[9],
        row[10],
        json.loads(row[11]),
        row[12],
        row[13],
    )


@dataclass(frozen=True)
class NewLora:
    """A LoRA to store with everything known about it (:meth:`LoraStore.add_many`)."""

    lora: LoraWeights
    name: str | None = None
    zoo: str | None = None
    labels: Mapping[str, Any] = field(default_factory=dict)
    embeddings: Mapping[str, np.ndarray] = field(default_factory=dict)
    estimates: Mapping[str, Estimate] = field(default_factory=dict)
    card: Mapping[str, Any] | None = None  # the report (lol_engine.report.describe) or card facts of the file


@dataclass(frozen=True)
class NewRows:
    """The table rows of LoRAs to store (:func:`rows_of`), validated: they hold no factors."""

    loras: list[list[Any]]
    labels: list[list[Any]]
    embeddings: list[list[Any]]
    estimates: list[list[Any]]


def rows_of(items: Sequence[NewLora]) -> NewRows:
    """The rows :meth:`LoraStore.add_rows` writes for ``items``; raises :class:`ValueError` for a LoRA without an id
    or a non-finite embedding."""
    rows = NewRows([], [], [], [])
    for item in items:
        lora_id = _check_id(item.lora)
        rows.loras.append(_lora_row(item.lora, item.name, item.zoo, item.card))
        rows.labels.extend([lora_id, key, json.dumps(value)] for key, value in item.labels.items())
        for encoder, vector in item.embeddings.items():
            v = np.asarray(vector, dtype=np.float32).reshape(-1)
            if not np.isfinite(v).all():
                raise ValueError(f"embedding {encoder!r} has non-finite values")
            rows.embeddings.append([lora_id, encoder, len(v), v])
        rows.estimates.extend([lora_id, name, _estimate_json(e)] for name, e in item.estimates.items())
    return rows


@dataclass(frozen=True)
class StoredLora:
    """One row of the ``loras`` table."""

    id: str
    name: str
    source: str
    format: str
    base_family: str
    spec: list[dict[str, Any]]
    n_modules: int
    rank_min: int
    rank_max: int
    size_bytes: int
    dtype: str
    metadata: dict[str, Any]
    zoo: str | None
    added_at: Any = None  # datetime (UTC, naive) of the first ingest


def _estimate_json(estimate: Estimate) -> str:
    return json.dumps(estimate.to_json(), allow_nan=False)


def _check_id(lora: LoraWeights) -> str:
    if not lora.meta.sha256:
        raise ValueError("the LoRA has no sha256: store LoRAs read from files with load_lora")
    return lora.meta.sha256


def _card_json(card: Mapping[str, Any] | None) -> str | None:
    """The bounded facts of a card (:func:`lol_engine.report.card_facts`) as strict JSON, or None."""
    if card is None:
        return None
    from lol_engine.report import card_facts

    return json.dumps(card_facts(card), allow_nan=False)


def _lora_row(lora: LoraWeights, name: str | None, zoo: str | None, card: Mapping[str, Any] | None) -> list[Any]:
    """The ``loras`` row of a LoRA (default name: :func:`~lol_engine.lora.locate.display_name` of its file)."""
    meta = lora.meta
    spec = [
        {"name": m.name, "kind": m.spec.kind, "d_out": m.spec.d_out, "d_in": m.spec.d_in, "rank": m.spec.rank}
        for m in lora
    ]
    ranks = [m.spec.rank for m in lora]
    metadata = {"kohya": dict(meta.kohya), "modelspec": dict(meta.modelspec), "warnings": list(meta.warnings)}
    return [
        meta.sha256,
        name or display_name(meta.source),
        meta.source,
        meta.format,
        meta.base_family,
        json.dumps(spec),
        len(lora),
        min(ranks),
        max(ranks),
        meta.size_bytes,
        meta.dtype,
        json.dumps(metadata, default=str),
        zoo,
        _utc_now(),
        _card_json(card),
    ]


def _utc_now() -> datetime.datetime:
    """Now in UTC (naive, as the column stores it): "oldest first" must not follow the adder's time zone, which
    DuckDB's ``current_timestamp`` default would."""
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _open_problem(path: str, exc: BaseException) -> str:
    """What went wrong opening the database, and what to do about it."""
    text = _reason(exc)
    if "not a valid DuckDB database" in text:
        return f"{path} is not a DuckDB database (corrupt or another file); move it away to start a new collection"
    if "Conflicting lock" in text:
        return f"{path} is open in another process; run one app or ingest per database file ({text})"
    return f"{path}: cannot open the collection database ({text})"


class LoraStore:
    """A DuckDB-backed collection at ``path`` (default: the settings' ``db_path``, ``$LOL_DATA_DIR/lol.duckdb``);
    ``":memory:"`` for tests; a file's folder is created."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        import duckdb

        if path is None:
            from lol_engine.settings import settings

            path = settings().db_path
        self.path = str(path)
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._con = duckdb.connect(self.path)
        except (OSError, duckdb.Error) as exc:
            raise StoreError(_open_problem(self.path, exc)) from None
        self._write_lock = threading.Lock()  # one writer at a time inside the process; readers never wait
        self._closed = False
        try:
            self._migrate()
        except BaseException:
            self._con.close()  # the file's lock goes with it
            raise

    def checkpoint(self) -> None:
        """Write everything committed into the database file itself (DuckDB's ``CHECKPOINT``; the ``.wal`` goes)."""
        import duckdb

        with self._write_lock, self._cursor() as cur:
            try:
                cur.execute("CHECKPOINT")
            except duckdb.Error as exc:
                raise StoreError(
                    f"{self.path}: the checkpoint failed; what was committed stays in its .wal ({_reason(exc)})"
                ) from None

    def close(self) -> None:
        """Checkpoint (after any write in progress) and close the connection; closing twice is harmless."""
        import duckdb

        if self._closed:
            return
        with self._write_lock:
            self._closed = True
            with suppress(duckdb.Error):  # DuckDB checkpoints on close as well; closing must not fail here
                self._con.execute("CHECKPOINT")
            self._con.close()

    def backup(self, target: str | os.PathLike[str]) -> None:
        """Write a complete, checkpointed copy of the collection to the new database file ``target``.

        Writes in this process wait until the copy is done; ``target`` must not exist.
        """
        import duckdb

        path = Path(target)
        if path.exists():
            raise StoreError(f"{path} exists already; back up into a new file")
        with self._write_lock, self._cursor() as cur:
            source = cur.execute("SELECT current_database()").fetchone()[0]
            quoted = str(path).replace("'", "''")
            try:
                cur.execute(f"ATTACH '{quoted}' AS lol_backup")
                try:
                    cur.execute(f'COPY FROM DATABASE "{source}" TO lol_backup')
                finally:
                    cur.execute("DETACH lol_backup")
            except duckdb.Error as exc:
                path.unlink(missing_ok=True)
                raise StoreError(f"{path}: the backup failed ({_reason(exc)})") from None

    def __enter__(self) -> LoraStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        cur = self._con.cursor()
        try:
            yield cur
        finally:
            cur.close()

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        """One write transaction; a database failure (full disk, read-only file) becomes :class:`StoreError`."""
        import duckdb

        with self._write_lock, self._cursor() as cur:
            try:
                cur.execute("BEGIN TRANSACTION")
                try:
                    yield cur
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")
            except duckdb.Error as exc:
                raise StoreError(
                    f"{self.path}: the write failed and nothing of it was stored ({_reason(exc)})"
                ) from None

    def _migrate(self) -> None:
        with self._transaction() as cur:
            for statement in _SCHEMA:
                cur.execute(statement)
            row = cur.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else SCHEMA_VERSION
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: schema version {version} is newer than this lol-explorer ({SCHEMA_VERSION}): "
                    "it was written by a later release; upgrade lol-explorer to open it, or point --db / "
                    "LOL_DATA_DIR at another collection"
                )
            while version < SCHEMA_VERSION:
                for statement in _MIGRATIONS[version]:
                    cur.execute(statement)
                version += 1
            cur.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(version)])

    @property
    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        with self._cursor() as cur:
            return int(cur.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])

    def add(
        self,
        lora: LoraWeights,
        *,
        name: str | None = None,
        zoo: str | None = None,
        labels: Mapping[str, Any] | None = None,
        embeddings: Mapping[str, np.ndarray] | None = None,
        estimates: Mapping[str, Estimate] | None = None,
        card: Mapping[str, Any] | None = None,
    ) -> str:
        """Ingest one LoRA with what is known about it, in one transaction; returns its id (the file's sha256).

        ``card``: its report (:func:`lol_engine.report.describe`), of which the card's facts are kept. Ingesting a
        LoRA that is already stored adds nothing to ``loras`` but updates the attached rows.
        """
        item = NewLora(lora, name, zoo, labels or {}, embeddings or {}, estimates or {}, card)
        return self.add_many([item])[0]

    def add_many(self, items: Sequence[NewLora]) -> list[str]:
        """:meth:`add` for many LoRAs in one transaction (all or none).

        Everything is validated before the transaction starts, so only a database failure can abort it. One
        multi-row statement per table instead of one per LoRA: bulk ingests run several times faster.
        """
        return self.add_rows(rows_of(items))

    def add_rows(self, rows: NewRows) -> list[str]:
        """Write rows made by :func:`rows_of` in one transaction (all or none); their LoRAs' ids.

        Safe to call from another thread than the one that reads the files: :func:`lol_engine.ingest.ingest` writes
        one batch while it reads the next (the statements run without the GIL).
        """
        if not rows.loras:
            return []
        with self._transaction() as cur:
            _insert_rows(cur, f"INSERT INTO loras ({_LORA_COLUMNS}, card_json)", _LORA_TYPES, rows.loras, _KEEP)
            _insert_many(cur, "labels", rows.labels)
            _insert_many(cur, "embeddings", rows.embeddings)
            _insert_many(cur, "estimates", rows.estimates)
        return [row[0] for row in rows.loras]

    def card(self, lora_id: str) -> dict[str, Any] | None:
        """The card facts kept for a stored LoRA (:func:`lol_engine.report.card_facts`); None if it has none (stored
        by an earlier release, or not stored)."""
        with self._cursor() as cur:
            row = cur.execute("SELECT card_json FROM loras WHERE id = ?", [lora_id]).fetchone()
        return None if row is None or row[0] is None else dict(json.loads(row[0]))

    def set_card(self, lora_id: str, card: Mapping[str, Any]) -> None:
        """Keep the card facts of a stored LoRA (from its report, or facts): they replace any kept before."""
        text = _card_json(card)
        with self._transaction() as cur:
            found = cur.execute("SELECT count(*) FROM loras WHERE id = ?", [lora_id]).fetchone()[0]
            if not found:
                raise ValueError(f"no stored LoRA {lora_id[:12]}")
            cur.execute("UPDATE loras SET card_json = ? WHERE id = ?", [text, lora_id])

    def set_labels(self, labels: Mapping[str, Mapping[str, Any]]) -> None:
        """Store (or replace) ``{lora id: {label: value}}`` in one transaction; ids must be stored LoRAs."""
        rows = [[i, key, json.dumps(value)] for i, values in labels.items() for key, value in values.items()]
        with self._transaction() as cur:
            if labels:
                placeholders = ", ".join("?" * len(labels))
                found = cur.execute(f"SELECT count(*) FROM loras WHERE id IN ({placeholders})", list(labels))
                if found.fetchall()[0][0] != len(labels):  # fetched to the end: the insert registers a view next
                    raise ValueError("labels for a LoRA that is not stored")
            _insert_many(cur, "labels", rows)

    def set_estimates(self, rows: Sequence[tuple[str, Estimate]]) -> None:
        """Store (or replace) ``(lora id, estimate)`` rows in one transaction."""
        with self._transaction() as cur:
            _insert_many(cur, "estimates", [[i, e.predictor, _estimate_json(e)] for i, e in rows])

    def set_projection(self, name: str, ids: Sequence[str], xy: np.ndarray) -> None:
        """Store 2-D map coordinates ``xy: (len(ids), 2)`` under map ``name`` (replacing earlier ones)."""
        xy = np.asarray(xy, dtype=float)
        if xy.shape != (len(ids), 2):
            raise ValueError(f"expected coordinates of shape ({len(ids)}, 2), got {xy.shape}")
        with self._transaction() as cur:
            cur.execute("DELETE FROM projections WHERE map = ?", [name])
            rows = [[i, name, float(x), float(y)] for i, (x, y) in zip(ids, xy, strict=True)]
            _insert_many(cur, "projections", rows)

    def projection(self, name: str) -> tuple[list[str], np.ndarray]:
        """Ids and coordinates of a stored map."""
        with self._cursor() as cur:
            rows = cur.execute(
                "SELECT lora_id, x, y FROM projections WHERE map = ? ORDER BY lora_id", [name]
            ).fetchall()
        return [r[0] for r in rows], np.array([[r[1], r[2]] for r in rows], dtype=float).reshape(-1, 2)

    def count(self) -> int:
        """Number of stored LoRAs."""
        with self._cursor() as cur:
            return int(cur.execute("SELECT count(*) FROM loras").fetchone()[0])

    def get(self, lora_id: str) -> StoredLora | None:
        """One stored LoRA, or None."""
        with self._cursor() as cur:
            row = cur.execute(f"SELECT {_LORA_COLUMNS} FROM loras WHERE id = ?", [lora_id]).fetchone()
        return None if row is None else _stored(row)

    def all(self) -> list[StoredLora]:
        """Every stored LoRA, oldest first (ties by id)."""
        with self._cursor() as cur:
            rows = cur.execute(f"SELECT {_LORA_COLUMNS} FROM loras ORDER BY added_at, id").fetchall()
        return [_stored(row) for row in rows]

    def all_labels(self) -> dict[str, dict[str, Any]]:
        """``{lora id: {label: value}}`` for every LoRA with labels."""
        out: dict[str, dict[str, Any]] = {}
        with self._cursor() as cur:
            for lora_id, name, value in cur.execute("SELECT lora_id, name, value_json FROM labels").fetchall():
                out.setdefault(lora_id, {})[name] = json.loads(value)
        return out

    def all_estimates(self) -> dict[str, dict[str, Estimate]]:
        """``{lora id: {predictor: estimate}}`` for every LoRA with estimates (rows still raw are left out)."""
        out: dict[str, dict[str, Estimate]] = {}
        with self._cursor() as cur:
            rows = cur.execute("SELECT lora_id, predictor, estimate_json FROM estimates").fetchall()
        for lora_id, predictor, text in rows:
            data = json.loads(text)
            if "raw" not in data:
                out.setdefault(lora_id, {})[predictor] = Estimate.from_json(data)
        return out

    def raw_estimates(self) -> list[tuple[str, str, dict[str, float]]]:
        """``(lora id, predictor, {target: value})`` of every estimate still in version 1's bare form."""
        with self._cursor() as cur:
            rows = cur.execute(
                "SELECT lora_id, predictor, estimate_json FROM estimates WHERE estimate_json LIKE '{\"raw\":%' "
                "ORDER BY lora_id, predictor"
            ).fetchall()
        return [(i, p, {str(k): float(v) for k, v in json.loads(t)["raw"].items()}) for i, p, t in rows]

    def encoders(self) -> dict[str, int]:
        """``{encoder: number of LoRAs embedded}``."""
        with self._cursor() as cur:
            rows = cur.execute("SELECT encoder, count(*) FROM embeddings GROUP BY encoder ORDER BY encoder").fetchall()
        return {name: int(n) for name, n in rows}

    def embedding(self, lora_id: str, encoder: str) -> np.ndarray | None:
        """One stored embedding, or None."""
        with self._cursor() as cur:
            row = cur.execute(
                "SELECT v FROM embeddings WHERE lora_id = ? AND encoder = ?", [lora_id, encoder]
            ).fetchone()
        return None if row is None else np.asarray(row[0], dtype=np.float32)

    def maps(self) -> dict[str, int]:
        """``{map name: number of placed LoRAs}``."""
        with self._cursor() as cur:
            rows = cur.execute("SELECT map, count(*) FROM projections GROUP BY map ORDER BY map").fetchall()
        return {name: int(n) for name, n in rows}

    def add_projection(self, name: str, ids: Sequence[str], xy: np.ndarray) -> None:
        """Add (or move) points of map ``name`` without touching the others."""
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        if len(xy) != len(ids):
            raise ValueError(f"expected {len(ids)} coordinate pairs, got {len(xy)}")
        with self._transaction() as cur:
            _insert_many(
                cur, "projections", [[i, name, float(x), float(y)] for i, (x, y) in zip(ids, xy, strict=True)]
            )

    def labels(self, lora_id: str) -> dict[str, Any]:
        """The labels stored for a LoRA."""
        with self._cursor() as cur:
            rows = cur.execute(
                "SELECT name, value_json FROM labels WHERE lora_id = ? ORDER BY name", [lora_id]
            ).fetchall()
        return {name: json.loads(value) for name, value in rows}

    def estimates(self, lora_id: str) -> dict[str, Estimate]:
        """``{predictor: estimate}`` stored for a LoRA (rows still raw are left out)."""
        with self._cursor() as cur:
            rows = cur.execute(
                "SELECT predictor, estimate_json FROM estimates WHERE lora_id = ? ORDER BY predictor", [lora_id]
            ).fetchall()
        parsed = [(predictor, json.loads(text)) for predictor, text in rows]
        return {predictor: Estimate.from_json(data) for predictor, data in parsed if "raw" not in data}

    def embeddings(self, encoder: str) -> tuple[list[str], np.ndarray]:
        """Ids (sorted) and the ``(n, dim)`` matrix of one encoder's embeddings."""
        with self._cursor() as cur:
            rows = cur.execute(
                "SELECT lora_id, v FROM embeddings WHERE encoder = ? ORDER BY lora_id", [encoder]
            ).fetchall()
        if not rows:
            return [], np.zeros((0, 0), dtype=np.float32)
        return [r[0] for r in rows], np.array([r[1] for r in rows], dtype=np.float32)

    def nearest(
        self,
        encoder: str,
        vector: np.ndarray,
        k: int = 10,
        exclude: str | None = None,
        base_family: str | None = None,
    ) -> list[tuple[str, float]]:
        """Exact k nearest stored LoRAs by cosine similarity of ``encoder`` embeddings: ``[(id, similarity)]``.

        ``base_family``: only LoRAs of that family.
        """
        v = np.asarray(vector, dtype=np.float32).reshape(-1).tolist()
        with self._cursor() as cur:
            rows = cur.execute(
                "SELECT e.lora_id, list_cosine_similarity(e.v, ?::FLOAT[]) AS s FROM embeddings e "
                "LEFT JOIN loras l ON l.id = e.lora_id "
                "WHERE e.encoder = ? AND e.dim = ? AND e.lora_id IS DISTINCT FROM ? "
                "AND (? IS NULL OR l.base_family = ?) ORDER BY s DESC, e.lora_id LIMIT ?",
                [v, encoder, len(v), exclude, base_family, base_family, k],
            ).fetchall()
        return [(r[0], float(r[1])) for r in rows]

    def index_rows(self, encoder: str) -> tuple[list[str], list[str], np.ndarray]:
        """Ids, base families and the ``(n, dim)`` float32 matrix of one encoder's embeddings, by id, for a
        neighbour index (:mod:`lol_engine.ann`); only rows of the encoder's most common dimension."""
        with self._cursor() as cur:
            dims = cur.execute(
                "SELECT dim, count(*) AS n FROM embeddings WHERE encoder = ? GROUP BY dim ORDER BY n DESC, dim",
                [encoder],
            ).fetchall()
            if not dims:
                return [], [], np.zeros((0, 0), dtype=np.float32)
            dim = int(dims[0][0])
            got = cur.execute(
                f"SELECT e.lora_id, coalesce(l.base_family, 'unknown') AS family, e.v::FLOAT[{dim}] AS v "
                "FROM embeddings e LEFT JOIN loras l ON l.id = e.lora_id WHERE e.encoder = ? AND e.dim = ? "
                "ORDER BY e.lora_id",
                [encoder, dim],
            ).fetchnumpy()
        ids, families = [str(i) for i in got["lora_id"]], [str(f) for f in got["family"]]
        x = np.stack(list(got["v"])).astype(np.float32) if ids else np.zeros((0, dim), dtype=np.float32)
        return ids, families, x.reshape(len(ids), dim)

    def get_many(self, ids: Sequence[str]) -> dict[str, StoredLora]:
        """``{id: stored LoRA}`` for the ids that are stored (one query)."""
        if not ids:
            return {}
        with self._cursor() as cur:
            placeholders = ", ".join("?" * len(ids))
            rows = cur.execute(f"SELECT {_LORA_COLUMNS} FROM loras WHERE id IN ({placeholders})", list(ids)).fetchall()
        return {row[0]: _stored(row) for row in rows}

    @staticmethod
    def rows_of(item: NewLora) -> dict[str, list[list[Any]]]:
        """The rows :meth:`add_many` writes for ``item``, by table (``loras``, ``labels``, ``embeddings``,
        ``estimates``), in the tables' column order: what a worker of a distributed ingest sends back, so that its
        Parquet shards (:meth:`load_shards`) hold exactly what the single-process path stores."""
        rows = rows_of([item])
        return {
            "loras": rows.loras,
            "labels": rows.labels,
            "embeddings": [[lora_id, encoder, n, v.tolist()] for lora_id, encoder, n, v in rows.embeddings],
            "estimates": rows.estimates,
        }

    def ids(self) -> list[str]:
        """The id (sha256) of every stored LoRA, sorted."""
        with self._cursor() as cur:
            return [r[0] for r in cur.execute("SELECT id FROM loras ORDER BY id").fetchall()]

    def has(self, sha256s: Sequence[str]) -> set[str]:
        """Which of ``sha256s`` are stored LoRAs."""
        if not sha256s:
            return set()
        import pyarrow as pa

        with self._cursor() as cur:
            cur.register("lol_asked", pa.table({"id": pa.array(list(sha256s), pa.string())}))
            try:
                rows = cur.execute("SELECT DISTINCT a.id FROM lol_asked a JOIN loras l ON l.id = a.id").fetchall()
            finally:
                cur.unregister("lol_asked")
        return {r[0] for r in rows}

    def load_shards(self, parts: Sequence[str | os.PathLike[str]]) -> int:
        """Add the LoRAs of Parquet shard folders (each holding ``loras``, ``labels``, ``embeddings`` and
        ``estimates.parquet``, as :mod:`lol_engine.scale` writes them) in one transaction; returns how many were new.

        Only LoRAs not stored yet are added, with everything attached to them; a stored LoRA is left as it is (its
        labels may have been edited since). Within the shards, the first row of a LoRA wins, and the last row of a
        label, embedding or estimate (a labels table's row comes after the file's own).
        """
        import duckdb

        files = {
            t: [str(Path(p) / f"{t}.parquet") for p in parts] for t in ("loras", "labels", "embeddings", "estimates")
        }
        if not files["loras"]:
            return 0

        def latest(table: str, columns: str, key: str, first: bool = False) -> str:
            order = "filename, file_row_number" if first else "filename DESC, file_row_number DESC"
            return (
                f"SELECT {columns} FROM (SELECT *, row_number() OVER (PARTITION BY {key} ORDER BY {order}) AS lol_rn "
                f"FROM read_parquet(?, filename = true, file_row_number = true) "
                f"WHERE {key.split(',')[0]} IN (SELECT id FROM lol_new)) WHERE lol_rn = 1"
            )

        with self._transaction() as cur:
            try:
                before = cur.execute("SELECT count(*) FROM loras").fetchone()[0]
                cur.execute(
                    "CREATE OR REPLACE TEMP TABLE lol_new AS SELECT DISTINCT id FROM read_parquet(?) "
                    "WHERE id NOT IN (SELECT id FROM loras)",
                    [files["loras"]],
                )
                columns = _LORA_COLUMNS + ", card_json"
                cur.execute(f"INSERT INTO loras ({columns}) {latest('loras', columns, 'id', True)}", [files["loras"]])
                for table, columns, key in (
                    ("labels", "lora_id, name, value_json", "lora_id, name"),
                    ("embeddings", "lora_id, encoder, dim, v", "lora_id, encoder"),
                    ("estimates", "lora_id, predictor, estimate_json", "lora_id, predictor"),
                ):
                    cur.execute(f"INSERT INTO {table} {latest(table, columns, key)}", [files[table]])
                added = cur.execute("SELECT count(*) FROM loras").fetchone()[0] - before
                cur.execute("DROP TABLE lol_new")
            except duckdb.IOException as exc:
                raise StoreError(f"{self.path}: cannot read the Parquet shards ({_reason(exc)})") from None
        return int(added)
