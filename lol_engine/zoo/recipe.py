"""What a zoo recipe is (a base model, data, a sampler of per-LoRA choices, a trainer and a labeller), and the
per-LoRA seed and train/val/cal/test split every recipe shares.

The four splits each have one job: ``train`` fits the weights, ``val`` early-stops and chooses models, ``cal`` fits
the conformal ranges (:mod:`lol_engine.train.calibrate`) and ``test`` only reports. Calibrating on the split that
chose the epoch and the seed breaks the exchangeability conformal coverage rests on (the chosen model is the one
whose errors happen to be small there), so ``cal`` is kept apart from ``val``.

LoRAs that share a group (e.g. fashion-gen LoRAs trained on the same identity, see :meth:`Recipe.group`) fall in
one split together: a test LoRA whose identity a training LoRA shares measures recall, not generalization.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from lol_engine.errors import BadRequestError
from lol_engine.glossary import LabelDescription

__all__ = [
    "SPLITS",
    "Recipe",
    "ZooSettings",
    "group_split",
    "key_uniform",
    "lora_seed",
    "quota_splits",
    "split_at",
    "split_of",
]

# Ordered so that ``test`` is the top 10 % of the draw, as before ``cal`` existed (80 / 10 / 10 train/val/test):
# a LoRA's per-LoRA draw puts it in the same test split as then; ``val`` now takes [.7, .8) and ``cal`` [.8, .9).
SPLITS = (("train", 0.7), ("val", 0.1), ("cal", 0.1), ("test", 0.1))


@dataclass(frozen=True)
class ZooSettings:
    """Everything that decides a zoo's content. Two builds with equal settings on one machine give equal zoos.

    On another CPU (other float kernels) the files differ within tolerances; see ``tests/test_shipped_zoo.py``.
    """

    n: int | None = field(default=None, metadata={"help": "number of LoRAs; None = the recipe's default"})
    seed: int = field(default=0, metadata={"help": "the zoo seed; every LoRA derives its own from (seed, index)"})
    ranks: tuple[int, ...] = field(default=(4,), metadata={"help": "ranks to draw each LoRA's rank from"})
    base_variant: int = field(default=0, metadata={"help": "0: the base; 1: the base after continued pretraining"})
    threads: int = field(default=1, metadata={"help": "torch threads per worker (recorded: results depend on it)"})
    toy: bool = field(default=False, metadata={"help": "tiny data and short training, for tests"})

    def __post_init__(self) -> None:
        if self.n is not None and self.n < 1:
            raise BadRequestError(f"n must be positive, got {self.n}")
        if not self.ranks or min(self.ranks) < 1:
            raise BadRequestError(f"ranks must be positive integers, got {self.ranks}")
        if self.base_variant not in (0, 1):
            raise BadRequestError(f"base_variant must be 0 or 1, got {self.base_variant}")
        if self.threads < 1:
            raise BadRequestError(f"threads must be >= 1, got {self.threads}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored in ``zoo.json``."""
        out = asdict(self)
        out["ranks"] = list(self.ranks)
        return out


def lora_seed(zoo_seed: int, index: int) -> int:
    """The seed of LoRA ``index``: independent streams per LoRA, whatever the worker count."""
    return int(np.random.SeedSequence([zoo_seed, index]).generate_state(1)[0])


def split_of(zoo_seed: int, index: int, group: str | None = None) -> str:
    """train / val / cal / test (70 / 10 / 10 / 10), fixed per (seed, index) and independent of every label.

    With a ``group`` the split is :func:`group_split` of it (every LoRA of the group together); without one, the
    LoRA's own draw from ``(seed, index)``.
    """
    if group is not None:
        return group_split(zoo_seed, group)
    return split_at(np.random.default_rng([zoo_seed, index, 7]).random())


def group_split(seed: int, key: str) -> str:
    """The split of every LoRA whose group is ``key``: :func:`key_uniform` cut at the shares of :data:`SPLITS`."""
    return split_at(key_uniform(seed, key))


def key_uniform(seed: int, key: str) -> float:
    """A uniform in [0, 1) fixed per ``(seed, key)``: the first 8 bytes of sha256 of ``"seed:key"``."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64


def quota_splits(seed: int, keys: Iterable[str]) -> dict[str, str]:
    """The split of each distinct key when the splits must take their shares of a small set exactly.

    A stored collection has tens of labelled LoRAs, not thousands: independent draws (:func:`group_split`) leave a
    split of 60 empty now and then. Here the keys are ordered by :func:`key_uniform` (ties by key) and cut into runs
    of the sizes the shares give by largest remainder (ties in the order of :data:`SPLITS`): 60 keys are always
    42 / 6 / 6 / 6, the same keys give the same splits whatever their order, and which key lands where is as random
    as the draws.
    """
    unique = sorted(set(keys), key=lambda k: (key_uniform(seed, k), k))
    n = len(unique)
    exact = [Fraction(str(share)) * n for _, share in SPLITS]
    sizes = [int(e) for e in exact]  # floors of non-negative fractions
    by_remainder = sorted(range(len(SPLITS)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    out, start = {}, 0
    for (name, _), size in zip(SPLITS, sizes, strict=True):
        out.update(dict.fromkeys(unique[start : start + size], name))
        start += size
    return out


def split_at(u: float) -> str:
    """The split a uniform draw ``u`` in [0, 1) falls in, by the shares of :data:`SPLITS`."""
    edge = 0.0
    for name, share in SPLITS:
        edge += share
        if u < edge:
            return name
    return SPLITS[-1][0]


class Recipe(ABC):
    """One kind of zoo. Subclasses are registered with :func:`lol_engine.zoo.register_recipe`.

    The contract that keeps labels honest:

    * :meth:`sample` draws hyperparameters and data choices from ``rng`` alone, never from labels;
    * :meth:`train_and_label` trains with ``peft``, saves with ``save_pretrained``, and computes labels only from the
      recipe's own choices or by running the adapted model on data that no LoRA trained on.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    version: ClassVar[str] = "1"
    # What people read beside a predictor of this zoo (lol_engine.glossary): the one source of every label's meaning,
    # per label (the manifest column without ``y_``).
    label_descriptions: ClassVar[Mapping[str, LabelDescription]] = MappingProxyType({})
    base_title: ClassVar[str] = ""  # the base model, as people name it
    base_family: ClassVar[str] = ""  # the base family its LoRAs record (``lol.base_family``)
    data_title: ClassVar[str] = ""  # the data its LoRAs were trained on

    @abstractmethod
    def default_n(self, settings: ZooSettings) -> int:
        """How many LoRAs a zoo has when ``settings.n`` is None."""

    @abstractmethod
    def prepare(self, base_dir: Path, settings: ZooSettings) -> Any:
        """Load data and build (or load from ``base_dir``) the base model; return the context jobs need.

        Must be deterministic, and cheap the second time: workers call it again on the cached files.
        """

    def base_identity(self, context: Any) -> tuple[str, str]:
        """``(base model name, sha256 of its weights)``; contexts carry ``base_name`` and ``base_sha256``."""
        return context.base_name, context.base_sha256

    def provenance(self, context: Any, seed: int, base_family: str) -> dict[str, object]:
        """What every zoo LoRA records in its safetensors ``__metadata__`` (as ``lol.*`` keys)."""
        name, sha = self.base_identity(context)
        return {
            "zoo": self.name,
            "recipe_version": self.version,
            "seed": seed,
            "base": name,
            "base_sha256": sha,
            "base_family": base_family,
        }

    @abstractmethod
    def sample(self, context: Any, index: int, rng: np.random.Generator, settings: ZooSettings) -> dict[str, Any]:
        """Hyperparameters and data choices of LoRA ``index`` (JSON-ready values), drawn from ``rng`` only.

        ``context`` gives what the choices range over (e.g. the number of identities), never labels.
        """

    def group(self, choices: dict[str, Any]) -> str | None:
        """The group of a LoRA with these choices, kept whole in one split; None: the LoRA is its own group.

        A recipe that draws a shared source (an identity, a dataset) with replacement must return it here, or test
        LoRAs share their source with training LoRAs.
        """
        return None

    @abstractmethod
    def train_and_label(self, context: Any, choices: dict[str, Any], seed: int, out_dir: Path) -> dict[str, Any]:
        """Train LoRA, ``save_pretrained`` it into ``out_dir``, return its labels (JSON-ready values).

        Keys starting with ``t_`` are timings (seconds), stored in the manifest as they are, not as labels.
        """
