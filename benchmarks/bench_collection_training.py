"""Learning on a collection equals learning on the zoo: the shipped digits zoo, ingested as a user's plain folder with
a CSV of its labels and split, trained with ``lol train --db``, beside ``train_on_zoo`` on the same LoRAs and split.

    python benchmarks/bench_collection_training.py [--n 150] [--epochs 6] [--seeds 3] [--model svd]

Prints the collection run's report (test metrics, baselines on the same split) and the zoo run's test R².
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from lol_engine import load_lora
from lol_engine.cli import main as lol
from lol_engine.train.loop import LoadedZoo, TrainConfig, train_on_zoo

ZOO = Path(__file__).resolve().parent.parent / "data" / "zoo" / "digits"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=150, help="LoRAs of the digits zoo")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", default="svd")
    args = parser.parse_args()
    rows = pq.read_table(ZOO / "manifest.parquet").slice(0, args.n).to_pylist()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with (root / "labels.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["name", "acc_own", "split"])
            for row in rows:
                name = f"run-{Path(row['path']).name}"
                shutil.copytree(ZOO / row["path"], root / "loras" / name)
                writer.writerow([name, row["y_acc_own"], row["split"]])
        db = str(root / "data" / "lol.duckdb")
        with contextlib.redirect_stdout(io.StringIO()):
            lol(["ingest", str(root / "loras"), "--db", db, "--labels", str(root / "labels.csv")])
        print(f"lol train --db ({args.model}, {args.epochs} epochs):")
        lol(
            [
                "train",
                "--db",
                db,
                "--label",
                "acc_own",
                "--model",
                args.model,
                "--seeds",
                str(args.seeds),
                "--epochs",
                str(args.epochs),
            ]
        )
    zoo = LoadedZoo(ZOO, rows, [load_lora(ZOO / r["path"]) for r in rows])
    config = [TrainConfig(epochs=args.epochs, seed=s) for s in range(args.seeds)]
    r2 = [train_on_zoo(zoo, "acc_own", args.model, config=c)[2]["test"]["r2"] for c in config]
    print(
        f"train_on_zoo on the same LoRAs and split: test r2 {np.mean(r2):.4f} ± {np.std(r2):.4f} ({args.seeds} seeds)"
    )


if __name__ == "__main__":
    main()
