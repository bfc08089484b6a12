"""The Explore tab's map as data: which colourings a map offers, and the figure of one view of it. No gradio here.

A view is a plotly figure of WebGL traces (``scattergl``) whose coordinates travel as float32 typed arrays (plotly
serialises numpy arrays as base64) and whose points carry an int32 index into ``layout.meta.ids`` — not a 64-letter
id each — so 100k points fit in a few MB. Colours follow the column's kind:

- numbers with more than :data:`MAX_CATEGORIES` distinct values: one continuous scale, LoRAs without a value in grey
  and said so (a missing value never breaks the scale);
- anything else: one trace per value with a fixed palette, the :data:`MAX_CATEGORIES` - 1 most common values named
  and the rest as "other";
- a column offered only on maps where at least two of its points differ (a label every LoRA shares colours nothing).

A search highlights its matches in context: everything stays on the map, the rest dimmed, and the view can zoom to
the matches. The clicked LoRA is ringed. Text from files (names, label values) is HTML-escaped; the page renders
hover text and legends as HTML.

At scale a view never ships more than :data:`MAX_POINTS` points (browsers draw ~100k WebGL points smoothly; a
million would be a ~90 MB page). Beyond it the view shows a deterministic sample — the LoRAs whose ids hash lowest,
so a LoRA shown in the whole map stays shown when filters narrow it, search matches, the clicked LoRA and a lasso
selection first — over a density layer (a server-side 2-D histogram of every LoRA that passes the filters, shipped
as a small heatmap). ``layout.meta`` holds only the shipped points' ids (see :func:`shipped_ids`).

Ids travel packed: when every shipped id is a 64-letter lowercase hex digest (the store's sha256 ids), as one base64
string of their 32-byte digests (``layout.meta.id_hex``: 43 bytes an id instead of 67 in a JSON list, a third of a
100k-point page); the page's script unpacks them into ``layout.meta.ids`` before drawing. Other ids go as a list.
"""

from __future__ import annotations

import base64
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go

from app.handlers import Filters, column_title, escape_html
from lol_engine.explorer import Explorer, map_title

__all__ = [
    "DENSITY_BINS",
    "MAX_CATEGORIES",
    "MAX_POINTS",
    "MISSING_GREY",
    "MapView",
    "colour_options",
    "column_title",
    "map_view",
    "shipped_ids",
]

MAX_POINTS = 100_000  # the most points one view ships; beyond it a sample over a density layer of all of them
DENSITY_BINS = 128  # the density layer's grid: DENSITY_BINS × DENSITY_BINS counts
MAX_CATEGORIES = 12  # numbers with more distinct values: a continuous scale; more categories: the rest are "other"
MISSING_GREY = "#b8b8b8"
OTHER_GREY = "#7f7f7f"
# Colour-blind-safer categorical palette (Okabe-Ito, then Tableau 10's and Tol's): one hue per named value.
PALETTE = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#F0E442",
    "#000000",
    "#8c564b",
    "#17becf",
    "#bcbd22",
    "#882255",
)
assert len(PALETTE) == MAX_CATEGORIES
_MARKER = 6


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def _present(value: Any) -> bool:
    return value is not None and value != "" and not (isinstance(value, float) and not np.isfinite(value))


def colour_options(explorer: Explorer, encoder: str) -> list[tuple[str, str]]:
    """``(title, column)`` of every column that colours ``encoder``'s map: the collection, then the other fields,
    labels and predictions that take at least two different values among the map's LoRAs."""
    ids, _ = explorer.map_points(encoder)
    on_map = set(ids)
    rows = [r for r in explorer.records() if r["id"] in on_map]
    fields = ["zoo", "base_family", "format", "rank"]
    values: dict[str, set[str]] = {}
    for row in rows:
        for column, value in row.items():
            if (column in fields or column.startswith(("label:", "pred:"))) and _present(value):
                values.setdefault(column, set()).add(str(value))
    varied = {c for c, seen in values.items() if len(seen) >= 2} | {"zoo"}  # the default colour is always there
    extra = sorted((c for c in varied if c not in fields), key=lambda c: (c.startswith("pred:"), c))
    return [(column_title(c), c) for c in [*(f for f in fields if f in varied), *extra]]


@dataclass(frozen=True)
class MapView:
    """One view of a map: the figure, how many LoRAs it shows, how many match the search, and what the colouring
    leaves unsaid (plain text: missing values, one shared value, values folded into "other")."""

    figure: go.Figure
    shown: int
    matches: int
    note: str
    total: int = -1  # LoRAs that pass the filters (more than ``shown`` when sampled); -1: the same as ``shown``

    @property
    def sampled(self) -> bool:
        """Whether the view shows a sample of its LoRAs (and a density layer of all of them)."""
        return self.total > self.shown

    def status(self, color_by: str, search: str = "") -> str:
        """The line under the map controls (plain text; the caller escapes it for Markdown)."""
        text = f"{self.shown:,} LoRAs on the map · colour: {column_title(color_by)}"
        if self.sampled:
            text = f"showing {self.shown:,} of {self.total:,} LoRAs (sampled); density shows all · colour: "
            text += column_title(color_by)
        if self.note:
            text += f" · {self.note}"
        if search.strip():
            text += f" · {self.matches:,} match{'es' if self.matches != 1 else ''} for “{search.strip()[:60]}”"
        return text


def _natural(text: str) -> tuple[Any, ...]:
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def map_view(
    explorer: Explorer,
    encoder: str,
    color_by: str = "zoo",
    filters: Filters | None = None,
    *,
    search: str = "",
    picked: str | None = None,
    selected: Sequence[str] = (),
    zoom: bool = False,
    density: bool = False,
    max_points: int = MAX_POINTS,
) -> MapView:
    """The figure of ``encoder``'s stored map: the LoRAs that pass ``filters`` (collections, families, formats;
    its ``search`` is ignored), coloured by ``color_by``; ``search`` matches (name substring or id prefix) ringed
    with the rest dimmed, and the view zoomed to them with ``zoom``; ``picked`` ringed in red; ``selected`` (a lasso)
    outlined; ``density`` adds contour lines of the points' density. More than ``max_points`` LoRAs pass the filters:
    a sample of ``max_points`` of them (see the module's docstring) over a density layer of all of them."""
    where = Filters("", *(getattr(filters or Filters(), f) for f in ("collections", "families", "formats")))
    ids, xy = explorer.map_points(encoder)
    records = {r["id"]: r for r in explorer.records()}
    keep = np.array([i for i, lora_id in enumerate(ids) if lora_id in records and where.keep(records[lora_id])])
    keep = keep.astype(np.int64)  # the map never filters by the search: it highlights (see ``search``)
    xy32 = np.asarray(xy, dtype=np.float32)
    text = search.strip().lower()
    found = [i for i in keep if text and (text in str(records[ids[i]]["name"]).lower() or ids[i].startswith(text))]
    index = {lora_id: i for i, lora_id in enumerate(ids)}
    ring = [index[i] for i in selected if i in index]
    first = [*([index[picked]] if picked in index else []), *ring, *found]  # kept first when sampling
    total, every = len(keep), keep
    keep = _sample(ids, keep, np.asarray(first, dtype=np.int64), max(1, max_points))
    shipped = np.zeros(len(ids), dtype=bool)
    shipped[keep] = True
    rows = [records[ids[i]] for i in keep]
    values = [r.get(color_by) for r in rows]
    names = [escape_html(r["name"], 80) for r in rows]
    hits = np.flatnonzero(np.isin(keep, np.asarray(found, dtype=np.int64)))  # into ``rows``
    dim = 0.18 if text else 0.85
    if total > len(keep):  # sampled: outside the sample nothing is ringed (the payload stays within the cap)
        ring, picked = [i for i in ring if shipped[i]], picked if picked in index and shipped[index[picked]] else None
    else:  # everything is shown: a ring may mark a LoRA the filters hide
        shipped[ring] = True
        if picked in index:
            shipped[index[picked]] = True
    local = np.cumsum(shipped, dtype=np.int64) - 1  # position of each shipped point in ``layout.meta.ids``
    fig = go.Figure()
    if total > len(keep):
        _density(fig, xy32[every])
    note = _colour(fig, keep, xy32, local, rows, values, names, color_by, dim)
    if density and len(keep) >= 10 and total == len(keep):
        fig.add_trace(
            go.Histogram2dContour(
                x=xy32[keep, 0],
                y=xy32[keep, 1],
                name="density",
                colorscale=[[0, "rgba(0,0,0,0)"], [1, "rgba(60,60,60,0.9)"]],
                contours={"coloring": "lines"},
                line={"width": 1},
                showscale=False,
                hoverinfo="skip",
                ncontours=8,
            )
        )
    _overlay(fig, ring, xy32, local, "lasso selection", {"color": "#333333", "width": 1}, 11, "rgba(0,0,0,0)")
    matched = keep[hits] if len(hits) else np.array([], dtype=np.int64)
    labels = [names[j] for j in hits] if 0 < len(hits) <= 20 else None  # few matches: their names on the map
    line = {"color": "#111111", "width": 2}
    _overlay(fig, matched.tolist(), xy32, local, "search matches", line, 12, "#ffd400", labels)
    if picked in index:
        _overlay(fig, [index[picked]], xy32, local, "clicked", {"color": "#d62728", "width": 3}, 18, "rgba(0,0,0,0)")
    _layout(fig, explorer, encoder, xy32, keep, matched if zoom else None, search if zoom else "")
    sent = [ids[i] for i in np.flatnonzero(shipped)]
    fig.layout.meta = {**_packed(sent), "shown": len(keep), "total": total, "matches": len(found)}
    return MapView(fig, len(keep), len(found), note, total)


_HEX_ID = re.compile(r"[0-9a-f]{64}")


def _packed(ids: list[str]) -> dict[str, Any]:
    """``{"id_hex": base64 of the ids' 32-byte digests}`` when every id is 64 lowercase hex letters; else
    ``{"ids": ids}``."""
    if ids and all(_HEX_ID.fullmatch(i) for i in ids):
        return {"id_hex": base64.b64encode(bytes.fromhex("".join(ids))).decode("ascii")}
    return {"ids": ids}


def shipped_ids(meta: dict[str, Any]) -> list[str]:
    """The ids a figure's ``layout.meta`` carries, in order (a point's ``customdata`` indexes this list): what the
    page's script unpacks."""
    if "id_hex" in meta:
        raw = base64.b64decode(meta["id_hex"])
        return [raw[k : k + 32].hex() for k in range(0, len(raw), 32)]
    return list(meta.get("ids", []))


def _sample(ids: Sequence[str], keep: np.ndarray, first: np.ndarray, cap: int) -> np.ndarray:
    """``keep`` when it holds at most ``cap`` points; else ``cap`` of them, sorted: those in ``first``, then the ones
    whose ids hash lowest (CRC-32: stable across filters, restarts and new LoRAs), ties by position."""
    if len(keep) <= cap:
        return keep
    key = np.fromiter((zlib.crc32(ids[i].encode()) for i in keep), dtype=np.int64, count=len(keep))
    key[np.isin(keep, first)] = -1
    return np.sort(keep[np.lexsort((keep, key))[:cap]])


def _density(fig: go.Figure, xy: np.ndarray, bins: int = DENSITY_BINS) -> None:
    """A heatmap of how many points of ``xy`` fall in each cell of a ``bins`` × ``bins`` grid over their extent
    (empty cells transparent; a square-root-like colour scale so sparse regions stay visible)."""
    counts, x_edges, y_edges = np.histogram2d(xy[:, 0], xy[:, 1], bins=bins)  # counts: (x bins, y bins)
    fig.add_trace(
        go.Heatmap(
            z=counts.T.astype(np.float32),  # plotly's z is (y, x)
            x=((x_edges[:-1] + x_edges[1:]) / 2).astype(np.float32),
            y=((y_edges[:-1] + y_edges[1:]) / 2).astype(np.float32),
            name="density (every LoRA)",
            zmin=0.0,
            colorscale=[
                [0.0, "rgba(255,255,255,0)"],
                [1e-9, "rgba(225,225,225,0.6)"],
                [0.02, "rgba(190,190,190,0.7)"],
                [0.15, "rgba(130,130,130,0.75)"],
                [1.0, "rgba(40,40,40,0.85)"],
            ],
            showscale=False,
            hoverinfo="skip",
        )
    )


def _colour(
    fig: go.Figure,
    keep: np.ndarray,
    xy: np.ndarray,
    local: np.ndarray,
    rows: list[dict[str, Any]],
    values: list[Any],
    names: list[str],
    column: str,
    opacity: float,
) -> str:
    """Add the map's base traces (points ``keep`` of ``xy``, each with its index ``local[i]`` into the shipped ids),
    coloured by ``values``; returns what the colouring leaves unsaid."""
    title = escape_html(column_title(column), 40)
    present = [j for j, v in enumerate(values) if _present(v)]
    missing = [j for j, v in enumerate(values) if not _present(v)]
    numeric = bool(present) and all(_is_number(values[j]) for j in present)
    distinct = {str(values[j]) for j in present}
    notes = []

    def trace(members: list[int], name: str, marker: dict[str, Any], value: str) -> go.Scattergl:
        """One WebGL trace; ``value``: what its hover says of the column (``%{marker.color}`` on a scale)."""
        members_at = keep[members] if members else np.array([], dtype=np.int64)
        return go.Scattergl(
            x=xy[members_at, 0],
            y=xy[members_at, 1],
            mode="markers",
            customdata=local[members_at].astype(np.int32),
            text=[names[j] for j in members],
            hovertemplate="%{text}<br>" + title + ": " + value + "<extra></extra>",
            name=name,
            marker={"size": _MARKER, "opacity": opacity, **marker},
        )

    if numeric and len(distinct) > MAX_CATEGORIES:
        colours = np.array([float(values[j]) for j in present], dtype=np.float32)
        fig.add_trace(
            trace(
                present,
                title,
                {
                    "color": colours,
                    "colorscale": "Viridis",
                    "showscale": True,
                    "colorbar": {"title": {"text": title}, "thickness": 14},
                },
                "%{marker.color:.4g}",
            )
        )
        fig.data[-1].update(showlegend=False)
    else:
        counts = Counter(str(values[j]) for j in present)
        order = sorted(counts, key=_natural) if numeric else sorted(counts, key=lambda v: (-counts[v], v))
        named = order if len(order) <= MAX_CATEGORIES else order[: MAX_CATEGORIES - 1]
        groups: dict[str, list[int]] = {v: [] for v in named}
        other: list[int] = []
        for j in present:
            value = str(values[j])
            (groups.get(value, other)).append(j)
        for k, (value, members) in enumerate(groups.items()):
            colour = PALETTE[k % len(PALETTE)]
            label = escape_html(value, 40)
            fig.add_trace(trace(members, f"{label} ({len(members):,})", {"color": colour}, label))
        if other:
            folded = len(order) - len(named)
            notes.append(f"{folded:,} less common values shown as “other”")
            fig.add_trace(
                trace(
                    other,
                    f"other: {folded:,} values ({len(other):,})",
                    {"color": OTHER_GREY},
                    "another value",
                )
            )
        if len(distinct) == 1 and rows:
            notes.append(f"every LoRA shown has the same {column_title(column)}: {next(iter(distinct))[:40]}")
    if missing:
        notes.append(f"{len(missing):,} without a value, in grey")
        fig.add_trace(trace(missing, f"no value ({len(missing):,})", {"color": MISSING_GREY}, "no value"))
    return "; ".join(notes)


def _overlay(
    fig: go.Figure,
    at: list[int],
    xy: np.ndarray,
    local: np.ndarray,
    name: str,
    line: dict[str, Any],
    size: int,
    fill: str,
    text: list[str] | None = None,
) -> None:
    """Rings on top of the base traces (search matches, the clicked LoRA, a lasso selection); clicks on them count."""
    if not at:
        return
    rows = np.asarray(at, dtype=np.int64)
    fig.add_trace(
        go.Scattergl(
            x=xy[rows, 0],
            y=xy[rows, 1],
            mode="markers+text" if text else "markers",
            text=text,
            textposition="top center",
            customdata=local[rows].astype(np.int32),
            name=name,
            hoverinfo="skip",
            marker={"size": size, "color": fill, "line": line, "symbol": "circle"},
        )
    )


def _layout(
    fig: go.Figure,
    explorer: Explorer,
    encoder: str,
    xy: np.ndarray,
    keep: np.ndarray,
    zoom_to: np.ndarray | None,
    search: str,
) -> None:
    axis: dict[str, Any] = {"showticklabels": False, "zeroline": False, "showgrid": False}
    x_axis, y_axis = dict(axis), dict(axis)
    if zoom_to is not None and len(zoom_to):
        box = xy[zoom_to]
        lo, hi = box.min(0), box.max(0)
        span = np.maximum(hi - lo, 0.05 * (xy[keep].max(0) - xy[keep].min(0)) if len(keep) else 1.0)
        x_axis["range"] = [float(lo[0] - 0.25 * span[0]), float(hi[0] + 0.25 * span[0])]
        y_axis["range"] = [float(lo[1] - 0.25 * span[1]), float(hi[1] + 0.25 * span[1])]
    title = map_title(encoder)
    tiles = explorer.map_tiles(encoder)
    if len(tiles) > 1:  # a faceted map: one layout per base family; say so, and name each
        title += ": each base model on its own, distances across them mean nothing"
        for family, (x0, _, x1, y1) in tiles.items():
            fig.add_annotation(
                x=(x0 + x1) / 2, y=y1, text=escape_html(family, 40), showarrow=False, yshift=12, font={"size": 12}
            )
    fig.update_layout(
        template="none",
        dragmode="pan",
        height=560,
        margin={"l": 8, "r": 8, "t": 36, "b": 8},
        title={"text": escape_html(title), "font": {"size": 14}},
        legend={"itemsizing": "constant", "bgcolor": "rgba(255,255,255,0.8)"},
        xaxis=x_axis,
        yaxis=y_axis,
        plot_bgcolor="#ffffff",
        paper_bgcolor="#ffffff",
        hovermode="closest",
        uirevision=f"{encoder}|{search}" if search else encoder,
    )
