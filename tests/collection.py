"""A small real collection for explorer and app tests: slices of the shipped zoos, with their labels."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ZOOS = Path(__file__).resolve().parent.parent / "data" / "zoo"
SHIPPED = {  # the predictors shipped inside the package
    "digits-acc_own",
    "digits-classes",
    "fashion-gen-bold",
    "fashion-gen-class",
    "fashion-gen-quality",
    "minilm-wordnet-drift",
    "minilm-wordnet-probe_r10",
    "minilm-wordnet-test_acc",
    "minilm-wordnet-val_loss",
    "mobilenet-fashion-probe_agree",
    "mobilenet-fashion-probe_kl",
}

TOY_SHIPPED = {n for n in SHIPPED if n.startswith(("digits-", "fashion-gen-"))}  # those that fit the toy zoos' LoRAs


def mini_zoo(out: Path, zoo: str, n: int) -> Path:
    """A zoo folder named ``zoo`` whose manifest holds the first ``n`` LoRAs of the shipped zoo (absolute paths)."""
    table = pq.read_table(ZOOS / zoo / "manifest.parquet").slice(0, n)
    paths = [str(ZOOS / zoo / p) for p in table.column("path").to_pylist()]
    table = table.set_column(table.schema.get_field_index("path"), "path", pa.array(paths))
    folder = out / zoo
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "manifest.parquet")
    return folder
