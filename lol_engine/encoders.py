"""Encoders: what turns a LoRA into a vector (and, for a predictor's encoder, into an estimate too).

An :class:`Encoder` has a ``name`` (its embeddings are stored and mapped under it), says which LoRAs it
:meth:`~Encoder.accepts`, and encodes many at once. Two kinds exist today:

- :class:`FingerprintEncoder` (``fingerprint``): the architecture-agnostic GL(r)-invariant fingerprint
  (:mod:`lol_engine.fingerprint`); it accepts every LoRA;
- :class:`PredictorEncoder` (``lol:<predictor>``): a trained predictor's LoL embedding (its head's hidden features);
  it accepts the LoRAs whose module spec fits the predictor, and the same forward gives the predictor's
  :class:`~lol_engine.estimate.Estimate`.

:func:`encode_many` runs a set of encoders over LoRAs (one batched forward per encoder) and returns, per LoRA, an
:class:`Encoded`: what the store keeps and the app shows. :func:`load_predictors` reads predictor folders (by default
the ones shipped inside the package).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from lol_engine.estimate import Estimate
from lol_engine.lora.weights import LoraWeights
from lol_engine.sketch import DeltaSketchEncoder

if TYPE_CHECKING:
    from lol_engine.train.checkpoint import Predictor

__all__ = [
    "FINGERPRINT",
    "LOL_PREFIX",
    "Encoded",
    "Encoder",
    "FingerprintEncoder",
    "PredictorEncoder",
    "encode",
    "encode_many",
    "encoders_for",
    "load_predictors",
    "map_title",
]

FINGERPRINT = "fingerprint"  # encoder name of the architecture-agnostic invariant fingerprint
LOL_PREFIX = "lol:"  # encoder name prefix of a predictor's LoL embedding


@runtime_checkable
class Encoder(Protocol):
    """Turns LoRAs into vectors of one fixed length."""

    @property
    def name(self) -> str:
        """The name its embeddings and map are stored under."""
        ...

    def accepts(self, lora: LoraWeights) -> bool:
        """Whether this encoder can encode ``lora``."""
        ...

    def encode_many(self, loras: Sequence[LoraWeights]) -> list[np.ndarray]:
        """One float vector per LoRA (every one must be accepted)."""
        ...


class FingerprintEncoder:
    """The GL(r)-invariant fingerprint of any LoRA (:func:`lol_engine.fingerprint.fingerprint`)."""

    name = FINGERPRINT

    def accepts(self, lora: LoraWeights) -> bool:
        """Every LoRA has a fingerprint."""
        return True

    def encode_many(self, loras: Sequence[LoraWeights]) -> list[np.ndarray]:
        """The fingerprint of each LoRA."""
        from lol_engine.fingerprint import fingerprints

        return [f.numpy() for f in fingerprints(loras)]


class PredictorEncoder:
    """A predictor's LoL embedding, named ``lol:<predictor>``; :meth:`estimate_many` also gives its estimates."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.name = f"{LOL_PREFIX}{predictor.name}"

    def accepts(self, lora: LoraWeights) -> bool:
        """Whether the LoRA has the predictor's modules (and rank, unless the model is rank-agnostic)."""
        return self.predictor.fits(lora)

    def encode_many(self, loras: Sequence[LoraWeights]) -> list[np.ndarray]:
        """The embedding of each LoRA."""
        return [vector for vector, _ in self.estimate_many(loras)]

    def estimate_many(self, loras: Sequence[LoraWeights]) -> list[tuple[np.ndarray, Estimate]]:
        """Embedding and estimate of each LoRA from one batched forward."""
        return [(v.numpy(), e) for e, v in self.predictor.predict_and_embed_many(loras)]


@dataclass
class Encoded:
    """What the encoders made of one LoRA: ``{encoder: vector}`` and ``{predictor: estimate}``."""

    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    estimates: dict[str, Estimate] = field(default_factory=dict)


def encoders_for(predictors: Mapping[str, Predictor] | Iterable[Predictor]) -> list[Encoder]:
    """The fingerprint and ΔW-sketch encoders (:mod:`lol_engine.sketch`: the candidates of a large collection's
    ΔW-cosine neighbours), then one :class:`PredictorEncoder` per predictor."""
    values = predictors.values() if isinstance(predictors, Mapping) else predictors
    return [FingerprintEncoder(), DeltaSketchEncoder(), *(PredictorEncoder(p) for p in values)]


def encode_many(loras: Sequence[LoraWeights], encoders: Sequence[Encoder]) -> list[Encoded]:
    """Every encoder over the LoRAs it accepts (one batched call each); those it does not accept are skipped."""
    out = [Encoded() for _ in loras]
    for encoder in encoders:
        members = [i for i, lora in enumerate(loras) if encoder.accepts(lora)]
        if not members:
            continue
        chosen = [loras[i] for i in members]
        if isinstance(encoder, PredictorEncoder):
            for i, (vector, estimate) in zip(members, encoder.estimate_many(chosen), strict=True):
                out[i].embeddings[encoder.name] = vector
                out[i].estimates[encoder.predictor.name] = estimate
        else:
            for i, vector in zip(members, encoder.encode_many(chosen), strict=True):
                out[i].embeddings[encoder.name] = vector
    return out


def encode(lora: LoraWeights, encoders: Sequence[Encoder]) -> Encoded:
    """:func:`encode_many` for one LoRA."""
    return encode_many([lora], encoders)[0]


def load_predictors(folder: str | os.PathLike[str] | None = None) -> dict[str, Predictor]:
    """``{name: Predictor}`` for every predictor folder under ``folder`` (default: the shipped predictors)."""
    from lol_engine.settings import PREDICTORS_DIR
    from lol_engine.train.checkpoint import load_predictor

    root = Path(folder) if folder is not None else PREDICTORS_DIR
    if not root.is_dir():
        return {}
    return {p.parent.name: load_predictor(p.parent) for p in sorted(root.glob("*/config.json"))}


def map_title(encoder: str) -> str:
    """How a map of ``encoder`` is named in the app."""
    if encoder == FINGERPRINT:
        return "fingerprint (every LoRA, any base)"
    return f"LoL encoder of {encoder.removeprefix(LOL_PREFIX)}"
