"""The app's data API: plain functions that return JSON-ready dicts (no Markdown, no gradio), one per question.

``app/ui.py`` registers each with ``gr.api`` under the name in :data:`ENDPOINTS`, so that ``gradio_client`` gets
named, typed endpoints that return data::

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    rows = client.predict("", "", "", 5, 0, api_name="/collection_rows")["rows"]
    lora = client.predict(rows[0]["id"], 5, "", api_name="/lora")

Text from files (names, metadata) is returned as it is: JSON is not markup, and escaping is the renderer's job. Every
number is finite or ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from app.handlers import Filters, analyse_upload, card_data, predictor_glossary
from app.startup import StartupJob
from lol_engine import ReadLimits
from lol_engine.errors import BadRequestError
from lol_engine.explorer import Explorer, Neighbour, map_title

__all__ = [
    "ENDPOINTS",
    "collection_rows",
    "collection_status",
    "comparison",
    "lora",
    "map_points",
    "maps",
    "neighbours",
    "prediction",
    "predictors",
]

ENDPOINTS = (
    "collection_status",
    "lora",
    "neighbours",
    "collection_rows",
    "comparison",
    "prediction",
    "predictors",
    "maps",
    "map_points",
)
MAX_ROWS = 10_000  # per collection_rows page
MAX_K = 100


def _clean(value: Any) -> Any:
    """``value`` with non-finite floats as ``None`` and tuples as lists, recursively (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _k(k: int) -> int:
    if not 1 <= int(k) <= MAX_K:
        raise BadRequestError(f"k must be 1–{MAX_K} (got {k})")
    return int(k)


def _neighbour(n: Neighbour) -> dict[str, Any]:
    return {
        "id": n.id,
        "name": n.name,
        "collection": n.zoo or "uploads",
        "base_family": n.base_family,
        "similarity": n.similarity,
        "by": n.by,
        "relation": n.relation.text if n.relation else None,
    }


def collection_status(explorer: Explorer, startup: StartupJob | None = None) -> dict[str, Any]:
    """How many LoRAs, predictors and maps the collection has, and whether its first build is still running."""
    building = startup is not None and not startup.finished
    return {
        "loras": explorer.count(),
        "predictors": sorted(explorer.predictors),
        "maps": explorer.maps(),
        "building": building,
        "progress": startup.fraction() if startup is not None else 1.0,
        "message": (startup.status() if startup is not None else "") or None,
    }


def lora(explorer: Explorer, lora_id: str, k: int = 10, by: str = "") -> dict[str, Any]:
    """A stored LoRA: its fields, labels, predictions (one dict per predictor) and ``k`` nearest neighbours
    (``by``: empty for exact ΔW cosine, else an encoder name such as ``fingerprint``)."""
    stored = explorer.get(lora_id)
    return _clean(
        {
            "id": stored.id,
            "name": stored.name,
            "collection": stored.zoo or "uploads",
            "format": stored.format,
            "base_family": stored.base_family,
            "rank_min": stored.rank_min,
            "rank_max": stored.rank_max,
            "n_modules": stored.n_modules,
            "dtype": stored.dtype,
            "size_bytes": stored.size_bytes,
            "sha256": stored.id,
            "labels": explorer.labels(stored.id),
            "predictions": [e.to_json() for e in explorer.estimates(stored.id).values()],
            "neighbours": neighbours(explorer, stored.id, k, by),
            "card": card_data(explorer, stored.id),
        }
    )


def neighbours(explorer: Explorer, lora_id: str, k: int = 10, by: str = "") -> list[dict[str, Any]]:
    """The ``k`` stored LoRAs nearest to a stored one, comparable ones only (same base family or shared modules)."""
    if by and by not in explorer.store.encoders():
        known = ", ".join(sorted(explorer.store.encoders()))
        raise BadRequestError(f"unknown encoder {by!r}: leave it empty for ΔW cosine, or one of {known}")
    found = explorer.neighbours_of(explorer.get(lora_id).id, k=_k(k), by=by or None)
    return [_clean(_neighbour(n)) for n in found]


def collection_rows(
    explorer: Explorer,
    search: str = "",
    collection: str = "",
    base_family: str = "",
    limit: int = 1000,
    offset: int = 0,
) -> dict[str, Any]:
    """Stored LoRAs as rows (fields, ``label:<name>`` and ``pred:<predictor>`` columns), filtered by a search (name
    substring or id prefix), a collection and a base family; ``total`` counts every match, ``rows`` is one page."""
    if not 1 <= int(limit) <= MAX_ROWS or int(offset) < 0:
        raise BadRequestError(f"limit must be 1–{MAX_ROWS:,} and offset ≥ 0")
    filters = Filters(search or "", (collection,) if collection else (), (base_family,) if base_family else (), ())
    rows = [r for r in explorer.records() if filters.keep(r)]
    return _clean({"total": len(rows), "offset": int(offset), "rows": rows[int(offset) : int(offset) + int(limit)]})


def comparison(explorer: Explorer, first: str, second: str) -> dict[str, Any]:
    """Two stored LoRAs: overall ΔW cosine over their shared modules and per module; ``comparable`` is false (with
    the ``reason``) for LoRAs of different base families or without a shared module."""
    if not first or not second:
        raise BadRequestError("give two LoRA ids to compare")
    a, b = explorer.get(first), explorer.get(second)
    head = {
        "first": {"id": a.id, "name": a.name, "base_family": a.base_family},
        "second": {"id": b.id, "name": b.name, "base_family": b.base_family},
    }
    if a.base_family != b.base_family:
        why = f"{a.base_family} and {b.base_family} LoRAs adapt different models: their ΔW cannot be compared"
        return {**head, "cosine": None, "modules": [], "comparable": False, "reason": why}
    overall, rows = explorer.compare(a.id, b.id)
    return _clean(
        {
            **head,
            "cosine": overall,
            "modules": [{"module": n, "cosine": c, "norm_first": x, "norm_second": y} for n, c, x, y in rows],
            "comparable": overall is not None,
            "reason": None if overall is not None else "they share no module of the same shape",
        }
    )


def prediction(
    explorer: Explorer,
    paths: Sequence[str] | None,
    repo_id: str = "",
    k: int = 10,
    limits: ReadLimits | None = None,
) -> dict[str, Any]:
    """Read an uploaded LoRA (plus optional adapter_config.json) or a Hub repo id and return what the app shows:
    its description, the predictions of every predictor that fits it, and its ``k`` nearest stored LoRAs. Stores
    nothing."""
    result = analyse_upload(explorer, paths, repo_id, k=_k(k), limits=limits)
    report = result.analysis.report
    return _clean(
        {
            "sha256": result.analysis.sha256,
            "format": report["format"],
            "base_family": report["base_family"],
            "dtype": report["dtype"],
            "n_modules": report["n_modules"],
            "ranks": report["ranks"],
            "size_bytes": report["size_bytes"],
            "autov2": report.get("autov2"),
            "warnings": report["warnings"],
            "predictions": [e.to_json() for e in result.analysis.estimates.values()],
            "neighbours": [_neighbour(n) for n in result.nearest],
            "stored": explorer.find(result.analysis.sha256) is not None,
            "card": result.card_data,
        }
    )


def predictors(explorer: Explorer) -> list[dict[str, Any]]:
    """Every predictor's glossary: what it predicts and in which unit, its base, zoo and data, its held-out skill
    beside the baselines, its calibration and its out-of-domain threshold."""
    return _clean(predictor_glossary(explorer))


def maps(explorer: Explorer) -> list[dict[str, Any]]:
    """Every stored map: its encoder name (pass it to :func:`map_points`), title and number of points."""
    counts = explorer.store.maps()
    return [{"encoder": e, "title": map_title(e), "points": counts.get(e, 0)} for e in explorer.maps()]


MAX_MAP_PAGE = 100_000  # the most points one /map_points answer carries


def map_points(explorer: Explorer, encoder: str, limit: int = MAX_MAP_PAGE, offset: int = 0) -> dict[str, Any]:
    """A page of a map's coordinates: ``ids``, ``x``, ``y`` of at most ``limit`` (≤ :data:`MAX_MAP_PAGE`) points
    from ``offset`` on, in stored order; ``total`` points on the map, ``next_offset`` (None after the last page)."""
    if encoder not in explorer.maps():
        raise BadRequestError(f"no map {encoder!r}; maps: {', '.join(explorer.maps()) or 'none'}")
    ids, xy = explorer.map_points(encoder)
    start = max(0, min(int(offset), len(ids)))
    end = start + max(0, min(int(limit), MAX_MAP_PAGE, len(ids) - start))
    page = {"encoder": encoder, "ids": ids[start:end], "x": xy[start:end, 0].tolist(), "y": xy[start:end, 1].tolist()}
    return _clean({**page, "total": len(ids), "offset": start, "next_offset": end if end < len(ids) else None})
