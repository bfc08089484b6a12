"""The zoo manifest: one Parquet row per LoRA (readable by DuckDB: ``SELECT * FROM 'manifest.parquet'``).

``split`` is drawn per group (:meth:`Recipe.group`; LoRAs without one are their own group), ``split_lora`` per LoRA
whatever its group: the latter is kept only to show how much a split that ignores groups flatters a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lol_engine.lora.safe_io import file_sha256
from lol_engine.zoo.recipe import Recipe, ZooSettings, split_of

__all__ = ["MANIFEST_NAME", "read_manifest", "write_manifest"]

MANIFEST_NAME = "manifest.parquet"


def _row(out: Path, record: dict[str, Any], recipe: Recipe, base: tuple[str, str]) -> dict[str, Any]:
    index = record["index"]
    path = f"loras/{index:05d}"
    row: dict[str, Any] = {
        "index": index,
        "path": path,
        "sha256": file_sha256(out / path / "adapter_model.safetensors"),
        "split": "",
        "split_lora": "",
        "group": None,
        "seed": record["seed"],
        "recipe": recipe.name,
        "recipe_version": recipe.version,
        "base_name": base[0],
        "base_sha256": base[1],
        "train_seconds": float(record["seconds"]),
    }
    row |= {f"hp_{k}": v for k, v in record["choices"].items()}
    row |= {k if k.startswith("t_") else f"y_{k}": v for k, v in record["labels"].items()}
    return row


def write_manifest(out: Path, recipe: Recipe, settings: ZooSettings, n: int, base: tuple[str, str]) -> Path:
    """Collect every finished LoRA's ``labels.json`` into ``manifest.parquet``; refuse an incomplete zoo."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for index in range(n):
        labels = out / "loras" / f"{index:05d}" / "labels.json"
        if not labels.exists():
            raise FileNotFoundError(f"{labels} is missing: the zoo is incomplete; run the build again to finish it")
        record = json.loads(labels.read_text())
        row = _row(out, record, recipe, base)
        row["group"] = recipe.group(record["choices"])
        row["split"] = split_of(settings.seed, index, row["group"])
        row["split_lora"] = split_of(settings.seed, index)
        rows.append(row)
    path = out / MANIFEST_NAME
    table = pa.Table.from_pylist(rows)
    table = table.set_column(  # a string column even when no LoRA has a group
        table.schema.get_field_index("group"), "group", pa.array([r["group"] for r in rows], type=pa.string())
    )
    table = table.replace_schema_metadata({"zoo": json.dumps({"recipe": recipe.name, "settings": settings.to_dict()})})
    pq.write_table(table, path)
    return path


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """The manifest's rows as dicts (a zoo folder or the Parquet file itself)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    return pq.read_table(path).to_pylist()
