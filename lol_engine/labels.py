"""Labels for a user's own LoRAs: from a table (CSV or Parquet) joined by a key, and from the files' own metadata.

A labels table has one key column and one column per label. The key is one of:

- ``name``: the LoRA's display name (the folder's name for a PEFT, diffusers or mlx-lm folder, else the file stem:
  :func:`lol_engine.lora.locate.display_name`);
- ``path``: the LoRA's path, relative to a folder given to ``lol ingest`` (its file, or its adapter folder), or
  absolute;
- ``sha256``: the file's SHA-256, the LoRA's id in the collection.

Columns are typed once for the whole table: ``numeric`` (every cell a number), ``multilabel`` (cells are lists:
Parquet list columns, or JSON lists such as ``["anime", "portrait"]`` in a CSV) or ``categorical`` (anything else, kept
as text). Empty cells are missing labels, not zeros. Rows that match no LoRA, rows that match several (a name shared
by two LoRAs) and LoRAs without a row are reported by :func:`match_labels`, never dropped silently.

Labels from metadata (:func:`metadata_labels`): kohya's training fields (``ss_num_train_images``,
``ss_max_train_steps``, ``ss_num_epochs``, ``ss_learning_rate``, ``ss_network_dim``, ``ss_network_alpha``,
``ss_resolution``, ``ss_sd_model_name``, and ``tags``: the 20 most frequent tags of ``ss_tag_frequency``), the PEFT
config's ``r``, ``lora_alpha``, ``target_modules`` and ``task_type`` (as ``peft.<field>``), and ``modelspec.*``. A
table's label of the same name wins over the file's.

Tables are untrusted input: size, rows, columns and cell lengths are bounded, and a bad table is a
:class:`~lol_engine.errors.BadRequestError` naming the problem.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lol_engine.errors import BadRequestError, NotFoundError
from lol_engine.lora.metadata import trigger_words
from lol_engine.lora.weights import LoraMetadata

__all__ = [
    "KEYS",
    "LabelMatch",
    "LabelTable",
    "LoraKeys",
    "match_labels",
    "metadata_labels",
    "path_keys",
    "read_labels",
]

KEYS = ("name", "path", "sha256")
MAX_TABLE_BYTES = 64 * 2**20
MAX_ROWS = 1_000_000
MAX_COLUMNS = 256
MAX_CELL_CHARS = 4096
MAX_LIST_ITEMS = 1024
KOHYA_FIELDS = (
    "ss_num_train_images",
    "ss_max_train_steps",
    "ss_num_epochs",
    "ss_learning_rate",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_resolution",
    "ss_sd_model_name",
)
PEFT_FIELDS = ("r", "lora_alpha", "target_modules", "task_type")
N_TAGS = 20


@dataclass(frozen=True)
class LabelTable:
    """A parsed labels table: ``rows`` maps each key value to its labels (missing cells left out)."""

    key: str
    kinds: dict[str, str]  # label -> numeric | categorical | multilabel, in the table's column order
    rows: dict[str, dict[str, Any]]
    source: str = ""

    def describe(self) -> str:
        """``quality (numeric), style (categorical)`` for reports."""
        return ", ".join(f"{name} ({kind})" for name, kind in self.kinds.items())


@dataclass(frozen=True)
class LoraKeys:
    """What a table row can be matched by, for one LoRA: its id, display name and the paths it can be named by."""

    id: str
    name: str
    paths: tuple[str, ...] = ()


@dataclass
class LabelMatch:
    """The join of a table with LoRAs: labels per LoRA id, and everything that did not match one to one."""

    labelled: dict[str, dict[str, Any]] = field(default_factory=dict)
    unmatched_rows: list[str] = field(default_factory=list)  # keys of rows that matched no LoRA
    ambiguous_rows: list[tuple[str, int]] = field(default_factory=list)  # (key, how many LoRAs it matched)
    unlabelled: list[str] = field(default_factory=list)  # names of LoRAs without a row

    def summary(self, table: LabelTable, limit: int = 5) -> list[str]:
        """Lines for a terminal or a page: what was labelled, and every kind of miss (a few examples each)."""

        def some(items: Sequence[str]) -> str:
            shown = ", ".join(repr(i) for i in items[:limit])
            return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")

        lines = [
            f"labels from {table.source or 'the table'}: {len(self.labelled)} LoRA(s) labelled by {table.key} "
            f"with {table.describe() or 'no label column'}"
        ]
        if self.unmatched_rows:
            lines.append(f"{len(self.unmatched_rows)} row(s) matched no LoRA: {some(self.unmatched_rows)}")
        if self.ambiguous_rows:
            shown = some([f"{key} ({n} LoRAs)" for key, n in self.ambiguous_rows])
            lines.append(
                f"{len(self.ambiguous_rows)} row(s) matched several LoRAs and were not used: {shown}; use --key path "
                "or sha256"
            )
        if self.unlabelled:
            lines.append(f"{len(self.unlabelled)} LoRA(s) have no row: {some(self.unlabelled)}")
        return lines


def read_labels(path: str | os.PathLike[str], key: str = "name") -> LabelTable:
    """Read a ``.csv`` or ``.parquet`` labels table keyed by column ``key`` (see the module for the rules)."""
    if key not in KEYS:
        raise BadRequestError(f"--key {key!r}: use one of {', '.join(KEYS)}")
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path.name}: no such labels file")
    size = path.stat().st_size
    if size > MAX_TABLE_BYTES:
        raise BadRequestError(f"{path.name}: a labels table of {size:,} bytes, over the limit of {MAX_TABLE_BYTES:,}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        header, records = _read_csv(path)
    elif suffix == ".parquet":
        header, records = _read_parquet(path)
    else:
        raise BadRequestError(f"{path.name}: a labels table is a .csv or .parquet file")
    if key not in header:
        shown = ", ".join(repr(h) for h in header[:10])
        raise BadRequestError(f"{path.name}: no key column {key!r} (columns: {shown}); name it, or pass --key")
    if len(header) > MAX_COLUMNS:
        raise BadRequestError(f"{path.name}: {len(header)} columns, over the limit of {MAX_COLUMNS}")
    if len(set(header)) != len(header):
        raise BadRequestError(f"{path.name}: two columns have the same name")
    names = [h for h in header if h != key]
    columns = {name: [r.get(name) for r in records] for name in names}
    kinds = {name: _kind(values) for name, values in columns.items()}
    rows: dict[str, dict[str, Any]] = {}
    for i, record in enumerate(records):
        value = record.get(key)
        if value is None or str(value).strip() == "":
            raise BadRequestError(f"{path.name}: row {i + 1} has no {key}")
        key_value = str(value).strip()
        if key_value in rows:
            raise BadRequestError(f"{path.name}: {key} {key_value[:100]!r} appears twice")
        rows[key_value] = {
            name: _typed(record.get(name), kinds[name]) for name in names if not _missing(record.get(name))
        }
    return LabelTable(key, kinds, rows, path.name)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise BadRequestError(f"{path.name}: the labels table is empty") from None
    except csv.Error as exc:
        raise BadRequestError(f"{path.name}: not a CSV file ({exc})") from None
    records: list[dict[str, Any]] = []
    try:
        for line in reader:
            if len(records) >= MAX_ROWS:
                raise BadRequestError(f"{path.name}: more than {MAX_ROWS:,} rows")
            if not any(cell.strip() for cell in line):
                continue
            if len(line) > len(header):
                raise BadRequestError(f"{path.name}: row {len(records) + 1} has more cells than the header")
            records.append({h: _cell(c, path.name) for h, c in zip(header, line, strict=False)})
    except csv.Error as exc:
        raise BadRequestError(f"{path.name}: not a CSV file ({exc})") from None
    return header, records


def _read_parquet(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BadRequestError(
            "reading a Parquet labels table needs pyarrow (pip install 'lol-explorer[app]')"
        ) from None
    try:
        meta = pq.read_metadata(path)
        if meta.num_rows > MAX_ROWS:
            raise BadRequestError(f"{path.name}: {meta.num_rows:,} rows, over the limit of {MAX_ROWS:,}")
        table = pq.read_table(path)
    except BadRequestError:
        raise
    except Exception as exc:  # pyarrow raises many types for a broken file
        raise BadRequestError(f"{path.name}: not a readable Parquet file ({type(exc).__name__})") from None
    header = [str(c) for c in table.column_names]
    return header, [{str(k): _parquet_cell(v, path.name) for k, v in row.items()} for row in table.to_pylist()]


def _cell(text: str, where: str) -> Any:
    """A CSV cell: text, or a list when it is a JSON list."""
    text = text.strip()
    if len(text) > MAX_CELL_CHARS:
        raise BadRequestError(f"{where}: a cell of {len(text):,} characters, over the limit of {MAX_CELL_CHARS:,}")
    if text.startswith("["):
        from lol_engine.lora.safe_io import ReadLimits, parse_json

        try:
            value = parse_json(text, where, ReadLimits(max_json_depth=2))
        except ValueError:  # not JSON after all: a text label that starts with "["
            return text
        if isinstance(value, list):
            return _items(value, where)
    return text


def _parquet_cell(value: Any, where: str) -> Any:
    if isinstance(value, list):
        return _items(value, where)
    if isinstance(value, str) and len(value) > MAX_CELL_CHARS:
        raise BadRequestError(f"{where}: a cell of {len(value):,} characters, over the limit of {MAX_CELL_CHARS:,}")
    return value


def _items(values: list[Any], where: str) -> list[Any]:
    if len(values) > MAX_LIST_ITEMS:
        raise BadRequestError(f"{where}: a list of {len(values):,} items, over the limit of {MAX_LIST_ITEMS:,}")
    if any(isinstance(v, (list, dict)) for v in values):
        raise BadRequestError(f"{where}: a list cell holds a nested list or object")
    return values


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() == ""


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    try:
        number = float(str(value))
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    return int(number) if number.is_integer() and "." not in str(value) and "e" not in str(value).lower() else number


def _kind(values: Iterable[Any]) -> str:
    present = [v for v in values if not _missing(v)]
    if present and all(isinstance(v, list) for v in present):
        return "multilabel"
    if present and all(_number(v) is not None and not isinstance(v, list) for v in present):
        return "numeric"
    return "categorical"


def _typed(value: Any, kind: str) -> Any:
    if kind == "numeric":
        return _number(value)
    if kind == "multilabel":
        return list(value)
    return value if isinstance(value, str) else str(value)


def match_labels(table: LabelTable, loras: Sequence[LoraKeys]) -> LabelMatch:
    """Join ``table`` to ``loras`` by the table's key (see the module); every miss is reported."""
    index: dict[str, list[LoraKeys]] = {}
    for lora in loras:
        keys = {"name": (lora.name,), "sha256": (lora.id,), "path": lora.paths}[table.key]
        for value in set(keys):
            index.setdefault(value, []).append(lora)
    match = LabelMatch()
    for key_value, labels in table.rows.items():
        found = index.get(key_value, []) if table.key != "path" else index.get(_posix(key_value), [])
        if not found:
            match.unmatched_rows.append(key_value)
        elif len({lora.id for lora in found}) > 1:
            match.ambiguous_rows.append((key_value, len({lora.id for lora in found})))
        else:
            match.labelled[found[0].id] = labels
    match.unlabelled = [lora.name for lora in loras if lora.id not in match.labelled]
    return match


def _posix(path: str) -> str:
    return Path(path).as_posix().removeprefix("./").rstrip("/")


def path_keys(weights: Path, roots: Iterable[str | os.PathLike[str]]) -> tuple[str, ...]:
    """The strings a ``path``-keyed row can name a LoRA file by: absolute, and relative to each root (the file,
    and its folder for a known adapter file)."""
    weights = Path(os.path.abspath(weights))
    targets = [weights, weights.parent] if weights.name.endswith(".safetensors") else [weights]
    out = {t.as_posix() for t in targets}
    for root in roots:
        base = Path(os.path.abspath(root))
        for target in targets:
            if target.is_relative_to(base) and target != base:
                out.add(target.relative_to(base).as_posix())
    return tuple(sorted(out))


def metadata_labels(meta: LoraMetadata) -> dict[str, Any]:
    """Labels a LoRA file carries itself (see the module): kohya fields, top tags, PEFT config fields, modelspec."""
    out: dict[str, Any] = {}
    for name in KOHYA_FIELDS:
        value = meta.kohya.get(name)
        if not _missing(value):
            number = _number(value)
            out[name] = number if number is not None else str(value)[:200]
    tags = [t["tag"] for t in trigger_words(meta.kohya, meta.modelspec, [])["top_tags"]][:N_TAGS]
    if tags:
        out["tags"] = tags
    for name in PEFT_FIELDS:
        value = meta.adapter_config.get(name)
        if isinstance(value, list):
            out[f"peft.{name}"] = sorted(str(v)[:100] for v in value[:256])
        elif not _missing(value) and isinstance(value, (str, int, float)):
            out[f"peft.{name}"] = value if not isinstance(value, str) else value[:200]
    for key, value in list(meta.modelspec.items())[:64]:
        name = key if key.startswith("modelspec.") else f"modelspec.{key}"
        if not _missing(value) and name != "modelspec.thumbnail":  # a thumbnail is an image, not a label
            out[name] = str(value)[:200]
    return out
