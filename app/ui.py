"""The Gradio UI: ``build_demo(explorer)`` returns a ``gr.Blocks`` and does no I/O; one function per tab.

Every event calls a plain function of ``app/handlers.py`` through :func:`_guard`, which turns a
:class:`~lol_engine.errors.LolError` into a message in the page (plain text without server paths, see
:func:`handlers.public_message`) and anything else into an internal error with a logged id. Uploads are deleted from
Gradio's temp folder when their event returns (``app/uploads.py``); an analysed one waits, outside it, for *Add to
collection*. The map is a ``gr.HTML`` rendering plotly.js (served from the plotly package at ``app.web.PLOTLY_URL``,
no network): its click and lasso handlers send the LoRA ids back with ``trigger(...)`` (plain ``gr.Plot`` sends no
such events). Launch it with ``demo.launch(**app.web.launch_options(cap, ledger))``.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from gradio.utils import get_upload_folder

from app import api, handlers
from app.handlers import MODULE_COLUMNS, NEIGHBOUR_COLUMNS, PREDICTION_COLUMNS, Filters
from app.map_view import colour_options, map_view
from app.startup import StartupJob
from app.training import TrainingJobs
from app.uploads import UploadHold, UploadLedger, discard, held_root
from app.web import PLOTLY_URL, max_upload_bytes
from lol_engine import ReadLimits
from lol_engine.card import MAX_NAME_CHARS
from lol_engine.errors import BadRequestError, LolError
from lol_engine.explorer import Explorer
from lol_engine.settings import HOW_TO_GET_ZOOS

__all__ = ["build_demo"]

_log = logging.getLogger(__name__)

_MAP_JS = """
const box = element.querySelector('.lol-map');
const live = element.querySelector('.lol-map-live');
const idOf = (p) => {
  const ids = (box && box._lolIds) || [];
  return p && p.customdata !== undefined && p.customdata !== null ? ids[Number(p.customdata)] : undefined;
};
const narrow = () => box && box.clientWidth < 640;
const render = () => {
  if (!box || typeof Plotly === 'undefined') return;
  let fig;
  try { fig = JSON.parse(props.value || '{}'); } catch (e) { return; }
  if (!fig.data) { box.dataset.points = '0'; Plotly.purge(box); return; }
  const meta = fig.layout.meta || {};
  if (!meta.ids && meta.id_hex) {  // packed 32-byte digests (app/map_view.py): back to 64-letter hex ids
    const raw = atob(meta.id_hex), hex = [], ids = new Array(raw.length / 32);
    for (let i = 0; i < 256; i++) hex.push((i < 16 ? '0' : '') + i.toString(16));
    for (let k = 0; k < ids.length; k++) {
      let id = '';
      for (let j = 32 * k; j < 32 * k + 32; j++) id += hex[raw.charCodeAt(j)];
      ids[k] = id;
    }
    meta.ids = ids;
    delete meta.id_hex;
  }
  fig.layout.meta = meta;
  box._lolIds = meta.ids || [];
  if (narrow()) fig.layout.legend = Object.assign({}, fig.layout.legend || {},
    {orientation: 'h', x: 0, y: -0.02, yanchor: 'top'});
  if (narrow()) {  // a phone: a shorter map, its title small and on its own lines below the mode bar
    const title = fig.layout.title || {};
    fig.layout.height = Math.min(fig.layout.height || 560, 420);
    fig.layout.title = Object.assign({}, title, {text: String(title.text || '').replace(': ', ':<br>'),
      font: {size: 11}, x: 0.02, xanchor: 'left', y: 1, yref: 'container', yanchor: 'top', pad: {t: 36}});
    fig.layout.margin = Object.assign({}, fig.layout.margin || {}, {t: 72});
  }
  Plotly.react(box, fig.data, fig.layout, {responsive: true, displaylogo: false, scrollZoom: true,
    modeBarButtonsToRemove: ['toImage']});
  box.dataset.points = String(meta.shown || 0);
  box.dataset.matches = String(meta.matches || 0);
  const of = meta.total > meta.shown ? ' of ' + meta.total + ' (a sample over a density of all)' : '';
  box.setAttribute('aria-label', 'Map of ' + (meta.shown || 0) + of + ' LoRAs. Arrow keys pan, + and - zoom, '
    + '0 resets, Enter opens the LoRA nearest the centre.');
  if (live) live.textContent = (meta.shown || 0) + of + ' LoRAs on the map' + (meta.matches ? ', ' + meta.matches
    + ' search matches' : '');
  if (!box.dataset.bound) {
    box.dataset.bound = '1';
    box.on('plotly_click', (ev) => {
      const id = idOf(ev && ev.points && ev.points[0]);
      if (id) trigger('click', {id: id});
    });
    box.on('plotly_selected', (ev) => {
      const ids = ev && ev.points ? ev.points.map(idOf).filter((i) => i) : [];
      trigger('select', {ids: Array.from(new Set(ids))});
    });
    box.addEventListener('keydown', (ev) => {
      const full = box._fullLayout;
      if (!full || !full.xaxis) return;
      const xr = full.xaxis.range.slice(), yr = full.yaxis.range.slice();
      const dx = (xr[1] - xr[0]) * 0.1, dy = (yr[1] - yr[0]) * 0.1;
      const zoom = (f) => {
        const cx = (xr[0] + xr[1]) / 2, cy = (yr[0] + yr[1]) / 2;
        return {'xaxis.range': [cx - (cx - xr[0]) * f, cx + (xr[1] - cx) * f],
                'yaxis.range': [cy - (cy - yr[0]) * f, cy + (yr[1] - cy) * f]};
      };
      const moves = {ArrowLeft: {'xaxis.range': [xr[0] - dx, xr[1] - dx]},
        ArrowRight: {'xaxis.range': [xr[0] + dx, xr[1] + dx]},
        ArrowUp: {'yaxis.range': [yr[0] + dy, yr[1] + dy]}, ArrowDown: {'yaxis.range': [yr[0] - dy, yr[1] - dy]},
        '+': zoom(0.7), '=': zoom(0.7), '-': zoom(1 / 0.7),
        '0': {'xaxis.autorange': true, 'yaxis.autorange': true}};
      if (moves[ev.key]) { ev.preventDefault(); Plotly.relayout(box, moves[ev.key]); return; }
      if (ev.key !== 'Enter') return;
      const cx = (xr[0] + xr[1]) / 2, cy = (yr[0] + yr[1]) / 2;
      let best = null, dist = Infinity;
      (box._fullData || []).forEach((t) => {
        if (t.type !== 'scattergl' || !t.customdata) return;
        for (let i = 0; i < t.x.length; i++) {
          const d = ((t.x[i] - cx) / (xr[1] - xr[0])) ** 2 + ((t.y[i] - cy) / (yr[1] - yr[0])) ** 2;
          if (d < dist) { dist = d; best = t.customdata[i]; }
        }
      });
      const id = idOf({customdata: best});
      if (id) { ev.preventDefault(); trigger('click', {id: id}); }
    });
  }
};
const wait = (tries) => {
  if (typeof Plotly !== 'undefined') render();
  else if (tries > 0) setTimeout(() => wait(tries - 1), 100);
};
wait(200);
watch('value', render);
"""

# Keeps the Explore tab's state in the page's address (?map=…&color=…&lora=…&q=…), so that a view can be shared.
_URL_JS = """
(encoder, color, lora, search) => {
  const url = new URL(window.location.href);
  const set = (k, v) => { if (v) url.searchParams.set(k, v); else url.searchParams.delete(k); };
  set('map', encoder); set('color', color && color !== 'zoo' ? color : ''); set('lora', lora); set('q', search);
  window.history.replaceState(null, '', url.toString());
  return [];
}
"""


def _gpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``spaces.GPU`` on a ZeroGPU Space (the package returns ``fn`` unchanged elsewhere); ``fn`` without it."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn what an event raises into a message in the page; the app keeps serving.

    A :class:`~lol_engine.errors.LolError` (a bad file, a bad request, something not found, the store) is shown as it
    is, server paths cut. Anything else is the server's fault or a bug: it is logged with a short id, and the page
    shows an internal error with that id (and, for an ``OSError``, its reason), never a traceback or a path. A
    generator (an event that streams progress) is guarded while it runs, not only when it is called.
    """

    def shown(exc: Exception) -> gr.Error:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, LolError):
            return gr.Error(handlers.public_message(exc), print_exception=False)
        ref = secrets.token_hex(4)
        _log.error("error %s in %s", ref, getattr(fn, "__name__", "an event"), exc_info=exc)
        reason = f"{exc.strerror or type(exc).__name__}; " if isinstance(exc, OSError) else ""
        return gr.Error(f"the server could not do this ({reason}internal error {ref})", print_exception=False)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def streaming(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise shown(exc) from None

        return streaming

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise shown(exc) from None

    return wrapper


def _event_value(evt: gr.EventData, key: str, default: Any) -> Any:
    """A value the page's script sent with its event (``trigger(name, {key: value})``), else ``default``."""
    try:
        return getattr(evt, key)
    except (AttributeError, TypeError):  # no such key, or no data at all
        return default


@_guard
def _export(explorer: Explorer, frame: pd.DataFrame, fmt: str, what: str = "selection") -> str:
    """Write the LoRAs of a shown table for download, at full precision and with the stored column names (the table
    shows rounded values under names for people); Gradio copies the file into its own cache. Exports older than an
    hour go. ``what``: the file's name for rows of several collections (:func:`handlers.export_name`)."""
    folder = Path(tempfile.gettempdir()) / "lol-explorer-exports"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        if time.time() - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True)
    ids = [str(i) for i in frame["id"]] if frame is not None and "id" in frame.columns else []
    stored = handlers.collection_frame(explorer, ids=ids, for_people=False)
    rows = stored.set_index("id").reindex([i for i in ids if i in set(stored["id"])]).reset_index()
    return str(handlers.export_frame(rows[[*stored.columns]], fmt, folder, what))


def _nothing() -> None:
    """Clears a component (a file box whose upload was deleted)."""


def _filters(search: str, collections: list[str], families: list[str], formats: list[str]) -> Filters:
    return Filters(search or "", tuple(collections or ()), tuple(families or ()), tuple(formats or ()))


def _upload_tab(
    explorer: Explorer,
    demo: gr.Blocks,
    limits: ReadLimits,
    hold: UploadHold,
    ledger: UploadLedger,
    startup: StartupJob | None,
) -> Any:
    """The Upload & predict tab; returns its *Add to collection* event (the other tabs refresh after it)."""
    with gr.Tab("Upload & predict", id="upload"):
        gr.Markdown(
            "Drop a LoRA `.safetensors` (PEFT, kohya/A1111/ComfyUI, diffusers or LyCORIS LoCon), optionally with its "
            "`adapter_config.json`, or give a Hugging Face repo id. Nothing is run and nothing is unpickled. "
            "Predictions come from every shipped predictor trained on the LoRA's base and module layout; ranges are "
            "split-conformal (calibrated on held-out LoRAs of the predictor's zoo). The upload is only stored when "
            f"you press *Add to collection* (within {hold.ttl_s / 60:.0f} minutes of *Analyse*; else it is deleted)."
        )
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(
                    file_count="multiple",
                    file_types=[".safetensors", ".json"],
                    type="filepath",
                    label="LoRA file (+ optional adapter_config.json)",
                    elem_id="upload-files",
                )
                repo = gr.Textbox(label="…or a Hugging Face repo id", placeholder="owner/name", max_length=96)
                name_box = gr.Textbox(
                    "",
                    label="Name (optional)",
                    placeholder="default: the folder, repo id or the file's own title",
                    max_length=MAX_NAME_CHARS,
                    elem_id="upload-name",
                )
                analyse = gr.Button("Analyse", variant="primary", elem_id="analyse-button")
                add = gr.Button("Add to collection", elem_id="add-button")
                added = gr.Markdown(label="Add status", elem_id="add-status")
            with gr.Column(scale=2):
                card = gr.Markdown(label="Card", elem_id="upload-card")
                predictions = gr.Dataframe(
                    headers=PREDICTION_COLUMNS,
                    interactive=False,
                    label="Predicted scores",
                    elem_id="predictions",
                    max_height=360,
                )
                with gr.Accordion("What each predictor predicts, and what it knows", open=False):
                    glossary = gr.Markdown(elem_id="predictor-glossary")  # filled on each page load: new ones too
        spectrum = gr.Plot(label="Spectrum", elem_id="spectrum")
        blocks = gr.Plot(label="Strength per block", elem_id="block-strength")
        neighbours = gr.Dataframe(
            headers=NEIGHBOUR_COLUMNS,
            interactive=False,
            label="Most similar LoRAs",
            elem_id="upload-neighbours",
            max_height=360,
        )
        with gr.Accordion("Modules", open=False):
            modules = gr.Dataframe(
                headers=MODULE_COLUMNS, interactive=False, max_height=420, show_search="search", label="Modules"
            )
        held = gr.State(None, time_to_live=hold.ttl_s, delete_callback=hold.release)  # this session's analysed upload
        uploads = files.GRADIO_CACHE  # Gradio's upload folder: what it holds is served to whoever knows the path

        @_guard
        @_gpu
        def on_analyse(
            paths: list[str] | None, repo_id: str, token: str | None, name: str | None = None
        ) -> tuple[Any, ...]:
            hold.release(token)
            try:
                result = handlers.analyse_upload(explorer, paths, repo_id, limits=limits, name=name)
                kept = hold.keep(paths) if paths else None
            finally:
                discard(paths, uploads, ledger)
            figure = handlers.block_strength_figure(result.analysis.report)
            return (
                result.card,
                result.predictions,
                result.spectrum,
                result.neighbours,
                result.modules,
                "",
                kept,
                figure,
            )

        @_guard
        def on_add(
            paths: list[str] | None, repo_id: str, token: str | None, name: str | None = None
        ) -> tuple[str, None]:
            try:  # the files given, else the upload analysed last, else the repo id
                if startup is not None:
                    startup.check_can_write()
                message = handlers.add_upload(explorer, paths or hold.files(token) or None, repo_id, limits, name)
            finally:
                discard(paths, uploads, ledger)
            hold.release(token)  # only once added: a failed add can be retried
            return message, None

        outputs = [card, predictions, spectrum, neighbours, modules, added, held, blocks]

        def cleared() -> tuple[Any, ...]:
            """The previous result goes before a new analysis runs: a refusal never sits above an old card."""
            empty = pd.DataFrame()
            return "*Analysing…*", pd.DataFrame(columns=PREDICTION_COLUMNS), None, empty, [], "", None

        inputs = [files, repo, held, name_box]  # the API takes (files, repo id, name); the name may be left out
        analysed = analyse.click(
            cleared,
            None,
            [card, predictions, spectrum, neighbours, modules, added, blocks],
            api_visibility="private",
            queue=False,
        ).then(on_analyse, inputs, outputs, api_name="analyse", concurrency_id="cpu", concurrency_limit=4)
        demo.load(
            lambda: handlers.glossary_markdown(handlers.predictor_glossary(explorer)),
            None,
            glossary,
            api_visibility="private",
        )
        analysed.failure(
            lambda: "*Nothing to show: the upload was refused (the message says why).*",
            None,
            card,
            api_visibility="private",
            queue=False,
        )
        stored = add.click(on_add, inputs, [added, held], api_name="add", concurrency_id="write", concurrency_limit=1)
        for event in (analysed, stored):  # the upload is no longer on the server: the file box shows nothing
            event.then(_nothing, None, files, api_visibility="private")
    return stored


@dataclass
class _Refresher:
    """What a tab redoes after the collection changed (an add): ``fn(*inputs) -> outputs``."""

    fn: Callable[..., Any]
    inputs: list[Any]
    outputs: list[Any]


def _explore_tab(explorer: Explorer, demo: gr.Blocks) -> tuple[_Refresher, ...]:
    with gr.Tab("Explore", id="explore"):
        with gr.Row(equal_height=True):
            map_choice = gr.Dropdown(label="Map (encoder)", choices=[], elem_id="map-choice", scale=2, min_width=200)
            color = gr.Dropdown(
                label="Colour by",
                choices=[("collection", "zoo")],
                value="zoo",
                elem_id="color-by",
                scale=2,
                min_width=200,
            )
            search = gr.Textbox(
                label="Search name or id", scale=2, elem_id="map-search", min_width=200, placeholder="Enter to find"
            )
            with gr.Column(scale=1, min_width=150):
                zoom = gr.Checkbox(label="Zoom to matches", value=False, elem_id="map-zoom")
                density = gr.Checkbox(label="Density contours", value=False, elem_id="map-density")
        with gr.Accordion("Filters", open=False, elem_id="map-filters"), gr.Row():
            collections = gr.CheckboxGroup(label="Collection", choices=[])
            families = gr.CheckboxGroup(label="Base family", choices=[])
            formats = gr.CheckboxGroup(label="Format", choices=[])
        status = gr.Markdown(elem_id="map-status")
        with gr.Row():
            with gr.Column(scale=3, min_width=480):
                plot = gr.HTML(
                    value="",
                    html_template=(
                        "<div class='lol-map' role='application' tabindex='0' aria-label='Map of the collection' "
                        "style='width:100%;min-height:420px'></div>"
                        "<div class='lol-map-live' aria-live='polite' style='position:absolute;left:-9999px'></div>"
                    ),
                    js_on_load=_MAP_JS,
                    head=f'<script src="{PLOTLY_URL}"></script>',
                    elem_id="lol-map",
                    min_height=420,
                )
            with gr.Column(scale=2, min_width=320, elem_id="map-side"):
                card = gr.Markdown("Click a point to see its card and neighbours.", elem_id="map-card")
                side_predictions = gr.Dataframe(
                    headers=PREDICTION_COLUMNS,
                    interactive=False,
                    label="Predicted scores (stored when it was added)",
                    elem_id="map-predictions",
                    max_height=260,
                    wrap=True,
                )
                by = gr.Radio(["ΔW cosine", "this map's embedding"], value="ΔW cosine", label="Neighbours by")
                neighbours = gr.Dataframe(
                    headers=NEIGHBOUR_COLUMNS,
                    interactive=False,
                    label="Neighbours (click a row to open it)",
                    elem_id="map-neighbours",
                    max_height=320,
                )
        with gr.Accordion("Lasso / box selection", open=True, elem_id="map-selection-box"):
            selected = gr.Dataframe(
                headers=handlers.TABLE_HEADERS,
                interactive=False,
                label="Selected LoRAs (draw a lasso or box on the map)",
                elem_id="map-selection",
                max_height=320,
            )
            with gr.Row():
                csv = gr.Button("Export selection as CSV", size="sm")
                parquet = gr.Button("Export selection as Parquet", size="sm")
            download = gr.File(label="Download", interactive=False, elem_id="map-download")
        with gr.Accordion("Map maintenance", open=False):
            gr.Markdown("Refitting recomputes the layout from every stored embedding (seconds to minutes).")
            refit = gr.Button("Refit this map", size="sm")
        selected_ids = gr.State([])
        picked = gr.Textbox(visible=False, elem_id="map-picked")  # the clicked id
        side = [card, side_predictions, neighbours]
        inputs = [map_choice, color, search, zoom, density, collections, families, formats, selected_ids, picked]

        @_guard
        def draw(
            encoder: str | None,
            color_by: str | None,
            text: str,
            zoom_to: bool,
            contours: bool,
            zs: list[str],
            fs: list[str],
            fmts: list[str],
            lasso: list[str],
            lora_id: str,
        ) -> tuple[str, str]:
            if not encoder:
                return "", "No map yet: the collection is empty."
            view = map_view(
                explorer,
                encoder,
                color_by or "zoo",
                _filters("", zs, fs, fmts),
                search=text or "",
                picked=lora_id or None,
                selected=lasso or (),
                zoom=bool(zoom_to),
                density=bool(contours),
            )
            return view.figure.to_json(), handlers.escape(view.status(color_by or "zoo", text or ""), 400)

        def colours_of(encoder: str | None, color_by: str | None) -> Any:
            """The colourings ``encoder``'s map offers, ``color_by`` kept when it is one of them."""
            colours = colour_options(explorer, encoder) if encoder else []
            return gr.update(choices=colours, value=color_by if color_by in {c for _, c in colours} else "zoo")

        def refreshed(encoder: str | None, color_by: str | None) -> tuple[Any, ...]:
            """The map, colour and filter choices, the given map and colour kept where they still exist."""
            maps, _, choices = handlers.map_options(explorer)
            encoders = [e for _, e in maps]
            encoder = encoder if encoder in encoders else (encoders[0] if encoders else None)
            return (
                gr.update(choices=maps, value=encoder),
                colours_of(encoder, color_by),
                gr.update(choices=choices["zoo"]),
                gr.update(choices=choices["base_family"]),
                gr.update(choices=choices["format"]),
            )

        def controls(request: gr.Request | None = None) -> tuple[Any, ...]:
            """On a page load: the choices, and the view its address asks for (?map=&color=&lora=&q=)."""
            query = dict(request.query_params) if request is not None and request.query_params else {}
            lora_id = str(query.get("lora", ""))[:64]
            return (
                *refreshed(query.get("map"), query.get("color", "zoo")),
                str(query.get("q", ""))[:100],
                lora_id if explorer.find(lora_id) is not None else "",
            )

        @_guard
        def card_of(
            lora_id: str, encoder: str | None = None, mode: str = "ΔW cosine"
        ) -> tuple[str, pd.DataFrame, pd.DataFrame]:
            if not lora_id:
                empty = handlers.predictions_frame([])
                return "Click a point to see its card and neighbours.", empty, handlers.neighbours_frame([])
            text, near = handlers.lora_card(explorer, lora_id, by=encoder if mode == "this map's embedding" else None)
            stored = explorer.estimates(lora_id).values()
            return text, handlers.predictions_frame(stored, handlers.prediction_glossaries(explorer)), near

        def remember(encoder: str | None, color_by: str | None, lora_id: str, text: str) -> None:
            """Nothing on the server: the page's script writes the view into its address."""

        def on_click(evt: gr.EventData) -> str:
            return str(_event_value(evt, "id", ""))[:64]

        def on_row(frame: pd.DataFrame, evt: gr.SelectData) -> str:
            """A neighbour row selects its LoRA (the id is the row's last cell)."""
            row = evt.row_value if isinstance(evt.row_value, list) else []
            return str(row[-1])[:64] if row else ""

        def shown(event: Any, card_too: bool = False) -> None:
            """Chain the map's redraw (and the side card) after ``event``, then write the view into the address."""
            if card_too:
                event = event.then(card_of, [picked, map_choice, by], side, api_visibility="private")
            event = event.then(draw, inputs, [plot, status], api_visibility="private")
            event.then(remember, [map_choice, color, picked, search], None, js=_URL_JS, api_visibility="private")

        outputs = [map_choice, color, collections, families, formats, search, picked]
        shown(demo.load(controls, None, outputs, api_visibility="private"), card_too=True)
        shown(map_choice.input(colours_of, [map_choice, color], color, api_visibility="private"))
        for control in (color, zoom, density, collections, families, formats):
            shown(control.input(lambda: None, None, None, api_visibility="private", queue=False))
        shown(search.submit(lambda: None, None, None, api_visibility="private", queue=False))
        shown(plot.click(on_click, None, picked, api_visibility="private"), card_too=True)
        shown(neighbours.select(on_row, neighbours, picked, api_visibility="private"), card_too=True)
        by.input(card_of, [picked, map_choice, by], side, api_visibility="private")

        def on_select(evt: gr.EventData) -> tuple[list[str], pd.DataFrame]:
            raw = _event_value(evt, "ids", [])
            raw = raw if isinstance(raw, list) else []
            ids = [str(i) for i in raw if isinstance(i, str)][:10_000]
            return ids, handlers.collection_frame(explorer, ids=ids)

        plot.select(on_select, None, [selected_ids, selected], api_visibility="private")

        csv.click(lambda f: _export(explorer, f, "csv"), selected, download, api_visibility="private")
        parquet.click(lambda f: _export(explorer, f, "parquet"), selected, download, api_visibility="private")

        @_guard
        def on_refit(encoder: str | None) -> str:
            if not encoder:
                raise BadRequestError("no map to refit")
            seconds = explorer.fit_maps([encoder])[encoder]
            return f"Refitted in {seconds:.1f} s."

        refit.click(
            on_refit, map_choice, status, concurrency_id="cpu", concurrency_limit=1, api_visibility="private"
        ).then(draw, inputs, [plot, status], api_visibility="private")
    return (
        _Refresher(refreshed, [map_choice, color], [map_choice, color, collections, families, formats]),
        _Refresher(draw, inputs, [plot, status]),
    )


def _collection_tab(explorer: Explorer, demo: gr.Blocks, ledger: UploadLedger) -> _Refresher:
    with gr.Tab("Collection", id="collection"):
        with gr.Row():
            search = gr.Textbox(label="Search name or id", scale=2)
            collections = gr.CheckboxGroup(label="Collection", choices=[], scale=2)
            refresh = gr.Button("Refresh", scale=1)
        table = gr.Dataframe(
            headers=handlers.TABLE_HEADERS,
            label="Stored LoRAs",
            interactive=False,
            max_height=600,
            show_search="filter",
            elem_id="collection-table",
            buttons=["copy", "fullscreen"],
        )
        count = gr.Markdown(elem_id="collection-count")
        with gr.Row():
            csv = gr.Button("Export table as CSV")
            parquet = gr.Button("Export table as Parquet")
        download = gr.File(label="Download", interactive=False)
        with gr.Accordion("Add labels from a table", open=False):
            gr.Markdown(
                "A `.csv` or `.parquet` table with one key column and one column per label (numbers, text, or lists "
                'such as `["anime", "portrait"]`). Rows are joined to the stored LoRAs by the key; rows that '
                "match nothing and LoRAs without a row are listed."
            )
            with gr.Row():
                labels_file = gr.File(file_types=[".csv", ".parquet"], type="filepath", label="Labels table", scale=2)
                key = gr.Radio(["name", "sha256", "path"], value="name", label="Key column", scale=1)
                apply = gr.Button("Apply labels", scale=1)
            applied = gr.Markdown(label="Labels status", elem_id="labels-status")

        def show(text: str, zs: list[str]) -> tuple[pd.DataFrame, str]:
            filters = _filters(text, zs, [], [])
            matching = sum(1 for r in explorer.records() if filters.keep(r))
            frame = handlers.collection_frame(explorer, filters, limit=handlers.TABLE_ROWS)
            return frame, handlers.shown_count(len(frame), matching)

        def export(text: str, zs: list[str], fmt: str) -> str:  # every matching LoRA, not only the rows shown
            frame = handlers.collection_frame(explorer, _filters(text, zs, [], []))
            return _export(explorer, frame, fmt, "collection")

        @_guard
        def on_apply(path: str | None, key_name: str) -> str:
            try:
                return handlers.apply_labels(explorer, path, key_name or "name")
            finally:
                discard([path] if path else None, labels_file.GRADIO_CACHE, ledger)

        apply.click(on_apply, [labels_file, key], applied, api_name="labels", concurrency_id="write").then(
            show, [search, collections], [table, count], api_visibility="private"
        )

        def choices() -> Any:
            return gr.update(choices=handlers.map_options(explorer)[2]["zoo"])

        def refreshed(text: str, zs: list[str]) -> tuple[Any, pd.DataFrame, str]:
            return (choices(), *show(text, zs))

        demo.load(choices, None, collections, api_visibility="private").then(
            show, [search, collections], [table, count], api_visibility="private"
        )
        for event in (search.submit, collections.change, refresh.click):
            event(show, [search, collections], [table, count], api_visibility="private")

        filters = [search, collections]
        csv.click(lambda t, z: export(t, z, "csv"), filters, download, api_visibility="private")
        parquet.click(lambda t, z: export(t, z, "parquet"), filters, download, api_visibility="private")
    return _Refresher(refreshed, [search, collections], [collections, table, count])


def _compare_tab(explorer: Explorer, demo: gr.Blocks) -> _Refresher:
    with gr.Tab("Compare", id="compare"):
        with gr.Row():
            hint = f"type to filter the newest {handlers.PICKER_CHOICES:,}; paste any stored LoRA's id"
            first_pick = gr.Dropdown(
                label="First LoRA", choices=[], filterable=True, allow_custom_value=True, info=hint
            )
            second_pick = gr.Dropdown(
                label="Second LoRA", choices=[], filterable=True, allow_custom_value=True, info=hint
            )
            go = gr.Button("Compare", variant="primary")
        text = gr.Markdown(elem_id="compare-text")
        with gr.Row(equal_height=False):
            first_card = gr.Markdown(elem_id="compare-first")
            second_card = gr.Markdown(elem_id="compare-second")
        plot = gr.Plot(visible=False, elem_id="compare-plot")
        table = gr.Dataframe(headers=handlers.COMPARE_COLUMNS, interactive=False, max_height=420)
        with gr.Accordion("As JSON", open=False):
            data = gr.JSON(elem_id="compare-data")

        def choices() -> tuple[Any, Any]:
            options = handlers.lora_choices(explorer)
            return gr.update(choices=options), gr.update(choices=options)

        @_guard
        def compare(first: str | None, second: str | None) -> tuple[Any, ...]:
            result = handlers.compare_loras(explorer, first or "", second or "")
            figure = gr.update(value=result.figure, visible=result.figure is not None)
            return result.text, result.first_card, result.second_card, figure, result.table, result.data

        demo.load(choices, None, [first_pick, second_pick], api_visibility="private")
        outputs = [text, first_card, second_card, plot, table, data]
        go.click(compare, [first_pick, second_pick], outputs, api_visibility="private")  # the API: /comparison
    return _Refresher(choices, [], [first_pick, second_pick])


def _train_tab(explorer: Explorer, demo: gr.Blocks, jobs: TrainingJobs) -> _Refresher:
    with gr.Tab("Train", id="train"):
        gr.Markdown(
            "Learn a label of this collection (from a labels table, the files' metadata or a zoo) with a LoL model: "
            "the LoRAs with that label and the most common module layout, split by their `split` label, by a group "
            "label (LoRAs of one group never straddle train and test) or by LoRA. The held-out scores stand next to "
            "simple baselines on the same split; the predictor is calibrated and from then on predicts for uploads, "
            "maps and exports. One training at a time, in the background."
        )
        with gr.Row():
            label = gr.Dropdown(label="Label to learn", choices=[], elem_id="train-label")
            family = gr.Dropdown(label="Base family (optional)", choices=[])
            collection = gr.Dropdown(label="Collection (optional)", choices=[])
            group = gr.Dropdown(label="Group label (optional)", choices=[])
        with gr.Row():
            model = gr.Dropdown(
                label="Model",
                choices=list(handlers.TRAIN_MODELS),
                value=handlers.TRAIN_MODELS[0],
                elem_id="train-model",
            )
            epochs = gr.Slider(1, 200, value=30, step=1, label="Epochs", elem_id="train-epochs")
            seeds = gr.Slider(1, 5, value=1, step=1, label="Seeds")
            train = gr.Button("Train", variant="primary", elem_id="train-button")
            cancel = gr.Button("Cancel")
        status = gr.Markdown(label="Training status", elem_id="train-status")
        scores = gr.Dataframe(headers=handlers.TRAIN_COLUMNS, interactive=False, label="Held-out scores")

        def choices() -> tuple[Any, ...]:
            options = handlers.train_options(explorer)
            return (
                gr.update(choices=options["labels"]),
                gr.update(choices=["", *options["families"]]),
                gr.update(choices=["", *options["collections"]]),
                gr.update(choices=["", *options["labels"]]),
            )

        demo.load(choices, None, [label, family, collection, group], api_visibility="private")

        @_guard
        def on_train(*args: Any, progress: gr.Progress = gr.Progress()) -> Any:  # noqa: B008 (gradio's way)
            job = handlers.start_training(explorer, jobs, *args)
            for state in jobs.wait(job):
                progress(state.fraction, desc=state.status())
                yield handlers.training_result(state)

        inputs = [label, model, family, collection, group, epochs, seeds]
        train.click(on_train, inputs, [status, scores], api_name="train", concurrency_id="train", concurrency_limit=1)

        def on_cancel() -> str:
            return "Cancelling after this epoch…" if jobs.cancel() else "No training is running."

        cancel.click(on_cancel, None, status, api_name="cancel_training")
    return _Refresher(choices, [], [label, family, collection, group])


def _inspect_tab(limits: ReadLimits, ledger: UploadLedger) -> None:
    with gr.Tab("Inspect only", id="inspect"):
        gr.Markdown("Parse and describe a LoRA file without predictions or neighbours (the `lol inspect` report).")
        files = gr.File(file_count="multiple", file_types=[".safetensors", ".json"], type="filepath", label="LoRA")
        button = gr.Button("Inspect", variant="primary")
        summary = gr.Markdown(label="Summary")
        table = gr.Dataframe(
            headers=MODULE_COLUMNS, interactive=False, max_height=480, show_search="search", label="Modules"
        )
        with gr.Accordion("Full report (JSON)", open=False):
            report = gr.JSON(label="Report")

        @_guard
        def inspect(paths: list[str] | None) -> tuple[str, Any, dict[str, Any]]:
            try:
                result = handlers.inspect_upload(paths, limits)
            finally:
                discard(paths, files.GRADIO_CACHE, ledger)
            return result.summary, result.rows, json.loads(json.dumps(result.report, default=str))

        button.click(inspect, files, [summary, table, report], api_name="inspect").then(
            _nothing, None, files, api_visibility="private"
        )


def _data_api(explorer: Explorer, limits: ReadLimits, ledger: UploadLedger, startup: StartupJob | None) -> None:
    """The JSON endpoints of :mod:`app.api`, typed by their signatures (``gradio_client`` shows them as such)."""

    @_guard
    def collection_status() -> dict[str, Any]:
        """The collection's size, predictors and maps, and whether its first build is still running."""
        return api.collection_status(explorer, startup)

    @_guard
    def lora(lora_id: str, k: int = 10, by: str = "") -> dict[str, Any]:
        """A stored LoRA by id (sha256): fields, labels, predictions and its k nearest comparable LoRAs (by: empty
        for exact ΔW cosine, or an encoder such as 'fingerprint')."""
        return api.lora(explorer, lora_id, k, by)

    @_guard
    def neighbours(lora_id: str, k: int = 10, by: str = "") -> list[dict[str, Any]]:
        """The k stored LoRAs nearest to a stored one (same base family or shared modules only)."""
        return api.neighbours(explorer, lora_id, k, by)

    @_guard
    def collection_rows(
        search: str = "", collection: str = "", base_family: str = "", limit: int = 1000, offset: int = 0
    ) -> dict[str, Any]:
        """Stored LoRAs as rows, filtered (search: name substring or id prefix), one page of at most limit rows."""
        return api.collection_rows(explorer, search, collection, base_family, limit, offset)

    @_guard
    def comparison(first: str, second: str) -> dict[str, Any]:
        """Two stored LoRAs by id: overall and per-module ΔW cosine (null when they share no module)."""
        return api.comparison(explorer, first, second)

    @_guard
    def prediction(files: list[gr.FileData], repo_id: str = "", k: int = 10) -> dict[str, Any]:
        """A LoRA .safetensors (plus optional adapter_config.json) or a Hugging Face repo id: its description,
        predictions and nearest stored LoRAs. Stores nothing."""
        paths = [str(f["path"] if isinstance(f, dict) else f.path) for f in files or []]
        try:
            return api.prediction(explorer, paths, repo_id, k, limits)
        finally:
            discard(paths, get_upload_folder(), ledger)

    @_guard
    def predictors() -> list[dict[str, Any]]:
        """Every predictor's glossary: target, unit, base, zoo, held-out skill beside baselines, calibration."""
        return api.predictors(explorer)

    @_guard
    def maps() -> list[dict[str, Any]]:
        """Every stored map: encoder name, title, number of points."""
        return api.maps(explorer)

    @_guard
    def map_points(encoder: str, limit: int = 100_000, offset: int = 0) -> dict[str, Any]:
        """A page of a map's coordinates: ids, x, y of at most 100,000 points from offset on; total, next_offset."""
        return api.map_points(explorer, encoder, limit, offset)

    endpoints = (collection_status, lora, neighbours, collection_rows, comparison, prediction, predictors, maps)
    for fn in (*endpoints, map_points):
        fn.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]  # types, not strings
        gr.api(fn, api_name=fn.__name__, concurrency_id="cpu" if fn is prediction else None)


def _when(refresher: _Refresher) -> Callable[..., Any]:
    """``refresher.fn`` run when its first argument is true; otherwise every output left as it is."""
    n = len(refresher.outputs)

    def run(flag: bool, *args: Any) -> Any:
        if flag:
            return refresher.fn(*args)
        return gr.skip() if n == 1 else tuple(gr.skip() for _ in range(n))

    return run


def build_demo(
    explorer: Explorer,
    max_upload: int | None = None,
    ledger: UploadLedger | None = None,
    jobs: TrainingJobs | None = None,
    startup: StartupJob | None = None,
) -> gr.Blocks:
    """Build the app around an opened :class:`Explorer`; nothing is read until a page loads or an event runs.

    ``max_upload``: the per-file cap in bytes (default: ``LOL_MAX_UPLOAD``, see :mod:`app.web`), applied by the
    reader too. ``ledger``: the one given to ``app.web.launch_options`` (with the same cap) to launch the demo;
    without it, uploads that several sessions share may go before all of them used it. Analysed uploads wait in
    ``<uploads>/.held`` (:func:`app.uploads.held_root`). ``startup``: the start-up still running in the background
    (:class:`app.startup.StartupJob`): the header shows its progress, and the page refreshes when it is done.
    """
    limits = ReadLimits(max_file_bytes=max_upload or max_upload_bytes())
    hold = UploadHold(held_root(explorer.uploads_dir))
    ledger = ledger or UploadLedger()
    with gr.Blocks(title="LoL Explorer", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# 🧭 LoL Explorer\nWhat is in a LoRA, read from its weights alone: GL(r)-invariant encoders predict "
            "scores and map collections without running any model.",
            elem_id="app-title",
        )
        header = gr.Markdown(label="Collection status", elem_id="collection-status")
        with gr.Tabs(elem_id="tabs", overflow_behavior="wrap") as tabs:  # every tab in view on a phone, no "…" menu
            added = _upload_tab(explorer, demo, limits, hold, ledger, startup)
            refreshers = [
                *_explore_tab(explorer, demo),
                _collection_tab(explorer, demo, ledger),
                _compare_tab(explorer, demo),
                _train_tab(explorer, demo, jobs or TrainingJobs()),
            ]
            _inspect_tab(limits, ledger)

        def status() -> str:
            building = startup.status() if startup is not None else ""
            if building and not (startup is not None and startup.finished):
                return f"⏳ {handlers.escape(building, 300)} The maps and the collection appear here when it is done."
            maps = ", ".join(handlers.escape(m) for m in explorer.maps()) or "none"
            n, k = explorer.count(), len(explorer.predictors)
            text = f"**{n:,}** LoRAs in the collection · **{k}** predictors · maps: {maps}"
            if building:  # the start-up failed: said once, above the rest
                text = f"⚠️ {handlers.escape(building, 300)}\n\n{text}"
            return text if n else f"{text}\n\nThe collection is empty: {HOW_TO_GET_ZOOS}, or upload a LoRA below."

        demo.load(status, None, header, api_name="status")

        def opened_on(request: gr.Request | None = None) -> Any:
            """A shared address (?map=, ?color=, ?lora=, ?q=) opens on the Explore tab, where it points."""
            query = request.query_params if request is not None else {}
            return gr.Tabs(selected="explore") if any(k in query for k in ("map", "color", "lora", "q")) else gr.skip()

        demo.load(opened_on, None, tabs, api_visibility="private", queue=False)
        _data_api(explorer, limits, ledger, startup)
        event = added.then(status, None, header, api_visibility="private")  # an add shows up without a reload
        for refresher in refreshers:
            event = event.then(refresher.fn, refresher.inputs, refresher.outputs, api_visibility="private")
        if startup is not None and not startup.finished:  # each page polls until the build is done, then refreshes
            timer = gr.Timer(1.0)
            built = gr.State(False)

            def tick() -> tuple[str, Any, bool]:
                done = startup.finished
                return status(), gr.Timer(active=not done), done

            ticked = timer.tick(tick, None, [header, timer, built], api_visibility="private", queue=False)
            for refresher in refreshers:
                ticked = ticked.then(
                    _when(refresher), [built, *refresher.inputs], refresher.outputs, api_visibility="private"
                )
    return demo
