"""Parquet shards of a distributed ingest: one folder per part, one file per store table, plus errors and resume facts.

``OUT/part-<run>-<n>/`` holds ``loras``, ``labels``, ``embeddings`` and ``estimates.parquet`` (the store's tables,
column for column: :meth:`lol_engine.store.LoraStore.load_shards` inserts them), ``errors.parquet`` (``path``,
``reason`` of each refused file) and ``done.parquet`` (``key``, ``size``, ``mtime_ns``, ``sha256``, ``status`` of
every task seen: a rerun skips tasks done before without reading them). A part is written in a hidden staging folder
and renamed into place, so a part is whole or absent; a killed run loses only the part in progress.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["ShardWriter", "done_keys", "parts", "schemas", "stored_ids"]


@lru_cache(maxsize=1)
def schemas() -> dict[str, Any]:
    """The Arrow schema of each shard file (pyarrow is imported only when shards are written or read)."""
    import pyarrow as pa

    text = pa.string()
    return {
        "loras": pa.schema(
            [
                ("id", text),
                ("name", text),
                ("source", text),
                ("format", text),
                ("base_family", text),
                ("spec_json", text),
                ("n_modules", pa.int32()),
                ("rank_min", pa.int32()),
                ("rank_max", pa.int32()),
                ("size_bytes", pa.int64()),
                ("dtype", text),
                ("metadata_json", text),
                ("zoo", text),
                ("added_at", pa.timestamp("us")),
                ("card_json", text),
            ]
        ),
        "labels": pa.schema([("lora_id", text), ("name", text), ("value_json", text)]),
        "embeddings": pa.schema(
            [("lora_id", text), ("encoder", text), ("dim", pa.int32()), ("v", pa.list_(pa.float32()))]
        ),
        "estimates": pa.schema([("lora_id", text), ("predictor", text), ("estimate_json", text)]),
        "errors": pa.schema([("path", text), ("reason", text)]),
        "done": pa.schema(
            [("key", text), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("sha256", text), ("status", text)]
        ),
    }


def parts(out: str | os.PathLike[str]) -> list[Path]:
    """The whole parts under ``out``, in the order they were written."""
    root = Path(out)
    return sorted(p for p in root.glob("part-*") if p.is_dir()) if root.is_dir() else []


def done_keys(out: str | os.PathLike[str]) -> dict[str, tuple[int, int]]:
    """``{task key: (size, mtime_ns)}`` of the local tasks that earlier runs ingested (or found stored)."""
    import pyarrow.parquet as pq

    found: dict[str, tuple[int, int]] = {}
    for part in parts(out):
        table = pq.read_table(part / "done.parquet").to_pylist()
        found |= {r["key"]: (r["size"], r["mtime_ns"]) for r in table if r["status"] in ("ok", "stored")}
    return found


def stored_ids(out: str | os.PathLike[str]) -> set[str]:
    """The sha256 of every LoRA in the shards under ``out``."""
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for part in parts(out):
        ids.update(pq.read_table(part / "loras.parquet", columns=["id"]).column("id").to_pylist())
    return ids


class ShardWriter:
    """Collects worker rows and writes a part every ``rows_per_part`` LoRAs or refusals (and at :meth:`close`)."""

    def __init__(self, out: str | os.PathLike[str], rows_per_part: int = 2048) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.run = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%f")
        self.rows_per_part = rows_per_part
        self.written: list[Path] = []
        self._tables: dict[str, list[dict[str, Any]]] = {name: [] for name in schemas()}
        self._pending = 0

    def add(self, row: dict[str, Any], extra_labels: dict[str, Any] | None = None) -> None:
        """One worker row (:mod:`lol_engine.scale.work`); ``extra_labels`` win over the row's own (a sha256-keyed
        table's labels)."""
        status = row["status"]
        self._tables["done"].append(
            {"key": row["key"], "size": row["size"], "mtime_ns": row["mtime_ns"], "sha256": row["sha256"] or None}
            | {"status": status}
        )
        if status == "error":
            self._tables["errors"].append({"path": row["path"], "reason": row["reason"]})
        elif status == "ok":
            tables = json.loads(row["rows_json"])
            lora_id = tables["loras"][0][0]
            tables["labels"] += [[lora_id, k, json.dumps(v)] for k, v in (extra_labels or {}).items()]
            for name, rows in tables.items():
                columns = schemas()[name].names
                self._tables[name] += [dict(zip(columns, values, strict=True)) for values in rows]
        self._pending += 1
        if self._pending >= self.rows_per_part:
            self.flush()

    def flush(self) -> Path | None:
        """Write what was collected as one part (nothing if nothing was); returns its folder."""
        if not self._pending:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        name = f"part-{self.run}-{len(self.written):05d}"
        staging = self.out / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for table, rows in self._tables.items():
            if table == "loras":
                for row in rows:
                    row["added_at"] = datetime.datetime.fromisoformat(row["added_at"])
            pq.write_table(pa.Table.from_pylist(rows, schema=schemas()[table]), staging / f"{table}.parquet")
            rows.clear()
        final = self.out / name
        os.replace(staging, final)
        self.written.append(final)
        self._pending = 0
        return final

    def close(self) -> list[Path]:
        """Write the last part; returns every part this writer wrote."""
        self.flush()
        return self.written
