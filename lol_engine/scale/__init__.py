"""Ingest at scale: LoRAs from many processes or machines on Ray Data, into Parquet shards the store loads.

``ray_ingest`` (:mod:`lol_engine.scale.pipeline`) is imported on first use: Ray is an optional extra
(``pip install 'lol-explorer[scale]'``) and ``import lol_engine`` never imports it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RayIngestReport", "ray_ingest"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lol_engine.scale import pipeline as module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
