"""Shared fixtures. Offline mode is set before anything can import huggingface_hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest
import torch

TOLERANCES = {torch.float32: 1e-4, torch.float64: 1e-10}


@pytest.fixture(params=[torch.float32, torch.float64], ids=["f32", "f64"])
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """Run a test in float32 and float64; pair with ``TOLERANCES[dtype]``."""
    return request.param


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator: every test draws its own, reproducible randomness."""
    return torch.Generator().manual_seed(1234)


def make_collection(root):  # type: ignore[no-untyped-def]
    """An :class:`Explorer` over 40 digits + 30 fashion-gen LoRAs of the shipped zoos, with labels and fitted maps."""
    from collection import mini_zoo

    from lol_engine.explorer import Explorer

    zoos = [mini_zoo(root / "zoos", "digits", 40), mini_zoo(root / "zoos", "fashion-gen", 30)]
    explorer = Explorer.open(root / "data" / "lol.duckdb")
    explorer.start(zoos, progress=False)
    return explorer


@pytest.fixture(scope="session")
def collection(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A read-only shared collection (:func:`make_collection`); tests that add LoRAs make their own."""
    pytest.importorskip("duckdb")
    explorer = make_collection(tmp_path_factory.mktemp("collection"))
    yield explorer
    explorer.close()
