"""Real datasets that arrive offline through packages, found through documented paths or settings.

* Fashion-MNIST: Debian package ``dataset-fashion-mnist`` (MIT, Zalando SE), in ``/usr/share/datasets/fashion-mnist``
  or ``$LOL_FASHION_MNIST_DIR``.
* WordNet 3.0 nouns: Debian package ``wordnet-base`` (WordNet 3.0 licence, Princeton University), in
  ``/usr/share/wordnet`` or ``$LOL_WORDNET_DIR``.

The folders come from :mod:`lol_engine.settings`.
* scikit-learn's digits ship inside the scikit-learn wheel.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lol_engine.errors import NotFoundError
from lol_engine.settings import settings

__all__ = ["DataSourceError", "NounSynset", "fashion_mnist", "wordnet_nouns"]

FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# The 45 lexicographer files of WordNet 3.0, in index order (the Debian package ships no lexnames file).
LEXNAMES = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)


class DataSourceError(NotFoundError, FileNotFoundError):
    """A dataset the recipe needs is not installed; the message says how to get it."""


def _locate(env: str, folder: Path, package: str, files: tuple[str, ...]) -> Path:
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataSourceError(
            f"{missing[0]} not found in {folder}: install the Debian package {package} "
            f"(apt-get install {package}) or point ${env} at a folder that holds it"
        )
    return folder


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    if int.from_bytes(raw[:4], "big") != magic:
        raise DataSourceError(f"{path}: not an IDX file with magic {magic}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataSourceError(f"{path}: holds {data.size} values, its header says {dims}")
    return data.reshape(dims)


def fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels uint8 (N,))`` of Fashion-MNIST's ``train`` (60k) or ``test`` (10k)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    files = (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
    folder = _locate("LOL_FASHION_MNIST_DIR", settings().fashion_mnist_dir, "dataset-fashion-mnist", files)
    return _read_idx(folder / files[0], 2051, 3), _read_idx(folder / files[1], 2049, 1)


@dataclass(frozen=True)
class NounSynset:
    offset: int
    lexname: str  # e.g. "noun.animal"
    lemmas: tuple[str, ...]
    gloss: str


def wordnet_nouns() -> list[NounSynset]:
    """Every noun synset of WordNet 3.0 (82,115), from ``data.noun`` (read as latin-1)."""
    folder = _locate("LOL_WORDNET_DIR", settings().wordnet_dir, "wordnet-base", ("data.noun",))
    out = []
    for line in (folder / "data.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith("  ") or " | " not in line:
            continue  # licence header
        head, gloss = line.split(" | ", 1)
        fields = head.split()
        n_words = int(fields[3], 16)
        lemmas = tuple(fields[4 + 2 * i].replace("_", " ") for i in range(n_words))
        out.append(NounSynset(int(fields[0]), LEXNAMES[int(fields[1])], lemmas, gloss.strip()))
    return out
