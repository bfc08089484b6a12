"""The default zoo in data/: complete, intact, loadable, and reproducible from its recorded command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("pyarrow")

from lol_engine import load_lora
from lol_engine.lora.safe_io import file_sha256
from lol_engine.zoo import ZooSettings, build_zoo, read_manifest
from lol_engine.zoo.datasets import DataSourceError, fashion_mnist

DATA = Path(__file__).parent.parent / "data" / "zoo"
ZOOS = {"digits": 1023, "fashion-gen": 1000}


@pytest.mark.parametrize(("name", "n"), ZOOS.items())
def test_shipped_zoo_is_complete_and_intact(name: str, n: int) -> None:
    zoo = DATA / name
    rows = read_manifest(zoo)
    assert len(rows) == n and [r["index"] for r in rows] == list(range(n))
    for row in rows:
        assert file_sha256(zoo / row["path"] / "adapter_model.safetensors") == row["sha256"]
    lora = load_lora(zoo / rows[0]["path"])
    assert lora.meta.dtype == "F16" and lora.meta.safetensors_metadata["lol.zoo"] == name
    settings = json.loads((zoo / "zoo.json").read_text())["settings"]
    assert settings == ZooSettings().to_dict() | {"n": None}


def _rebuild_first(name: str, tmp_path: Path, k: int) -> None:
    build_zoo(name, tmp_path, ZooSettings(n=k), progress=False)
    shipped = read_manifest(DATA / name)[:k]
    rebuilt = read_manifest(tmp_path)
    assert [r["sha256"] for r in rebuilt] == [r["sha256"] for r in shipped]
    assert [r["base_sha256"] for r in rebuilt] == [r["base_sha256"] for r in shipped]


def test_digits_zoo_is_reproducible(tmp_path: Path) -> None:
    _rebuild_first("digits", tmp_path, 3)


@pytest.mark.slow
def test_fashion_gen_zoo_is_reproducible(tmp_path: Path) -> None:
    try:
        fashion_mnist("test")
    except DataSourceError as exc:
        pytest.skip(str(exc))
    _rebuild_first("fashion-gen", tmp_path, 2)
