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
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from app import handlers
from app.handlers import MODULE_COLUMNS, NEIGHBOUR_COLUMNS, PREDICTION_COLUMNS, Filters
from app.training import TrainingJobs
from app.uploads import UploadHold, UploadLedger, discard, held_root
from app.web import PLOTLY_URL, max_upload_bytes
from lol_engine import ReadLimits
from lol_engine.errors import BadRequestError, LolError
from lol_engine.explorer import Explorer
from lol_engine.settings import HOW_TO_GET_ZOOS

__all__ = ["build_demo"]

_log = logging.getLogger(__name__)

_MAP_JS = """
const render = () => {
  const box = element.querySelector('.lol-map');
  if (!box || typeof Plotly === 'undefined') return;
  let fig;
  try { fig = JSON.parse(props.value || '{}'); } catch (e) { return; }
  if (!fig.data) { box.dataset.points = '0'; return; }
  Plotly.react(box, fig.data, fig.layout, {responsive: true, displaylogo: false, scrollZoom: true});
  const count = (n, t) => n + (t.name === 'selected' ? 0 : (t.customdata || []).length);
  box.dataset.points = String(fig.data.reduce(count, 0));
  if (!box.dataset.bound) {
    box.dataset.bound = '1';
    box.on('plotly_click', (ev) => {
      const p = ev && ev.points && ev.points[0];
      if (p && p.customdata) trigger('click', {id: p.customdata[0]});
    });
    box.on('plotly_selected', (ev) => {
      const ids = ev && ev.points ? ev.points.filter((p) => p.customdata).map((p) => p.customdata[0]) : [];
      trigger('select', {ids: Array.from(new Set(ids))});
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
def _export(frame: pd.DataFrame, fmt: str) -> str:
    """Write a shown table for download (Gradio copies it into its own cache); exports older than an hour go."""
    folder = Path(tempfile.gettempdir()) / "lol-explorer-exports"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        if time.time() - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True)
    return str(handlers.export_frame(frame, fmt, folder))


def _nothing() -> None:
    """Clears a component (a file box whose upload was deleted)."""


def _filters(search: str, collections: list[str], families: list[str], formats: list[str]) -> Filters:
    return Filters(search or "", tuple(collections or ()), tuple(families or ()), tuple(formats or ()))


def _upload_tab(explorer: Explorer, limits: ReadLimits, hold: UploadHold, ledger: UploadLedger) -> None:
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
                analyse = gr.Button("Analyse", variant="primary", elem_id="analyse-button")
                add = gr.Button("Add to collection", elem_id="add-button")
                added = gr.Markdown(elem_id="add-status")
            with gr.Column(scale=2):
                card = gr.Markdown(elem_id="upload-card")
                predictions = gr.Dataframe(
                    headers=PREDICTION_COLUMNS,
                    interactive=False,
                    label="Predicted scores",
                    elem_id="predictions",
                    max_height=360,
                )
                with gr.Accordion("What each predictor predicts, and what it knows", open=False):
                    gr.Markdown(  # a callable: re-read on each page load, so predictors trained since appear
                        lambda: handlers.glossary_markdown(handlers.predictor_glossary(explorer)),
                        elem_id="predictor-glossary",
                    )
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
            modules = gr.Dataframe(headers=MODULE_COLUMNS, interactive=False, max_height=420, show_search="search")
        held = gr.State(None, time_to_live=hold.ttl_s, delete_callback=hold.release)  # this session's analysed upload
        uploads = files.GRADIO_CACHE  # Gradio's upload folder: what it holds is served to whoever knows the path

        @_guard
        @_gpu
        def on_analyse(paths: list[str] | None, repo_id: str, token: str | None) -> tuple[Any, ...]:
            hold.release(token)
            try:
                result = handlers.analyse_upload(explorer, paths, repo_id, limits=limits)
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
        def on_add(paths: list[str] | None, repo_id: str, token: str | None) -> tuple[str, None]:
            try:  # the files given, else the upload analysed last, else the repo id
                message = handlers.add_upload(explorer, paths or hold.files(token) or None, repo_id, limits)
            finally:
                discard(paths, uploads, ledger)
            hold.release(token)  # only once added: a failed add can be retried
            return message, None

        outputs = [card, predictions, spectrum, neighbours, modules, added, held, blocks]
        analysed = analyse.click(
            on_analyse, [files, repo, held], outputs, api_name="analyse", concurrency_id="cpu", concurrency_limit=4
        )
        stored = add.click(
            on_add, [files, repo, held], [added, held], api_name="add", concurrency_id="write", concurrency_limit=1
        )
        for event in (analysed, stored):  # the upload is no longer on the server: the file box shows nothing
            event.then(_nothing, None, files, api_visibility="private")


def _explore_tab(explorer: Explorer, demo: gr.Blocks) -> None:
    with gr.Tab("Explore", id="explore"):
        with gr.Row():
            map_choice = gr.Dropdown(label="Map (encoder)", choices=[], elem_id="map-choice", scale=2)
            color = gr.Dropdown(label="Colour by", choices=["zoo"], value="zoo", elem_id="color-by", scale=2)
            search = gr.Textbox(label="Search name or id", scale=2, elem_id="map-search")
            refit = gr.Button("Refit map", scale=1)
        with gr.Row():
            collections = gr.CheckboxGroup(label="Collection", choices=[])
            families = gr.CheckboxGroup(label="Base family", choices=[])
            formats = gr.CheckboxGroup(label="Format", choices=[])
        status = gr.Markdown(elem_id="map-status")
        plot = gr.HTML(
            value="",
            html_template="<div class='lol-map' style='width:100%;min-height:560px'></div>",
            js_on_load=_MAP_JS,
            head=f'<script src="{PLOTLY_URL}"></script>',
            elem_id="lol-map",
            min_height=560,
        )
        with gr.Row():
            with gr.Column():
                by = gr.Radio(["ΔW cosine", "this map's embedding"], value="ΔW cosine", label="Neighbours by")
                card = gr.Markdown("Click a point to see its card and neighbours.", elem_id="map-card")
                neighbours = gr.Dataframe(
                    headers=NEIGHBOUR_COLUMNS,
                    interactive=False,
                    label="Neighbours",
                    elem_id="map-neighbours",
                    max_height=320,
                )
            with gr.Column():
                selected = gr.Dataframe(
                    interactive=False, label="Lasso / box selection", elem_id="map-selection", max_height=320
                )
                with gr.Row():
                    csv = gr.Button("Export selection as CSV")
                    parquet = gr.Button("Export selection as Parquet")
                download = gr.File(label="Download", interactive=False)
        selected_ids = gr.State([])
        picked = gr.Textbox(visible=False)  # the clicked id, also the API's way in
        inputs = [map_choice, color, search, collections, families, formats, selected_ids]

        @_guard
        def draw(
            encoder: str | None,
            color_by: str | None,
            text: str,
            zs: list[str],
            fs: list[str],
            fmts: list[str],
            highlight: list[str],
        ) -> tuple[str, str]:
            if not encoder:
                return "", "No map yet: the collection is empty."
            fig, n = handlers.map_figure(explorer, encoder, color_by or "zoo", _filters(text, zs, fs, fmts), highlight)
            return fig.to_json(), f"{n} LoRAs on the map · colour: {handlers.code(color_by or 'zoo')}"

        def controls() -> tuple[Any, ...]:
            maps, columns, choices = handlers.map_options(explorer)
            first = maps[0][1] if maps else None
            return (
                gr.update(choices=maps, value=first),
                gr.update(choices=columns, value="zoo"),
                gr.update(choices=choices["zoo"]),
                gr.update(choices=choices["base_family"]),
                gr.update(choices=choices["format"]),
            )

        demo.load(controls, None, [map_choice, color, collections, families, formats], api_name="map_controls").then(
            draw, inputs, [plot, status], api_visibility="private"
        )
        for control in (map_choice, color, collections, families, formats):
            control.change(draw, inputs, [plot, status], api_visibility="private")
        search.submit(draw, inputs, [plot, status], api_visibility="private")

        @_guard
        def on_click(encoder: str | None, mode: str, evt: gr.EventData) -> tuple[str, str, pd.DataFrame]:
            lora_id = str(_event_value(evt, "id", ""))
            return (lora_id, *card_of(lora_id, encoder, mode))

        @_guard
        def card_of(lora_id: str, encoder: str | None = None, mode: str = "ΔW cosine") -> tuple[str, pd.DataFrame]:
            if not lora_id:
                return "Click a point to see its card and neighbours.", handlers.neighbours_frame([])
            return handlers.lora_card(explorer, lora_id, by=encoder if mode == "this map's embedding" else None)

        plot.click(on_click, [map_choice, by], [picked, card, neighbours], api_visibility="private")
        picked.submit(card_of, [picked, map_choice, by], [card, neighbours], api_name="card")
        by.change(card_of, [picked, map_choice, by], [card, neighbours], api_visibility="private")

        def on_select(evt: gr.EventData) -> tuple[list[str], pd.DataFrame]:
            raw = _event_value(evt, "ids", [])
            raw = raw if isinstance(raw, list) else []
            ids = [str(i) for i in raw if isinstance(i, str)][:10_000]
            return ids, handlers.collection_frame(explorer, ids=ids)

        plot.select(on_select, None, [selected_ids, selected], api_visibility="private")

        csv.click(lambda f: _export(f, "csv"), selected, download, api_visibility="private")
        parquet.click(lambda f: _export(f, "parquet"), selected, download, api_visibility="private")

        @_guard
        def on_refit(encoder: str | None) -> str:
            if not encoder:
                raise BadRequestError("no map to refit")
            seconds = explorer.fit_maps([encoder])[encoder]
            return f"Refitted in {seconds:.1f} s."

        refit.click(on_refit, map_choice, status, concurrency_id="cpu", concurrency_limit=1, api_name="refit").then(
            draw, inputs, [plot, status], api_visibility="private"
        )


def _collection_tab(explorer: Explorer, demo: gr.Blocks, ledger: UploadLedger) -> None:
    with gr.Tab("Collection", id="collection"):
        with gr.Row():
            search = gr.Textbox(label="Search name or id", scale=2)
            collections = gr.CheckboxGroup(label="Collection", choices=[], scale=2)
            refresh = gr.Button("Refresh", scale=1)
        table = gr.Dataframe(
            interactive=False,
            max_height=600,
            show_search="filter",
            elem_id="collection-table",
            buttons=["copy", "fullscreen"],
        )
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
            applied = gr.Markdown(elem_id="labels-status")

        def show(text: str, zs: list[str]) -> pd.DataFrame:
            return handlers.collection_frame(explorer, _filters(text, zs, [], []))

        @_guard
        def on_apply(path: str | None, key_name: str) -> str:
            try:
                return handlers.apply_labels(explorer, path, key_name or "name")
            finally:
                discard([path] if path else None, labels_file.GRADIO_CACHE, ledger)

        apply.click(on_apply, [labels_file, key], applied, api_name="labels", concurrency_id="write").then(
            show, [search, collections], table, api_visibility="private"
        )

        def choices() -> Any:
            return gr.update(choices=handlers.map_options(explorer)[2]["zoo"])

        demo.load(choices, None, collections, api_visibility="private").then(
            show, [search, collections], table, api_name="collection"
        )
        for event in (search.submit, collections.change, refresh.click):
            event(show, [search, collections], table, api_visibility="private")

        csv.click(lambda f: _export(f, "csv"), table, download, api_name="export_csv")
        parquet.click(lambda f: _export(f, "parquet"), table, download, api_name="export_parquet")


def _compare_tab(explorer: Explorer, demo: gr.Blocks) -> None:
    with gr.Tab("Compare", id="compare"):
        with gr.Row():
            first = gr.Dropdown(label="First LoRA", choices=[], filterable=True, allow_custom_value=True)
            second = gr.Dropdown(label="Second LoRA", choices=[], filterable=True, allow_custom_value=True)
            go = gr.Button("Compare", variant="primary")
        text = gr.Markdown()
        plot = gr.Plot()
        table = gr.Dataframe(interactive=False, max_height=420)

        def choices() -> tuple[Any, Any]:
            options = handlers.lora_choices(explorer)
            return gr.update(choices=options), gr.update(choices=options)

        demo.load(choices, None, [first, second], api_visibility="private")
        go.click(
            _guard(functools.partial(handlers.compare_loras, explorer)),
            [first, second],
            [text, plot, table],
            api_name="compare",
        )


def _train_tab(explorer: Explorer, demo: gr.Blocks, jobs: TrainingJobs) -> None:
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
        status = gr.Markdown(elem_id="train-status")
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


def _inspect_tab(limits: ReadLimits, ledger: UploadLedger) -> None:
    with gr.Tab("Inspect only", id="inspect"):
        gr.Markdown("Parse and describe a LoRA file without predictions or neighbours (the `lol inspect` report).")
        files = gr.File(file_count="multiple", file_types=[".safetensors", ".json"], type="filepath", label="LoRA")
        button = gr.Button("Inspect", variant="primary")
        summary = gr.Markdown()
        table = gr.Dataframe(headers=MODULE_COLUMNS, interactive=False, max_height=480, show_search="search")
        with gr.Accordion("Full report (JSON)", open=False):
            report = gr.JSON()

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


def build_demo(
    explorer: Explorer,
    max_upload: int | None = None,
    ledger: UploadLedger | None = None,
    jobs: TrainingJobs | None = None,
) -> gr.Blocks:
    """Build the app around an opened :class:`Explorer`; nothing is read until a page loads or an event runs.

    ``max_upload``: the per-file cap in bytes (default: ``LOL_MAX_UPLOAD``, see :mod:`app.web`), applied by the
    reader too. ``ledger``: the one given to ``app.web.launch_options`` (with the same cap) to launch the demo;
    without it, uploads that several sessions share may go before all of them used it. Analysed uploads wait in
    ``<uploads>/.held`` (:func:`app.uploads.held_root`).
    """
    limits = ReadLimits(max_file_bytes=max_upload or max_upload_bytes())
    hold = UploadHold(held_root(explorer.uploads_dir))
    ledger = ledger or UploadLedger()
    with gr.Blocks(title="LoL Explorer", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# 🧭 LoL Explorer\nWhat is in a LoRA, read from its weights alone: GL(r)-invariant encoders predict "
            "scores and map collections without running any model."
        )
        header = gr.Markdown(elem_id="collection-status")
        with gr.Tabs():
            _upload_tab(explorer, limits, hold, ledger)
            _explore_tab(explorer, demo)
            _collection_tab(explorer, demo, ledger)
            _compare_tab(explorer, demo)
            _train_tab(explorer, demo, jobs or TrainingJobs())
            _inspect_tab(limits, ledger)

        def status() -> str:
            maps = ", ".join(handlers.escape(m) for m in explorer.maps()) or "none"
            n, k = explorer.count(), len(explorer.predictors)
            text = f"**{n}** LoRAs in the collection · **{k}** predictors · maps: {maps}"
            return text if n else f"{text}\n\nThe collection is empty: {HOW_TO_GET_ZOOS}, or upload a LoRA below."

        demo.load(status, None, header, api_name="status")
    return demo
