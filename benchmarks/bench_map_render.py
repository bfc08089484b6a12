"""How fast the Explore map draws in a browser: the WebGL map of ``app.map_view`` against the SVG map it replaced.

For 10k and 100k synthetic LoRAs in 10 collections (Gaussian clusters), each figure is built in Python, sent to a
headless Chromium page as the app sends it (``figure.to_json()``) and drawn with the app's own plotly.min.js (from the
plotly package). Measured, per renderer:

- **payload**: bytes of the figure's JSON;
- **first render**: from the JSON string in the page to the second animation frame after ``Plotly.newPlot``
  (parse, draw, paint);
- **pan frame**: one step of a scripted pan, ``Plotly.relayout`` of the x range by 1 % (what the map's arrow keys
  do), to the second animation frame after it; median and p95 over ``--steps`` steps (fewer if ``--budget`` seconds
  run out first, said in the table).

The **new** map is ``app.map_view.map_view`` itself on a synthetic collection (scattergl, float32 coordinates,
an int32 index per point into ``layout.meta.ids``). The **old** one is rebuilt here as ``app/handlers.map_figure``
drew it before the WebGL map (commit 0e05b85): SVG ``scatter``, float64 coordinates, each point's 64-letter id in
``customdata`` and a three-line hover text.

Headless Chromium renders WebGL in software here (SwiftShader, said in the output), so the numbers are for
comparison on one machine, not a gate. Run: ``python benchmarks/bench_map_render.py [--points 10000,100000]
[--steps 60] [--write]``; ``--write`` puts the table in docs/BENCHMARKS.md between ``<!-- map-render:begin -->`` and
``<!-- map-render:end -->`` (appending that section if absent).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import plotly.graph_objects as go

from app.handlers import escape_html
from app.map_view import map_view
from app.web import PLOTLY_JS
from lol_engine.explorer import Explorer

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- map-render:begin -->", "<!-- map-render:end -->"
CHROMIUM = os.environ.get("LOL_CHROMIUM", "/usr/bin/chromium")
COLLECTIONS = 10
WIDTH, HEIGHT = 1000, 560  # the map's size on a laptop


@dataclass(frozen=True)
class SyntheticCollection:
    """What ``app.map_view.map_view`` reads of an :class:`~lol_engine.explorer.Explorer`: one map's ids and
    coordinates, and a record per LoRA."""

    ids: list[str]
    xy: np.ndarray  # (n, 2)
    rows: list[dict[str, Any]]

    @classmethod
    def make(cls, n: int, seed: int = 0) -> SyntheticCollection:
        """``n`` LoRAs in :data:`COLLECTIONS` Gaussian clusters, sized unevenly (as real collections are)."""
        rng = np.random.default_rng(seed)
        weights = rng.dirichlet(np.full(COLLECTIONS, 2.0))
        members = rng.choice(COLLECTIONS, size=n, p=weights)  # (n,)
        centres = rng.normal(0.0, 6.0, size=(COLLECTIONS, 2))
        xy = centres[members] + rng.normal(0.0, 1.0, size=(n, 2))  # (n, 2)
        ids = [hashlib.sha256(f"lora-{i}".encode()).hexdigest() for i in range(n)]
        rows = [
            {"id": ids[i], "name": f"lora-{i:06d}", "zoo": f"collection-{members[i]}", "base_family": "sd15"}
            | {"format": "peft", "rank": 16, "modules": 128, "dtype": "F16"}
            for i in range(n)
        ]
        return cls(ids, xy, rows)

    def map_points(self, encoder: str) -> tuple[list[str], np.ndarray]:
        return self.ids, self.xy

    def records(self) -> list[dict[str, Any]]:
        return self.rows

    def map_tiles(self, encoder: str) -> dict[str, tuple[float, float, float, float]]:
        return {}


def new_figure(collection: SyntheticCollection) -> go.Figure:
    """The app's map of the collection, coloured by collection."""
    return map_view(cast(Explorer, collection), "fingerprint", "zoo").figure


def old_figure(collection: SyntheticCollection) -> go.Figure:
    """The map as ``app/handlers.map_figure`` drew it before the WebGL map: one SVG trace per collection."""
    fig = go.Figure()
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(collection.rows):
        groups.setdefault(row["zoo"], []).append(i)
    for group, members in sorted(groups.items()):
        rows = [collection.rows[i] for i in members]
        fig.add_trace(
            go.Scatter(
                x=collection.xy[members, 0],
                y=collection.xy[members, 1],
                mode="markers",
                customdata=[[r["id"]] for r in rows],
                name=escape_html(group, 40),
                marker={"size": 6},
                text=[
                    f"{escape_html(r['name'], 80)}<br>{escape_html(r['zoo'])} · {escape_html(r['base_family'])}"
                    f"<br>zoo: {escape_html(r['zoo'], 40)}"
                    for r in rows
                ],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    axis = {"showticklabels": False, "zeroline": False}
    fig.update_layout(
        dragmode="lasso",
        height=HEIGHT,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        title="fingerprint (every LoRA, any base)",
        legend={"itemsizing": "constant"},
        xaxis=axis,
        yaxis=axis,
        uirevision="fingerprint",
    )
    return fig


RENDERERS = {"WebGL (scattergl, now)": new_figure, "SVG (scatter, before)": old_figure}

_DRAW = """async (json) => {
  const frames = () => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
  const start = performance.now();
  const fig = JSON.parse(json);
  await Plotly.newPlot('map', fig.data, fig.layout, {responsive: false});
  await frames();
  return performance.now() - start;
}"""
_PAN = """async ([steps, budgetMs]) => {
  const gd = document.getElementById('map');
  const frames = () => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
  const range = gd._fullLayout.xaxis.range.slice(), step = (range[1] - range[0]) * 0.01;
  const times = [], start = performance.now();
  for (let i = 0; i < steps && performance.now() - start < budgetMs; i++) {
    const shift = step * (i + 1);
    const t0 = performance.now();
    await Plotly.relayout(gd, {'xaxis.range': [range[0] + shift, range[1] + shift]});
    await frames();
    times.push(performance.now() - t0);
  }
  return times;
}"""
_GL = """() => {
  const gl = document.createElement('canvas').getContext('webgl');
  if (!gl) return 'no WebGL';
  const info = gl.getExtension('WEBGL_debug_renderer_info');
  return info ? gl.getParameter(info.UNMASKED_RENDERER_WEBGL) : gl.getParameter(gl.RENDERER);
}"""


@dataclass(frozen=True)
class Row:
    """One renderer's numbers at one size."""

    points: int
    renderer: str
    payload: int  # bytes of the figure JSON
    first_ms: float
    pan_ms: list[float]  # one per pan step

    @property
    def median(self) -> float:
        return statistics.median(self.pan_ms)

    @property
    def p95(self) -> float:
        return float(np.percentile(self.pan_ms, 95))


def measure(browser: Any, figure: go.Figure, steps: int, budget_s: float) -> tuple[int, float, list[float]]:
    """Payload bytes, first render ms and the pan steps' ms of ``figure`` in a fresh page."""
    payload = figure.to_json()
    page = browser.new_page(viewport={"width": WIDTH + 40, "height": HEIGHT + 40})
    try:
        page.set_content(f"<div id='map' style='width:{WIDTH}px;height:{HEIGHT}px'></div>")
        page.add_script_tag(path=str(PLOTLY_JS))
        first = page.evaluate(_DRAW, payload)
        pan = page.evaluate(_PAN, [steps, budget_s * 1000])
    finally:
        page.close()
    return len(payload.encode()), float(first), [float(t) for t in pan]


def run(points: Sequence[int], steps: int, budget_s: float) -> tuple[list[Row], dict[str, str]]:
    """Every renderer at every size; also what the numbers were measured on."""
    from playwright.sync_api import sync_playwright

    rows = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
        )
        try:
            page = browser.new_page()
            setting = {"chromium": browser.version, "webgl": str(page.evaluate(_GL))}
            page.close()
            for n in points:
                collection = SyntheticCollection.make(n)
                for name, build in RENDERERS.items():
                    payload, first, pan = measure(browser, build(collection), steps, budget_s)
                    rows.append(Row(n, name, payload, first, pan))
                    print(f"  {n:,} points · {name}: {first:,.0f} ms first, {len(pan)} pan steps", flush=True)
        finally:
            browser.close()
    setting |= {"cpus": str(os.cpu_count()), "machine": platform.machine()}
    return rows, setting


def table(rows: Sequence[Row], steps: int) -> str:
    """The rows as Markdown, with the before/now ratio at each size."""
    lines = [
        "| points | renderer | payload | first render | pan frame median | pan frame p95 | pan steps |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        short = "" if len(r.pan_ms) == steps else " (budget)"
        lines.append(
            f"| {r.points:,} | {r.renderer} | {r.payload / 2**20:.2f} MB | {r.first_ms:,.0f} ms | "
            f"{r.median:,.1f} ms | {r.p95:,.1f} ms | {len(r.pan_ms)}{short} |"
        )
    for n in sorted({r.points for r in rows}):
        now, before = (next(r for r in rows if r.points == n and r.renderer == name) for name in RENDERERS)
        ratios = [before.payload / now.payload, before.first_ms / now.first_ms, before.median / now.median]
        ratios.append(before.p95 / now.p95)
        lines.append(f"| {n:,} | **before ÷ now** | " + " | ".join(f"{x:.1f}×" for x in ratios) + " | |")
    return "\n".join(lines)


def section(rows: Sequence[Row], setting: dict[str, str], steps: int) -> str:
    """The docs/BENCHMARKS.md section, markers included."""
    return "\n".join(
        [
            BEGIN,
            "",
            "Generated by `python benchmarks/bench_map_render.py --write` (synthetic collections in 10 clusters; the "
            "WebGL map is `app.map_view.map_view`, the SVG one the map before it). Headless Chromium "
            f"{setting['chromium']}, WebGL by `{setting['webgl']}` (software rendering: compare the rows, do not "
            f"read them as a user's frame rate), {setting['cpus']} CPUs ({setting['machine']}). A pan frame is one "
            f"1 % `Plotly.relayout` step of the x range, to the second animation frame after it, over {steps} steps.",
            "",
            table(rows, steps),
            "",
            END,
        ]
    )


def write(text: str, path: Path, name: str = "map-render", heading: str = "Map rendering in the browser") -> None:
    """Replace the section ``name`` of ``path`` (``text`` starts with ``<!-- name:begin -->`` and ends with ``<!--
    name:end -->``) with ``text``, or append it under ``## heading`` if it is not there (``run_all.py`` keeps it)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + text + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + f"## {heading}\n\n" + text + "\n"
    path.write_text(new)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default="10000,100000", help="comma-separated map sizes")
    parser.add_argument("--steps", type=int, default=60, help="pan steps per renderer")
    parser.add_argument("--budget", type=float, default=90.0, help="seconds of panning per renderer at most")
    parser.add_argument("--write", action="store_true", help="write the table into --out")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    points = [int(p) for p in args.points.split(",")]
    rows, setting = run(points, args.steps, args.budget)
    text = section(rows, setting, args.steps)
    print(text)
    if args.write:
        write(text, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
