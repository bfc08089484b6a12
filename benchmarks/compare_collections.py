"""Compare two collection databases row by row: what ``lol ingest`` and ``lol ingest --engine ray`` stored.

    python benchmarks/compare_collections.py local.duckdb ray.duckdb

Prints, table by table: row counts, whether every ``loras`` column but ``added_at`` is identical, whether labels are
equal, the largest relative difference of fingerprints and the largest absolute difference of other embeddings (ΔW
sketch, LoL), and the largest absolute difference of any number inside the estimates (with their structure).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import duckdb
import numpy as np


def tables(db: str) -> dict[str, dict[Any, Any]]:
    con = duckdb.connect(db, read_only=True)
    try:
        return {
            "loras": {r[0]: r[1:] for r in con.execute("SELECT * EXCLUDE (added_at) FROM loras").fetchall()},
            "labels": {(r[0], r[1]): json.loads(r[2]) for r in con.execute("SELECT * FROM labels").fetchall()},
            "embeddings": {
                (r[0], r[1]): np.asarray(r[2], dtype=np.float64)
                for r in con.execute("SELECT lora_id, encoder, v FROM embeddings").fetchall()
            },
            "estimates": {(r[0], r[1]): json.loads(r[2]) for r in con.execute("SELECT * FROM estimates").fetchall()},
        }
    finally:
        con.close()


def numbers(value: Any, out: list[float]) -> list[float]:
    """Every number inside a JSON value, in order."""
    if isinstance(value, dict):
        for v in value.values():
            numbers(v, out)
    elif isinstance(value, list):
        for v in value:
            numbers(v, out)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        out.append(float(value))
    return out


def compare(first: str, second: str) -> list[str]:
    a, b = tables(first), tables(second)
    lines = [f"loras {len(a['loras'])} {len(b['loras'])}; identical but added_at: {a['loras'] == b['loras']}"]
    lines.append(f"labels {len(a['labels'])} {len(b['labels'])}; equal: {a['labels'] == b['labels']}")
    ea, eb = a["embeddings"], b["embeddings"]
    shared = [k for k in ea if k in eb]
    fp = [
        float(np.max(np.abs(ea[k] - eb[k]) / np.maximum(np.abs(ea[k]), 1e-12)))
        for k in shared
        if k[1] == "fingerprint"
    ]
    other = [float(np.max(np.abs(ea[k] - eb[k]))) for k in shared if k[1] != "fingerprint"]
    lines.append(
        f"embeddings {len(ea)} {len(eb)}; same keys: {ea.keys() == eb.keys()}; fingerprint max rel diff "
        f"{max(fp, default=0):.3g}; other encoders max abs diff {max(other, default=0):.3g}"
    )
    worst, same_shape = 0.0, a["estimates"].keys() == b["estimates"].keys()
    for key, estimate in a["estimates"].items():
        x, y = numbers(estimate, []), numbers(b["estimates"].get(key), [])
        same_shape &= len(x) == len(y)
        worst = max([worst, *(abs(p - q) for p, q in zip(x, y, strict=False))])
    lines.append(
        f"estimates {len(a['estimates'])} {len(b['estimates'])}; same structure: {same_shape}; "
        f"every number max abs diff {worst:.3g}"
    )
    return lines


if __name__ == "__main__":
    print("\n".join(compare(sys.argv[1], sys.argv[2])))
