"""A LoRA's card: what a Civitai model page, a Hugging Face model card or lora-inspector shows, as one typed object.

One :class:`Card` for an upload and for a stored LoRA alike, built by :func:`build_card` from the file's facts
(:func:`lol_engine.report.card_facts`: from a fresh report, or as the store kept them) and what the collection knows
(where it is stored, its labels and estimates). The app renders it to Markdown (``app.handlers.render_card``, which
escapes every text: all of it comes from files and users); :meth:`Card.to_dict` is its strict-JSON form for the API.

Names (:func:`lora_name`): a LoRA is named by the user, else by its Hub repo id, else by its folder (for a known
adapter file such as PEFT's ``adapter_model.safetensors``; the ``adapter_config.json``'s folder first) or its file's
stem, unless that name is a temporary folder's (an upload's hash) or an adapter file's own name; then by its metadata
(``modelspec.title``, ``ss_output_name``), else by its base model and the start of its sha256.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lol_engine.errors import BadRequestError
from lol_engine.estimate import Estimate
from lol_engine.lora.metadata import training_parameters
from lol_engine.lora.weights import LoraMetadata
from lol_engine.report import card_facts

__all__ = [
    "MAX_NAME_CHARS",
    "Block",
    "Card",
    "Hashes",
    "Parameter",
    "Prediction",
    "Tag",
    "build_card",
    "check_name",
    "lora_name",
    "report_metadata",
]

MAX_NAME_CHARS = 100


@dataclass(frozen=True)
class Tag:
    """A training tag (kohya ``ss_tag_frequency``, dataset folders merged) and how many captions held it."""

    tag: str
    count: int


@dataclass(frozen=True)
class Parameter:
    """One training parameter: the metadata key, a readable name, its value as text and what it means."""

    key: str
    name: str
    value: str
    meaning: str


@dataclass(frozen=True)
class Block:
    """‖ΔW‖_F of one block (UNet down/mid/up block, text-encoder or LLM layer): √(Σ ‖ΔW‖_F²) of its modules."""

    block: str
    n_modules: int
    delta_fro_norm: float


@dataclass(frozen=True)
class Hashes:
    """What a LoRA is looked up by: SHA-256 of the file, AutoV2 (its first 10 hex digits), the kohya/A1111 LoRA hash
    (SHA-256 of the bytes after the safetensors header; A1111 shows 12 digits) and kohya's own ``sshs_model_hash``."""

    sha256: str
    autov2: str | None = None
    addnet_sha256: str | None = None
    addnet_shorthash: str | None = None
    sshs_model_hash: str | None = None
    sshs_model_hash_matches: bool | None = None


@dataclass(frozen=True)
class Prediction:
    """One predictor's estimate, as a table cell (:attr:`lol_engine.estimate.Estimate.summary`)."""

    predictor: str
    summary: float | int | str
    in_sample: bool = False


@dataclass(frozen=True)
class Card:
    """Everything a LoRA's card shows. Every text field is untrusted (a file's or a user's): escape it to show it."""

    name: str
    format: str
    base_family: str
    evidence: tuple[str, ...]
    dtype: str
    n_modules: int
    ranks: tuple[int, ...]
    scales: tuple[float, ...]  # (smallest, largest) scale of its modules; () when none is known
    size_bytes: int
    is_dora: bool
    total_delta_fro_norm: float | None
    hashes: Hashes
    output_name: str | None = None  # kohya ss_output_name
    trigger_phrase: str | None = None  # modelspec.trigger_phrase
    top_tags: tuple[Tag, ...] = ()  # most frequent first
    n_tags: int = 0  # distinct tags in all
    training_parameters: tuple[Parameter, ...] = ()
    block_strength: tuple[Block, ...] = ()  # in depth order: text encoders, down, mid, up, layers
    n_blocks: int = 0  # blocks in all (block_strength keeps at most lol_engine.report.MAX_BLOCKS)
    other_metadata: tuple[tuple[str, str], ...] = ()  # (key, value) of ss_*, modelspec.*, adapter_config fields
    collection: str | None = None  # where it is stored ("uploads" for an added upload); None: not stored
    stored_as: str | None = None  # an upload already stored: its stored name
    labels: Mapping[str, Any] = field(default_factory=dict)  # besides those read from the file's own metadata
    predictions: tuple[Prediction, ...] = ()
    n_predictors: int | None = None  # for an analysed upload: how many predictors there are (predictions: the fit)
    seconds: float | None = None  # for an analysed upload: how long the analysis took
    warnings: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        """The LoRA's identity in a collection: its file's sha256."""
        return self.hashes.sha256

    def to_dict(self) -> dict[str, Any]:
        """The card as strict JSON (lists, not tuples; no NaN), for the API and ``--json`` output."""
        data = asdict(self)
        data["other_metadata"] = [{"key": k, "value": v} for k, v in self.other_metadata]
        data["labels"] = dict(self.labels)
        data["id"] = self.id
        return dict(json.loads(json.dumps(data, allow_nan=False, default=str)))


def _file_values(facts: Mapping[str, Any]) -> dict[str, Any]:
    """What the card shows of the labels that ingest reads from the file's metadata
    (:func:`lol_engine.labels.metadata_labels`): ``{label: the card's text of it}``, ``tags``: the top tags."""
    shown = {p["key"]: p["value"] for p in facts["training_parameters"]}
    out: dict[str, Any] = {key if key.startswith("ss_") else f"peft.{key}": value for key, value in shown.items()}
    out |= {m["key"]: m["value"] for m in facts["other_metadata"] if m["key"].startswith("modelspec.")}
    out["tags"] = [t["tag"] for t in facts["trigger_words"]["top_tags"]]
    return out


def _same(value: Any, shown: Any) -> bool:
    """Whether a stored label holds what the card shows already (a list of names: in any order)."""
    if isinstance(shown, list):
        return value == shown
    if isinstance(value, list):
        try:
            listed = json.loads(shown)
        except ValueError:  # shortened on the card: not the same text
            return False
        return isinstance(listed, list) and sorted(map(str, listed)) == sorted(map(str, value))
    return str(value) == shown


def _new_labels(facts: Mapping[str, Any], labels: Mapping[str, Any]) -> dict[str, Any]:
    """The labels that say something the card does not show already (a table's label that differs from the file's
    value is kept)."""
    shown = _file_values(facts)
    return {key: value for key, value in labels.items() if key not in shown or not _same(value, shown[key])}


def _parameters(rows: Sequence[Mapping[str, str]]) -> tuple[Parameter, ...]:
    """The parameters table, named and explained (:func:`lol_engine.lora.metadata.training_parameters`) from the
    kept ``{"key", "value"}`` rows: kohya's ``ss_*`` fields, then the PEFT config's, each in its table's order."""
    kohya = {r["key"]: r["value"] for r in rows if r["key"].startswith("ss_")}
    config = {r["key"]: r["value"] for r in rows if not r["key"].startswith("ss_")}
    return tuple(Parameter(**row) for row in training_parameters(kohya, config))


def build_card(
    facts: Mapping[str, Any],
    *,
    name: str,
    collection: str | None = None,
    stored_as: str | None = None,
    labels: Mapping[str, Any] | None = None,
    estimates: Mapping[str, Estimate] | None = None,
    n_predictors: int | None = None,
    seconds: float | None = None,
) -> Card:
    """A LoRA's card from its file's facts (a :func:`lol_engine.report.describe` report, or the
    :func:`~lol_engine.report.card_facts` the store kept) and what the collection knows about it.

    ``labels``: the stored labels; those the card shows already from the file's metadata (its top tags, the tabled
    ``ss_*`` and PEFT fields, ``modelspec.*``) are left out when they hold the file's value.
    """
    facts = card_facts(facts)
    words = facts["trigger_words"]
    return Card(
        name=name,
        format=facts["format"],
        base_family=facts["base_family"],
        evidence=tuple(facts["evidence"]),
        dtype=facts["dtype"],
        n_modules=facts["n_modules"],
        ranks=tuple(facts["ranks"]),
        scales=tuple(facts["scales"]),
        size_bytes=facts["size_bytes"],
        is_dora=facts["is_dora"],
        total_delta_fro_norm=facts["total_delta_fro_norm"],
        hashes=Hashes(
            sha256=str(facts["sha256"] or ""),
            autov2=facts["autov2"],
            addnet_sha256=facts["addnet_sha256"],
            addnet_shorthash=facts["addnet_shorthash"],
            sshs_model_hash=facts["sshs_model_hash"],
            sshs_model_hash_matches=facts["sshs_model_hash_matches"],
        ),
        output_name=words["output_name"],
        trigger_phrase=words["trigger_phrase"],
        top_tags=tuple(Tag(t["tag"], t["count"]) for t in words["top_tags"]),
        n_tags=words["n_tags"],
        training_parameters=_parameters(facts["training_parameters"]),
        block_strength=tuple(Block(**b) for b in facts["block_strength"]),
        n_blocks=facts["n_blocks"],
        other_metadata=tuple((m["key"], m["value"]) for m in facts["other_metadata"]),
        collection=collection,
        stored_as=stored_as,
        labels=_new_labels(facts, labels or {}),
        predictions=tuple(
            Prediction(predictor, e.summary, e.in_sample) for predictor, e in sorted((estimates or {}).items())
        ),
        n_predictors=n_predictors,
        seconds=seconds,
        warnings=tuple(facts["warnings"]),
    )


# ------------------------------------------------------------------------------------------------------------ names
_ADAPTER_STEMS = ("adapter_model", "pytorch_lora_weights", "adapters")  # PEFT, diffusers, mlx-lm adapter files
# Folder names that say nothing: an upload's hash (Gradio: sha256 hex; held uploads: 32 hex), temp folders.
_MEANINGLESS = re.compile(r"^(?:[0-9a-fA-F]{16,}|tmp[\w-]*|gradio|\.held|uploads?|snapshots|)$")
_NAME = re.compile(r"^[\w][\w .,+()'&@#~=-]*$")


def check_name(text: str) -> str:
    """A name a user typed, stripped and checked: 1–100 characters, letters, digits, spaces and ``.,+()'&@#~=-_``.

    Raises :class:`~lol_engine.errors.BadRequestError` naming the rule it breaks.
    """
    name = " ".join(unicodedata.normalize("NFC", text).split())
    if not name:
        raise BadRequestError("the name is empty")
    if len(name) > MAX_NAME_CHARS:
        raise BadRequestError(f"the name has {len(name)} characters; at most {MAX_NAME_CHARS} are allowed")
    if not _NAME.fullmatch(name[0]):
        raise BadRequestError(f"the name starts with {name[0]!r}: start it with a letter or digit")
    bad = next((c for c in name if not _NAME.fullmatch("a" + c)), None)
    if bad is not None:
        raise BadRequestError(
            f"the name may not hold {bad!r}: use letters, digits, spaces and . , + ( ) ' & @ # ~ = - _"
        )
    return name


def _meaningful(text: str) -> bool:
    return not _MEANINGLESS.fullmatch(text) and text not in _ADAPTER_STEMS


def _from_metadata(meta: LoraMetadata | None) -> str | None:
    """A name the file gives itself: ``modelspec.title``, else kohya's ``ss_output_name``, cut to what a typed name
    may hold (:func:`check_name`'s characters, one line, at most 100 characters)."""
    if meta is None:
        return None
    for value in (meta.modelspec.get("title"), meta.kohya.get("ss_output_name")):
        if isinstance(value, str):
            kept = "".join(c if _NAME.fullmatch("a" + c) else " " for c in value[: 4 * MAX_NAME_CHARS])
            text = " ".join(kept.split()).lstrip(" .,+()'&@#~=-")[:MAX_NAME_CHARS].strip()
            if text and _meaningful(text):
                return text
    return None


def report_metadata(report: Mapping[str, Any]) -> LoraMetadata:
    """What :func:`lora_name` reads of a file, from its :func:`lol_engine.report.describe` report."""
    return LoraMetadata(
        format=str(report.get("format", "unknown")),
        base_family=str(report.get("base_family", "unknown")),
        sha256=str(report.get("sha256") or ""),
        kohya=dict(report.get("kohya_metadata", {})),
        modelspec=dict(report.get("modelspec", {})),
        adapter_config=dict(report.get("adapter_config", {})),
    )


def lora_name(
    weights: str | Path,
    config: str | Path | None = None,
    meta: LoraMetadata | None = None,
    *,
    typed: str | None = None,
    repo_id: str | None = None,
) -> str:
    """The name a LoRA is shown and stored under (see the module): never ``adapter_model`` nor an upload's hash.

    ``typed`` (checked by :func:`check_name`) wins, then ``repo_id``, then the folder of a known adapter file (the
    config's folder first) or another file's stem, then the file's own metadata, then
    ``<base model>-lora-<sha256[:8]>`` (the PEFT config's ``base_model_name_or_path``, else the base family).
    """
    if typed and typed.strip():
        return check_name(typed)
    if repo_id:
        return repo_id
    path = Path(weights)
    if path.stem in _ADAPTER_STEMS:
        folders = [Path(config).absolute().parent.name] if config else []
        candidates = [*folders, path.absolute().parent.name]
    else:
        candidates = [path.stem]
    for candidate in candidates:
        if _meaningful(candidate):
            return candidate[:MAX_NAME_CHARS]
    named = _from_metadata(meta)
    if named:
        return named
    base = meta.adapter_config.get("base_model_name_or_path") if meta is not None else None
    stem = str(base).rstrip("/").rsplit("/", 1)[-1][:60] if isinstance(base, str) and base.strip() else None
    stem = stem or (
        meta.base_family if meta is not None and meta.base_family != "unknown" else meta.format if meta else ""
    )
    digest = meta.sha256[:8] if meta is not None and meta.sha256 else ""
    return "-".join(part for part in (stem or "", "lora", digest) if part)
