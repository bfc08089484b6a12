"""Plain functions behind the app's events. No gradio here: every handler is testable on its own.

Uploads are hostile until parsed: only ``.safetensors`` and ``adapter_config.json`` are accepted, sizes are bounded
by :class:`lol_engine.ReadLimits` (the server also caps uploads with ``launch(max_file_size=…)``), and every refusal
comes back as a :class:`~lol_engine.errors.LolError` whose message names the problem (a bad file, a bad request, or
something not found). Every function here talks to the collection through :class:`lol_engine.explorer.Explorer` only.
"""

from __future__ import annotations

import html
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pandas as pd
import plotly.graph_objects as go

from app.training import TrainingJob, TrainingJobs
from lol_engine import ReadLimits
from lol_engine.card import Card, build_card, check_name, lora_name, report_metadata
from lol_engine.errors import BadRequestError, NotFoundError
from lol_engine.estimate import Estimate
from lol_engine.explorer import Analysis, Explorer, Neighbour, describe_file, hub_lora, map_title
from lol_engine.glossary import Glossary, LabelDescription, significant
from lol_engine.labels import read_labels
from lol_engine.report import block_of

__all__ = [
    "MODULE_COLUMNS",
    "CompareResult",
    "Filters",
    "InspectResult",
    "UploadResult",
    "add_upload",
    "analyse_upload",
    "apply_labels",
    "block_strength_figure",
    "card_data",
    "collection_frame",
    "compare_loras",
    "escape",
    "export_frame",
    "export_name",
    "inspect_upload",
    "lora_card",
    "lora_choices",
    "map_options",
    "neighbours_frame",
    "no_comparable",
    "predictions_frame",
    "public_message",
    "relations_note",
    "render_card",
    "shown_count",
    "spectrum_figure",
    "start_training",
    "stored_card",
    "train_options",
    "training_result",
]

MODULE_COLUMNS = ["module", "kind", "rank", "alpha", "scale", "d_out", "d_in", "‖ΔW‖_F", "σ₁", "σ₁² / Σσ²"]


@dataclass(frozen=True)
class InspectResult:
    """What the Inspect tab shows: a Markdown summary, one row per module, and the full JSON report."""

    summary: str
    rows: list[list[Any]]
    report: dict[str, Any]


def _pick_files(paths: Sequence[str]) -> tuple[Path, Path | None]:
    files = [Path(p) for p in paths if p]
    gone = [p.name for p in files if not p.is_file()]
    if gone:  # analysed, added or expired: uploads do not stay on the server
        raise NotFoundError(f"{gone[0]} is no longer on the server; upload it again")
    lora = [p for p in files if p.suffix.lower() == ".safetensors"]
    configs = [p for p in files if p.name.endswith(".json")]
    others = [p.name for p in files if p not in lora and p not in configs]
    if others:
        raise BadRequestError(f"{others[0]}: only .safetensors files and adapter_config.json are accepted")
    if len(lora) != 1:
        raise BadRequestError(f"upload exactly one .safetensors file (got {len(lora)})")
    if len(configs) > 1:
        raise BadRequestError("upload at most one adapter_config.json")
    return lora[0], (configs[0] if configs else None)


def inspect_upload(paths: Sequence[str] | str | None, limits: ReadLimits | None = None) -> InspectResult:
    """Read an uploaded LoRA (plus an optional ``adapter_config.json``) and describe it.

    Raises :class:`~lol_engine.errors.LoraFormatError` for anything that is not a readable LoRA.
    """
    if not paths:
        raise BadRequestError("no file uploaded")
    file, config_path = _pick_files([paths] if isinstance(paths, str) else paths)
    report = describe_file(file, config_path, limits)
    rows = inspect_rows(report)
    return InspectResult(_summary(report, lora_name(file, config_path, report_metadata(report))), rows, report)


def _summary(report: dict[str, Any], name: str) -> str:
    """The Inspect tab's card: the file's facts only (no collection, no predictors)."""
    return render_card(build_card(report, name=name))


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.2f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 1024:.1f} KiB"


def _span(values: Sequence[float | int]) -> str:
    """``4`` or ``4–16`` (numbers shortened to 4 significant digits)."""
    lo, hi = (f"{v:.4g}" for v in (min(values), max(values)))
    return lo if lo == hi else f"{lo}–{hi}"


def _hash_line(card: Card) -> str:
    h = card.hashes
    line = f"**sha256** {code(h.sha256)} · **AutoV2** {code(h.autov2 or '—')}"
    if h.addnet_sha256:
        line += f" · **LoRA hash** (kohya/A1111) {code(h.addnet_shorthash)} ({code(h.addnet_sha256)})"
    if h.sshs_model_hash:
        verdict = {True: "matches", False: "⚠️ does not match", None: "not checked"}[h.sshs_model_hash_matches]
        line += f" · **sshs_model_hash** {code(h.sshs_model_hash[:12])} {verdict}"
    return line


def _trigger_line(card: Card) -> str | None:
    named = [
        f"**{label}** {escape(value, 80)}"
        for label, value in (("output name", card.output_name), ("trigger phrase", card.trigger_phrase))
        if value
    ]
    tags = ", ".join(f"{escape(t.tag, 60)} ({t.count:,})" for t in card.top_tags)
    if tags:
        named.append(f"**top tags** ({card.n_tags:,} in all): {tags}")
    return "**trigger words:** " + " · ".join(named) if named else None


def _parameters_table(card: Card) -> str | None:
    if not card.training_parameters:
        return None
    head = ["**training parameters**", "", "| parameter | value | meaning | key |", "|---|---|---|---|"]
    rows = [
        f"| {escape(p.name)} | {escape(p.value, 120)} | {escape(p.meaning)} | {escape(p.key)} |"
        for p in card.training_parameters
    ]
    return "\n".join([*head, *rows])


_SHOWN_BLOCKS = 24
_SHOWN_FIELDS = 16
_METADATA_GROUPS = (
    ("ss_", "other training metadata"),
    ("modelspec.", "modelspec"),
    ("adapter_config.", "adapter config"),
)


def _more(shown: int, total: int) -> str:
    return f" (and {total - shown:,} more in the card's JSON)" if total > shown else ""


def _block_line(card: Card) -> str | None:
    if not card.block_strength:
        return None
    shown = card.block_strength[:_SHOWN_BLOCKS]
    parts = " · ".join(f"{escape(b.block, 60)} {b.delta_fro_norm:.3g}" for b in shown)
    return f"**strength per block** (‖ΔW‖_F): {parts}{_more(len(shown), card.n_blocks)}"


def _metadata_lines(card: Card) -> list[str]:
    lines = []
    for prefix, title in _METADATA_GROUPS:
        fields = [(k, v) for k, v in card.other_metadata if k.startswith(prefix)]
        if fields:
            shown = ", ".join(
                f"{escape(k.removeprefix(prefix) if prefix != 'ss_' else k)} = {escape(v, 80)}"
                for k, v in fields[:_SHOWN_FIELDS]
            )
            lines.append(f"**{title}:** {shown}{_more(min(len(fields), _SHOWN_FIELDS), len(fields))}")
    return lines


def _label_text(value: Any) -> str:
    """A label as text: a number shortened, a 0/1 list as its bits, a list of names joined."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(value)
    return _short(value)


def _collection_lines(card: Card) -> list[str]:
    """What the collection knows: labels, estimates (or, for an upload, which predictors fit), where it is stored."""
    lines = []
    if card.labels:
        shown = ", ".join(f"{escape(k)} = {escape(_label_text(v), 80)}" for k, v in card.labels.items())
        lines.append(f"**labels:** {shown}")
    if card.n_predictors is not None:
        matched = len(card.predictions)
        lines.append(
            f"**predictors:** {matched} of {card.n_predictors} fit this LoRA"
            + ("" if matched else " (none was trained on this base and module layout)")
            + ("" if card.seconds is None else f" · analysed in {card.seconds * 1000:.0f} ms")
        )
    elif card.predictions:
        preds = [
            f"{escape(p.predictor)} = {escape(p.summary)}" + (" (in its training set)" if p.in_sample else "")
            for p in card.predictions
        ]
        lines.append("**predicted:** " + ", ".join(preds))
    if card.stored_as is not None:
        where = f" ({escape(card.collection)})" if card.collection else ""
        lines.append(f"✅ already in the collection as **{escape(card.stored_as)}**{where}")
    return lines


def render_card(card: Card) -> str:
    """A card as Markdown: the one renderer for uploads, stored LoRAs, Inspect and Compare. Every text from a file
    or a user is escaped (:func:`escape`, :func:`code`)."""
    where = f"**collection** {code(card.collection)} · " if card.collection and card.stored_as is None else ""
    facts = (
        f"{where}**format** {code(card.format)} · **base** {code(card.base_family)} · **dtype** {code(card.dtype)} · "
        f"**modules** {card.n_modules} · **rank** {_span(card.ranks) if card.ranks else '—'} · "
        f"**scale** {_span(card.scales) if card.scales else '—'} · **size** {_size(card.size_bytes)} · "
        f"**DoRA** {'yes' if card.is_dora else 'no'}"
    )
    norm = "—" if card.total_delta_fro_norm is None else f"{card.total_delta_fro_norm:.4g}"
    lines: list[str | None] = [
        f"### {escape(card.name)}",
        facts,
        f"**total ‖ΔW‖_F** {norm} · **evidence:** {escape('; '.join(card.evidence), 400)}",
        _hash_line(card),
        _trigger_line(card),
        _parameters_table(card),
        _block_line(card),
        *_metadata_lines(card),
        *_collection_lines(card),
        *(f"- ⚠️ {escape(w, 300)}" for w in card.warnings),
    ]
    return "\n\n".join(line for line in lines if line)


# ---------------------------------------------------------------------------------------------------- the explorer
# Everything below takes an :class:`lol_engine.explorer.Explorer`. Tables are pandas DataFrames and plots plotly
# figures (both gradio dependencies or app extras); text from files (names, metadata) is always escaped.

PREDICTION_COLUMNS = [
    "predictor",
    "what it predicts",
    "prediction",
    "likely range (90 %)",
    "held-out skill",
    "in its training set",
    "domain",
]
NEIGHBOUR_COLUMNS = ["name", "collection", "similarity", "relation", "by", "id"]
COMPARE_COLUMNS = ["module", "ΔW cosine", "‖ΔW‖_F first", "‖ΔW‖_F second"]
TABLE_COLUMNS = ["name", "zoo", "format", "base_family", "rank", "modules", "size_kb", "dtype", "added", "id"]
TABLE_HEADERS = [
    "name",
    "collection",
    "file format",
    "base model family",
    "rank",
    "modules",
    "size (KiB)",
    "dtype",
    "added",
    "id",
]
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~>])")
# An absolute POSIX or Windows path of two or more parts (not "owner/name" or "1/2": no word character before it).
_SERVER_PATH = re.compile(r"(?<![\w.~-])(?:[A-Za-z]:)?(?:[/\\][^\s/\\'\"`<>|:]+)+[/\\]([^\s/\\'\"`<>|:]+)")


def _plain(text: object, limit: int) -> str:
    value = str(text)
    if len(value) > limit:
        value = value[:limit] + "…"
    return " ".join(value.split())  # no newlines: one line, one table cell


def escape(text: object, limit: int = 200) -> str:
    """Untrusted text made inert for Markdown: shortened, one line, HTML-escaped, Markdown punctuation escaped."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(_plain(text, limit), quote=False))


def public_message(text: object, limit: int = 500) -> str:
    """An error message for the page and the API: one line, server paths cut to their last part, no markup.

    Gradio shows errors as sanitised HTML (not Markdown), and API clients get the text as it is: so nothing is
    backslash-escaped, and ``<`` / ``>`` become ``‹`` / ``›`` so that no tag or link can form.

    >>> public_message("/srv/app/.cache/lol.duckdb: the write failed (<b>disk</b>)")
    'lol.duckdb: the write failed (‹b›disk‹/b›)'
    """
    plain = _SERVER_PATH.sub(r"\1", _plain(text, limit))
    return plain.replace("<", "‹").replace(">", "›")


def escape_html(text: object, limit: int = 200) -> str:
    """Untrusted text made inert for HTML labels (plotly hover text, legends): shortened, one line, HTML-escaped."""
    return html.escape(_plain(text, limit), quote=True)


def code(text: object, limit: int = 200) -> str:
    """Untrusted text as a Markdown code span (the renderer escapes HTML inside it; backticks cannot close it)."""
    return "`" + _plain(text, limit).replace("`", "'") + "`"


@dataclass(frozen=True)
class Filters:
    """What the Explore and Collection tabs filter on; empty means no filter."""

    search: str = ""
    collections: tuple[str, ...] = ()
    families: tuple[str, ...] = ()
    formats: tuple[str, ...] = ()
    min_rank: int = 0
    max_rank: int = 1_000_000

    def keep(self, row: dict[str, Any]) -> bool:
        """Whether a record passes (search is a case-insensitive substring of the name or id prefix)."""
        text = self.search.strip().lower()
        if text and text not in str(row["name"]).lower() and not str(row["id"]).startswith(text):
            return False
        if self.collections and row["zoo"] not in self.collections:
            return False
        if self.families and row["base_family"] not in self.families:
            return False
        if self.formats and row["format"] not in self.formats:
            return False
        return bool(self.min_rank <= int(row["rank"]) <= self.max_rank)


@dataclass
class UploadResult:
    """What the Upload & predict tab shows."""

    card: str
    predictions: pd.DataFrame
    spectrum: go.Figure
    neighbours: pd.DataFrame
    modules: list[list[Any]]
    analysis: Analysis
    card_data: dict[str, Any] = field(default_factory=dict)  # the card as JSON (lol_engine.card.Card.to_dict)
    nearest: list[Neighbour] = field(default_factory=list)  # the neighbours behind the ``neighbours`` table


def _upload_files(
    paths: Sequence[str] | str | None, repo_id: str | None, name: str | None = None
) -> tuple[Path, Path | None, str | None]:
    """The LoRA file, its optional config, and the name given for it: the one typed (checked), else the Hub repo id,
    else None (then :func:`lol_engine.card.lora_name` names it from its folder or metadata, once it is read)."""
    repo_id = (repo_id or "").strip()
    typed = check_name(name) if name and name.strip() else None
    if paths:
        file, config = _pick_files([paths] if isinstance(paths, str) else paths)
        return file, config, typed
    if not repo_id:
        raise BadRequestError("no file uploaded and no repo id given")
    found = hub_lora(repo_id)
    return found.weights, found.config, typed or repo_id


def analyse_upload(
    explorer: Explorer,
    paths: Sequence[str] | str | None,
    repo_id: str | None = None,
    k: int = 10,
    limits: ReadLimits | None = None,
    name: str | None = None,
) -> UploadResult:
    """Read an upload (or a Hub repo), predict with every matching predictor and find its nearest stored LoRAs.

    ``name``: what to call it (optional; see :func:`lol_engine.card.lora_name` for the default). Stores nothing (the
    analysis is kept for :func:`add_upload`). Raises a :class:`~lol_engine.errors.LolError` naming the problem for
    anything that is not a readable LoRA, or for a name that is not allowed.
    """
    file, config, given = _upload_files(paths, repo_id, name)
    analysis = explorer.analyse(file, config, limits)
    stored = explorer.find(analysis.sha256)
    neighbours = explorer.neighbours(analysis.lora, k=k, exclude=analysis.sha256)
    report = analysis.report
    card = build_card(
        report,
        name=given or lora_name(file, config, analysis.lora.meta),
        collection=(stored.zoo or "uploads") if stored else None,
        stored_as=stored.name if stored else None,
        estimates=analysis.estimates,
        n_predictors=len(explorer.predictors),
        seconds=analysis.seconds,
    )
    text = render_card(card)
    if not neighbours:
        text += "\n\n" + no_comparable(analysis.lora.meta.base_family)
    text += relations_note(neighbours)
    return UploadResult(
        text,
        predictions_frame(analysis.estimates.values(), prediction_glossaries(explorer)),
        spectrum_figure(report),
        neighbours_frame(neighbours),
        inspect_rows(report),
        analysis,
        card.to_dict(),
        list(neighbours),
    )


def add_upload(
    explorer: Explorer,
    paths: Sequence[str] | str | None,
    repo_id: str | None = None,
    limits: ReadLimits | None = None,
    name: str | None = None,
) -> str:
    """Add an upload to the collection: its bytes are checked again, its analysis (same bytes) is reused.

    ``name``: what to store it under (optional, checked; default: :func:`lol_engine.card.lora_name`).
    """
    file, config, given = _upload_files(paths, repo_id, name)
    result = explorer.add(file, config, name=given, limits=limits)
    if result.existed:
        return f"**{escape(result.name)}** is already in the collection (id `{result.id[:12]}`)."
    return f"Added **{escape(result.name)}** to the collection (id `{result.id[:12]}`); it is on the maps now."


def inspect_rows(report: dict[str, Any]) -> list[list[Any]]:
    """One row per module for :data:`MODULE_COLUMNS`."""
    rows = []
    for m in report["modules"]:
        sigma = m["singular_values"]
        energy = sum(s * s for s in sigma)
        top = sigma[0] ** 2 / energy if energy > 0 else 0.0
        alpha = "" if m["alpha"] is None else round(m["alpha"], 4)
        rows.append(
            [
                m["name"],
                m["kind"],
                m["rank"],
                alpha,
                round(m["scale"], 4),
                m["d_out"],
                m["d_in"],
                round(m["delta_fro_norm"], 5),
                round(sigma[0], 5),
                round(top, 3),
            ]
        )
    return rows


def predictions_frame(estimates: Iterable[Estimate], glossaries: Mapping[str, Glossary] | None = None) -> pd.DataFrame:
    """One row per estimate, in words (:data:`PREDICTION_COLUMNS`): what the predictor predicts (its glossary's
    title), the prediction (percentages where the glossary says the label is a share, else 3 significant digits and
    its unit; class names, with the probability), its calibrated range, its held-out skill beside the best simple
    baseline and the constant, whether the LoRA was in its training set, and whether it lies far from its training
    LoRAs. A predictor without a glossary in ``glossaries`` is shown by its raw label."""
    rows = []
    for e in estimates:
        glossary = (glossaries or {}).get(e.predictor)
        rows.append(
            [
                e.predictor,
                glossary.title if glossary is not None else e.label,
                _prediction_text(e, glossary),
                _range_text(e, glossary),
                glossary.skill_text() if glossary is not None else str(e.skill or ""),
                "yes — in-sample, optimistic" if e.in_sample else "no",
                _domain_text(e, glossary),
            ]
        )
    return pd.DataFrame(rows, columns=PREDICTION_COLUMNS)


_MAX_BLOCK_TICKS = 40
_MAX_BLOCK_LINES = 200  # more blocks than this (a hostile file): no separators, the ticks still say where


@dataclass(frozen=True)
class _BlockAxis:
    """Modules laid out along x grouped by block (:func:`lol_engine.report.block_of`), blocks in depth order."""

    order: list[int]  # module indices in the order drawn: by block, file order within one
    blocks: list[str]  # the block of each drawn module
    ticks: list[float]  # the middle of each block (one tick per block, or per few blocks when there are many)
    labels: list[str]  # the block names at those ticks (HTML-escaped)
    bounds: list[float]  # x of the lines between blocks

    def layout(self, fig: go.Figure) -> None:
        """Category ticks (block names, never fractional positions) and a dotted line between blocks."""
        fig.update_xaxes(
            tickmode="array",
            tickvals=self.ticks,
            ticktext=self.labels,
            tickangle=-45,
            range=[-0.5, len(self.order) - 0.5],
        )
        if len(self.bounds) <= _MAX_BLOCK_LINES:  # one layout update: add_vline per line is quadratic in lines
            line = {"width": 1, "dash": "dot", "color": "#999"}
            fig.update_layout(
                shapes=[
                    {"type": "line", "x0": x, "x1": x, "yref": "paper", "y0": 0, "y1": 1, "line": line}
                    for x in self.bounds
                ]
            )


def _block_axis(names: Sequence[str]) -> _BlockAxis:
    keyed = [block_of(name) for name in names]
    order = sorted(range(len(names)), key=lambda i: (keyed[i][1], i))
    blocks = [keyed[i][0] for i in order]
    starts = [x for x in range(len(blocks)) if x == 0 or blocks[x] != blocks[x - 1]]
    ends = [*starts[1:], len(blocks)]
    step = max(1, -(-len(starts) // _MAX_BLOCK_TICKS))  # label every step-th block when there are many
    ticks = [(a + b - 1) / 2 for a, b in zip(starts, ends, strict=True)][::step]
    labels = [escape_html(blocks[a], 40) for a in starts][::step]
    return _BlockAxis(order, blocks, ticks, labels, [x - 0.5 for x in starts[1:]])


def prediction_glossaries(explorer: Explorer) -> dict[str, Glossary]:
    """Every predictor's glossary, by name (what :func:`predictions_frame` reads)."""
    return {name: predictor.glossary for name, predictor in explorer.predictors.items()}


def _percent(p: float) -> str:
    return f"{significant(100 * p)} %"


def _description(e: Estimate, glossary: Glossary | None) -> LabelDescription:
    return glossary.description if glossary is not None else LabelDescription(e.label, "")


def _name(e: Estimate, glossary: Glossary | None, output: str) -> str:
    return glossary.class_name(output) if glossary is not None else output


def _prediction_text(e: Estimate, glossary: Glossary | None) -> str:
    """The prediction in words: a number with its unit, a class with its probability, or the entries that are 1."""
    if e.kind == "regression":
        return _description(e, glossary).format(float(cast(float, e.value)))
    if e.kind == "multilabel":
        ones = [_name(e, glossary, k) for k, p in e.probabilities.items() if p >= 0.5]
        return ", ".join(ones) if ones else "none"
    p = e.probabilities[e.label] if e.kind == "binary" else e.probabilities[str(e.value)]
    if e.kind == "binary" and e.value == "0":
        p = 1.0 - p
    return f"{_name(e, glossary, str(e.value))} ({_percent(p)})"


def _range_text(e: Estimate, glossary: Glossary | None) -> str:
    """The calibrated range in the prediction's words (its coverage added when it is not the column's 90 %)."""
    if e.coverage is None:
        return "not calibrated"
    at = "" if abs(e.coverage - 0.9) < 1e-9 else f" ({_percent(e.coverage)})"
    if e.interval is not None:
        return _description(e, glossary).format_range(*e.interval) + at
    if e.sets is None:
        return ""
    if e.kind == "multilabel":
        sure_1 = sum(s == ("1",) for s in e.sets.values())
        sure_0 = sum(s == ("0",) for s in e.sets.values())
        return f"{sure_1} surely yes · {sure_0} surely no · {len(e.sets) - sure_1 - sure_0} unsure{at}"
    chosen = [_name(e, glossary, v) for v in e.sets[e.label]]
    if not chosen:
        return f"none (∅){at}"
    return (" or " if e.kind == "binary" else ", ").join(chosen) + at


def _domain_text(e: Estimate, glossary: Glossary | None) -> str:
    """Near or far from the predictor's training LoRAs (:mod:`lol_engine.train.domain`), or unknown."""
    if e.out_of_domain is None or e.domain_distance is None:
        return "unknown (no reference)"
    if not e.out_of_domain:
        return "✅ near its training LoRAs"
    threshold = glossary.domain_threshold if glossary is not None else None
    times = f" ({e.domain_distance / threshold:.1f}× its limit)" if threshold else ""
    return f"⚠️ far from its training LoRAs{times}"


def predictor_glossary(explorer: Explorer) -> list[dict[str, Any]]:
    """One JSON-ready dict per predictor of the collection (:meth:`lol_engine.glossary.Glossary.to_json`), by name."""
    return [predictor.glossary.to_json() for _, predictor in sorted(explorer.predictors.items())]


def glossary_markdown(entries: Sequence[Mapping[str, Any]]) -> str:
    """:func:`predictor_glossary`'s entries as Markdown for the app; every text from a predictor folder (names,
    descriptions, a user's label and class names) is escaped."""
    if not entries:
        return "No predictor is loaded."
    blocks = []
    for g in entries:
        base = g["base"]
        lines = [
            f"#### {escape(g['title'])}",
            f"{code(g['predictor'], 80)} predicts {code(g['label'], 80)}: {escape(g['meaning'], 600)}",
        ]
        if g["users_label"]:
            lines.append("⚠️ A label of your own collection: what it means is yours, not lol-explorer's.")
        unit = "percent" if g["percent"] else (escape(g["unit"]) or "no unit")
        lines.append(f"**unit** {unit}" + (f" · **range** {escape(g['range'])}" if g["range"] else ""))
        if g["classes"]:
            lines.append("**classes** " + escape(", ".join(g["classes"]), 600))
        learned = [
            f"**base** {escape(base['name'] or 'not recorded')} ({escape(base['family'] or 'family not recorded')})",
            f"**zoo** {escape(g['zoo'] or 'not recorded')}"
            + (f" — {escape(g['zoo_description'], 300)}" if g["zoo_description"] else ""),
        ]
        if g["data"]:
            learned.append(f"**data** {escape(g['data'], 600)}")
        if g["n_train"] is not None:
            learned.append(f"**trained on** {g['n_train']} LoRAs")
        lines.append(" · ".join(learned))
        lines.append(f"**held-out skill** {escape(g['skill_text'], 400)}")
        if g["coverage"] is not None:
            held = g["held_out_coverage"]
            lines.append(
                f"**likely ranges** {_percent(g['coverage'])} nominal, calibrated on {escape(g['calibration_split'])}"
                + ("" if held is None else f"; {_percent(held)} of test LoRAs fell inside")
            )
        if g["domain_threshold"] is not None:
            lines.append(
                f"**far from its training LoRAs** when the mean distance to its {g['domain_k']} nearest training "
                f"LoRAs exceeds {g['domain_threshold']:.3g} (farther than 99 % of its held-out LoRAs)"
            )
        blocks.append("\n\n".join(lines))
    return "\n\n---\n\n".join(blocks)


def spectrum_figure(report: dict[str, Any], max_curves: int = 8) -> go.Figure:
    """Singular values of every module's ΔW (log scale): one curve per index k = 1…min(r, max_curves), modules
    grouped by block along x (text encoders, UNet down/mid/up blocks, transformer or LLM layers); hover names the
    module in full."""
    modules = report["modules"]
    axis = _block_axis([m["name"] for m in modules])
    drawn = [modules[i] for i in axis.order]
    hover = [
        f"{escape_html(m['name'], 300)}<br>block {escape_html(block, 60)}"
        for m, block in zip(drawn, axis.blocks, strict=True)
    ]
    fig = go.Figure()
    depth = min(max_curves, max((len(m["singular_values"]) for m in modules), default=0))
    for k in range(depth):
        values = [m["singular_values"][k] if k < len(m["singular_values"]) else None for m in drawn]
        values = [v if v and v > 0 else None for v in values]
        fig.add_trace(
            go.Scatter(
                x=list(range(len(drawn))),
                y=values,
                mode="lines+markers",
                name=f"σ{k + 1}",
                text=hover,
                hovertemplate="%{text}<br>σ" + str(k + 1) + " = %{y:.4g}<extra></extra>",
            )
        )
    fig.update_layout(
        title="Per-module spectrum of ΔW (exact, from the factors)",
        xaxis_title="module, grouped by block",
        yaxis_title="singular value",
        yaxis_type="log",
        height=400,
        margin={"l": 50, "r": 10, "t": 60, "b": 90},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1.0},
    )
    axis.layout(fig)
    return fig


def block_strength_figure(report: dict[str, Any]) -> go.Figure:
    """‖ΔW‖_F per block (UNet down/mid/up, text-encoder or LLM layer): √(Σ ‖ΔW‖_F²) of the block's modules."""
    blocks = report.get("block_strength") or []
    fig = go.Figure(
        go.Bar(
            x=[escape_html(b["block"], 60) for b in blocks],
            y=[b["delta_fro_norm"] for b in blocks],
            customdata=[b["n_modules"] for b in blocks],
            hovertemplate="%{x}<br>‖ΔW‖_F = %{y:.4g}<br>%{customdata} module(s)<extra></extra>",
            marker_color="#4c72b0",
        )
    )
    fig.update_layout(
        title="Strength per block: ‖ΔW‖_F of its modules together",
        xaxis_title="block (from the module names)",
        yaxis_title="‖ΔW‖_F",
        height=340,
        margin={"l": 50, "r": 10, "t": 40, "b": 80},
    )
    return fig


def neighbours_frame(neighbours: Sequence[Neighbour]) -> pd.DataFrame:
    """The neighbours table."""
    rows = [
        [n.name, n.zoo or "uploads", round(n.similarity, 4), n.relation.text if n.relation else "", n.by, n.id]
        for n in neighbours
    ]
    return pd.DataFrame(rows, columns=NEIGHBOUR_COLUMNS)


def map_options(explorer: Explorer) -> tuple[list[tuple[str, str]], list[str], dict[str, list[str]]]:
    """``(maps as (label, encoder), colour-by columns, {filter: choices})`` for the Explore tab's controls."""
    maps = [(map_title(e), e) for e in explorer.maps()]
    records = explorer.records()
    columns: list[str] = ["zoo", "base_family", "format", "rank"]
    for row in records:
        columns += [c for c in row if c.startswith(("label:", "pred:")) and c not in columns]
    choices = {key: sorted({str(r[key]) for r in records}) for key in ("zoo", "base_family", "format")}
    return maps, columns, choices


def stored_card(explorer: Explorer, lora_id: str) -> Card:
    """A stored LoRA's card: its file's facts as the store keeps them (no file is read), its collection, labels and
    stored estimates."""
    stored = explorer.get(lora_id)
    return build_card(
        explorer.card_facts(lora_id),
        name=stored.name,
        collection=stored.zoo or "uploads",
        labels=explorer.labels(lora_id),
        estimates=explorer.estimates(lora_id),
    )


def card_data(explorer: Explorer, lora_id: str) -> dict[str, Any]:
    """A stored LoRA's card as JSON (:meth:`lol_engine.card.Card.to_dict`), for the API."""
    return stored_card(explorer, lora_id).to_dict()


def lora_card(explorer: Explorer, lora_id: str, k: int = 10, by: str | None = None) -> tuple[str, pd.DataFrame]:
    """A stored LoRA's card (:func:`stored_card` as Markdown) and its nearest neighbours.

    ``by``: ``None`` for exact ΔW cosine, else an encoder name (cosine of that encoder's embeddings).
    """
    card = stored_card(explorer, lora_id)
    text = render_card(card)
    neighbours = explorer.neighbours_of(lora_id, k=k, by=by or None)
    if not neighbours:
        text += "\n\n" + no_comparable(card.base_family)
    return text + relations_note(neighbours), neighbours_frame(neighbours)


def relations_note(neighbours: Sequence[Neighbour]) -> str:
    """The card's near-duplicate line: each distinct relation the explorer found, or nothing."""
    texts = list(dict.fromkeys(n.relation.text for n in neighbours if n.relation))
    if not texts:
        return ""
    return "\n\n**Near-duplicate of the collection:** " + "; ".join(escape(t, 300) for t in texts)


def no_comparable(family: str) -> str:
    """Why a LoRA has no neighbour: none shares a module with it, and none is of its (known) base family."""
    why = (
        "its base model is unknown"
        if family in ("", "unknown")
        else f"none is a {code(family)} LoRA (LoRAs of other base models are never compared)"
    )
    return f"**No comparable LoRA in this collection:** none shares a module with it, and {why}."


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + "".join(str(int(v)) if isinstance(v, (int, float)) else "?" for v in value[:64]) + "]"
    return str(value)


_FIELD_TITLES = {
    "zoo": "collection",
    "base_family": "base model family",
    "format": "file format",
    "modules": "modules",
    "size_kb": "size (KiB)",
}


def column_title(column: str) -> str:
    """A column's name for people: ``label:acc_all`` → ``acc_all (label)``, ``pred:x`` → ``x (predicted)``,
    ``zoo`` → ``collection``."""
    if column.startswith("label:"):
        return f"{column.removeprefix('label:')} (label)"
    if column.startswith("pred:"):
        return f"{column.removeprefix('pred:')} (predicted)"
    return _FIELD_TITLES.get(column, column)


def _rounded(value: Any) -> Any:
    """A table cell: floats to 4 significant digits (0.10000000149011612 → 0.1), anything else as it is."""
    return float(f"{value:.4g}") if isinstance(value, float) else value


def collection_frame(
    explorer: Explorer,
    filters: Filters | None = None,
    ids: Sequence[str] | None = None,
    for_people: bool = True,
    limit: int | None = None,
) -> pd.DataFrame:
    """The collection as a table (one row per LoRA: fields, label and prediction summaries), filtered or by ids;
    ``for_people``: floats rounded and columns named by :func:`column_title` (else the stored names and values);
    ``limit``: at most that many rows, the newest (a page never receives a 100k-row table; exports take them all)."""
    filters = filters or Filters()
    records = explorer.records()
    if ids is not None:
        wanted = set(ids)
        records = [r for r in records if r["id"] in wanted]
    rows = [r for r in records if filters.keep(r)]
    if limit is not None and len(rows) > limit:
        rows = rows[len(rows) - limit :]  # records are oldest first
    extra = sorted({c for r in records for c in r if c not in TABLE_COLUMNS})
    columns = [*TABLE_COLUMNS[:-1], *extra, "id"]
    if not for_people:
        return pd.DataFrame([[r.get(c) for c in columns] for r in rows], columns=columns)
    frame = pd.DataFrame([[_rounded(r.get(c)) for c in columns] for r in rows], columns=columns)
    return frame.rename(columns=column_title)


_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


def export_name(frame: pd.DataFrame, fmt: str, what: str = "selection", now: datetime | None = None) -> str:
    """``lol-<collection>-<N>loras-<YYYYmmdd-HHMM>.<fmt>`` (UTC): named after the one collection its rows are from,
    else after ``what`` (``selection``, ``collection``); only letters, digits and ``._-``, never a path.

    >>> export_name(pd.DataFrame({"zoo": ["digits", "digits"]}), "csv", now=datetime(2025, 1, 2, 3, 4))
    'lol-digits-2loras-20250102-0304.csv'
    """
    zoos = set(frame["zoo"].astype(str)) if "zoo" in frame.columns else set()
    part = zoos.pop() if len(zoos) == 1 else what
    slug = _SLUG.sub("-", part).strip("-._")[:40].strip("-._") or "selection"
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M")
    return f"lol-{slug}-{len(frame)}loras-{stamp}.{fmt}"


def export_frame(frame: pd.DataFrame, fmt: str, folder: str | os.PathLike[str], what: str = "selection") -> Path:
    """Write a table as CSV or Parquet, named by :func:`export_name`, in a fresh folder under ``folder``; returns the
    path. ``what``: the name for rows of several collections (``selection``: a lasso; ``collection``: the table)."""
    if fmt not in ("csv", "parquet"):
        raise BadRequestError(f"unknown export format {fmt!r} (csv or parquet)")
    if frame is None or len(frame) == 0:
        raise BadRequestError("nothing to export: the selection is empty")
    out = Path(tempfile.mkdtemp(prefix="export-", dir=folder)) / export_name(frame, fmt, what)
    if fmt == "csv":
        frame.to_csv(out, index=False)
    else:
        frame.to_parquet(out, index=False)
    return out


def apply_labels(explorer: Explorer, path: str | None, key: str = "name") -> str:
    """Read an uploaded labels table (CSV or Parquet) and label the stored LoRAs by ``key``; a Markdown report of
    what matched and what did not."""
    if not path:
        raise BadRequestError("no labels table uploaded")
    table = read_labels(path, key)
    match = explorer.apply_labels(table)
    return "\n".join(f"- {escape(line, 600)}" for line in match.summary(table))


TABLE_ROWS = 2_000  # rows of the Collection table sent to a page (the newest matching ones; exports hold all)
PICKER_CHOICES = 2_000  # LoRAs offered by a Compare picker (the newest; any stored id can be typed in)


def shown_count(shown: int, matching: int) -> str:
    """The line under a capped table: how many rows it shows of how many match.

    >>> shown_count(2000, 100000)
    'Showing the newest 2,000 of 100,000 matching LoRAs: narrow the search, or export the table to get all of them.'
    >>> shown_count(12, 12)
    '12 LoRAs.'
    """
    if shown >= matching:
        return f"{matching:,} LoRA{'s' if matching != 1 else ''}."
    return (
        f"Showing the newest {shown:,} of {matching:,} matching LoRAs: narrow the search, or export the table to get "
        "all of them."
    )


def lora_choices(explorer: Explorer, limit: int | None = PICKER_CHOICES) -> list[tuple[str, str]]:
    """``(label, id)`` for the Compare tab's pickers: the ``limit`` newest stored LoRAs (None: all of them)."""
    records = explorer.records()
    if limit is not None:
        records = records[max(0, len(records) - limit) :]
    return [(f"{r['name']} · {r['zoo']} · {r['id'][:8]}", r["id"]) for r in records]


@dataclass
class CompareResult:
    """What the Compare tab shows: why (or how much) the two are alike, both cards side by side, the per-module ΔW
    cosine chart (None when there is nothing to draw) and table, and all of it as JSON (``data``) for the API."""

    text: str
    first_card: str
    second_card: str
    figure: go.Figure | None
    table: pd.DataFrame
    data: dict[str, Any]


def _cosine_figure(rows: Sequence[tuple[str, float, float, float]]) -> go.Figure:
    axis = _block_axis([name for name, *_ in rows])
    drawn = [rows[i] for i in axis.order]
    fig = go.Figure(
        go.Bar(
            x=list(range(len(drawn))),
            y=[c for _, c, *_ in drawn],
            text=[escape_html(n, 300) for n, *_ in drawn],
            customdata=[[x, y] for *_, x, y in drawn],
            textposition="none",
            hovertemplate="%{text}<br>ΔW cosine %{y:.4f}<br>‖ΔW‖_F %{customdata[0]:.4g} vs %{customdata[1]:.4g}"
            "<extra></extra>",
            marker_color="#4c72b0",
        )
    )
    fig.update_layout(
        title="Per-module ΔW cosine, grouped by block",
        yaxis={"range": [-1, 1], "title": "cosine"},
        xaxis_title="module, grouped by block",
        height=360,
        margin={"l": 50, "r": 10, "t": 40, "b": 90},
    )
    axis.layout(fig)
    return fig


def compare_loras(explorer: Explorer, first: str, second: str) -> CompareResult:
    """Two stored LoRAs side by side: both cards, the overall and per-module ΔW cosine, with norms.

    LoRAs of different base models, or that share no module of the same shape, have no ΔW cosine: the text says why
    and there is no figure (never an empty plot).
    """
    if not first or not second:
        raise BadRequestError("pick two LoRAs to compare")
    a, b = stored_card(explorer, first), stored_card(explorer, second)
    head = f"**{escape(a.name)}** ({escape(a.collection)}) vs **{escape(b.name)}** ({escape(b.collection)})"
    data: dict[str, Any] = {"first": a.to_dict(), "second": b.to_dict(), "overall_cosine": None, "modules": []}
    empty = pd.DataFrame([], columns=COMPARE_COLUMNS)
    if a.base_family != b.base_family:
        why = (
            f"{escape(a.name)} is a {code(a.base_family)} LoRA and {escape(b.name)} a {code(b.base_family)} LoRA: "
            "LoRAs of different base models cannot be compared (their ΔW live in different models), so there is no "
            "ΔW cosine."
        )
        data["reason"] = "different base models"
        return CompareResult(f"{head}\n\n{why}", render_card(a), render_card(b), None, empty, data)
    overall, rows = explorer.compare(first, second)
    if overall is None:
        why = "They share no module of the same shape: ΔW cosine is undefined (compare fingerprints on the map)."
        data["reason"] = "no shared module"
        return CompareResult(f"{head}\n\n{why}", render_card(a), render_card(b), None, empty, data)
    data["reason"] = None
    data["overall_cosine"] = overall
    data["modules"] = [{"module": n, "cosine": c, "norm_first": x, "norm_second": y} for n, c, x, y in rows]
    text = f"{head}\n\n**ΔW cosine over {len(rows)} shared modules:** {overall:.4f}"
    frame = pd.DataFrame([[n, round(c, 4), round(x, 5), round(y, 5)] for n, c, x, y in rows], columns=COMPARE_COLUMNS)
    return CompareResult(text, render_card(a), render_card(b), _cosine_figure(rows), frame, data)


# ---------------------------------------------------------------------------------------------------- training
TRAIN_MODELS = ("spectral_glnet", "module_tokens", "gl_net", "svd", "o_align", "mlp", "transformer")
TRAIN_COLUMNS = ["score", "held-out (test) value"]


def train_options(explorer: Explorer) -> dict[str, list[str]]:
    """Choices for the Train tab: labels on stored LoRAs, base families, collections, and models."""
    records = explorer.records()
    labels = sorted({c.removeprefix("label:") for r in records for c in r if c.startswith("label:")} - {"split"})
    return {
        "labels": labels,
        "families": sorted({str(r["base_family"]) for r in records}),
        "collections": sorted({str(r["zoo"]) for r in records}),
        "models": list(TRAIN_MODELS),
    }


def start_training(
    explorer: Explorer,
    jobs: TrainingJobs,
    label: str | None,
    model: str | None = None,
    base_family: str | None = None,
    collection: str | None = None,
    group: str | None = None,
    epochs: int = 30,
    seeds: int = 1,
) -> TrainingJob:
    """Start training a predictor of ``label`` on the collection in the background (one job at a time)."""
    if not label:
        raise BadRequestError("pick a label to learn")
    model = model or TRAIN_MODELS[0]
    if model not in TRAIN_MODELS:
        raise BadRequestError(f"unknown model {model!r}; pick one of {', '.join(TRAIN_MODELS)}")
    if not 1 <= int(epochs) <= 500 or not 1 <= int(seeds) <= 5:
        raise BadRequestError("epochs must be 1–500 and seeds 1–5")
    options: dict[str, Any] = {
        "base_family": base_family or None,
        "collection": collection or None,
        "group": group or None,
        "epochs": int(epochs),
        "seeds": int(seeds),
    }
    description = f"{model} on {label}"
    return jobs.start(
        description, int(seeds), lambda progress: explorer.train(label, model, on_epoch=progress, **options)
    )


def training_result(job: TrainingJob) -> tuple[str, pd.DataFrame]:
    """The Train tab's text (status, then the report) and its table of held-out scores next to the baselines."""
    text = escape(job.status(), 600)
    if job.report is None:
        return text, pd.DataFrame([], columns=TRAIN_COLUMNS)
    lines = [text, *(f"- {escape(line, 300)}" for line in job.report.lines(folder=False))]
    rows = [
        [f"LoL model: {metric} (mean of seeds)", round(float(sum(v) / len(v)), 4)]
        for metric, v in job.report.test.items()
        if metric != "loss"
    ]
    rows += [[f"baseline: {name}", round(value, 4)] for name, value in job.report.baselines.items()]
    return "\n\n".join(lines), pd.DataFrame(rows, columns=TRAIN_COLUMNS)
