"""Which file is the LoRA: one answer for a file, an adapter folder, a Hub snapshot or a folder tree.

Known adapter files name their folder's one LoRA: PEFT's ``adapter_model.safetensors``, diffusers'
``pytorch_lora_weights.safetensors`` and mlx-lm's ``adapters.safetensors`` (beside its numbered checkpoints).
Any other ``.safetensors`` file is a LoRA of its own. Pickled adapters (``adapter_model.bin``) and mlx-lm's old
``adapters.npz`` are never opened; a folder holding only those is refused with what they are.

Nothing here opens a file: it only looks at names. The readers in :mod:`lol_engine.lora.parse` check the bytes.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lol_engine.errors import LoraFormatError

__all__ = ["LoraLocation", "display_name", "find_loras", "locate_lora", "path_kind", "scan_tree"]

_ADAPTER_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors", "adapters.safetensors")
"""File names that stand for their folder's one LoRA, in order of preference."""

_PICKLE = "a pickle, never loaded (unpickling runs arbitrary code)"
_UNREAD_ADAPTERS = {  # adapter files in formats that are never opened, and what they are
    "adapter_model.bin": _PICKLE,
    "pytorch_lora_weights.bin": _PICKLE,
    "adapters.npz": "a NumPy archive (mlx-lm's format before safetensors), not read",
}
_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class LoraLocation:
    """One LoRA on disk: the file to read, its ``adapter_config.json`` and the name to show for it."""

    weights: Path  # the .safetensors file to read
    config: Path | None  # the adapter_config.json beside it (PEFT, mlx-lm), if there is one
    name: str  # display name: the folder's name for a known adapter file, else the file stem


def display_name(weights: str | os.PathLike[str]) -> str:
    """The name to show for a LoRA file: its folder's name for a known adapter file, else the file's stem.

    >>> display_name("runs/digits-r4/adapter_model.safetensors"), display_name("loras/pixel_art.safetensors")
    ('digits-r4', 'pixel_art')
    """
    text = os.fspath(weights)
    name = os.path.basename(text)
    if not name or name in (".", ".."):  # a trailing separator or a dot: Path's own normalisation decides
        name = Path(text).name
    if name in _ADAPTER_FILES:
        # abspath, not resolve: Hub snapshot files are symlinks
        folder = os.path.basename(os.path.dirname(os.path.abspath(text)))
        if folder:
            return folder
    dot = name.rfind(".")
    return name[:dot] if 0 < dot < len(name) - 1 else name  # Path.stem


def locate_lora(path: str | os.PathLike[str]) -> LoraLocation:
    """The LoRA named by ``path``: a file, or a folder holding one LoRA.

    In a folder, a known adapter file wins; else the folder's one ``.safetensors`` file; else, when the folder has
    none at its top, the one LoRA in its subfolders (a Hub snapshot). Raises :class:`LoraFormatError` for a missing
    path, a folder without a ``.safetensors`` adapter (naming a pickled or ``.npz`` adapter found instead), and a
    folder with several candidates.
    """
    path = Path(path)
    kind = path_kind(path)
    if kind is None:
        raise LoraFormatError(f"{path.name}: no such file or folder")
    if kind == "file":
        return _location(path)
    known = _known_adapter(path)
    if known is not None:
        return _location(known)
    files = sorted(f for f in path.glob("*.safetensors") if f.is_file())
    found = [_location(f) for f in files] if files else find_loras(path)
    if len(found) > 1:
        raise LoraFormatError(f"{path.name}: folder has {len(found)} .safetensors files; name the one you mean")
    if not found:
        raise LoraFormatError(f"{path.name}: folder holds no .safetensors adapter{_unread_hint(path)}")
    return found[0]


def path_kind(path: str | os.PathLike[str]) -> Literal["folder", "file"] | None:
    """``"folder"``, ``"file"`` (anything else that is there) or None (nothing there), from one ``stat``."""
    try:
        return "folder" if stat.S_ISDIR(os.stat(path).st_mode) else "file"
    except (OSError, ValueError):  # as Path.exists: missing, unreadable, or a name the system refuses
        return None


def find_loras(root: str | os.PathLike[str]) -> list[LoraLocation]:
    """Every LoRA under ``root``, sorted by path (the same list whatever order the disk lists files in).

    A folder holding a known adapter file (PEFT, diffusers, mlx-lm) is one LoRA, read from that file; its other
    ``.safetensors`` files (mlx-lm's numbered checkpoints) are not counted. Every other ``.safetensors`` file is one
    LoRA. ``root`` may also be a single file. Raises :class:`LoraFormatError` if ``root`` does not exist.
    """
    return scan_tree(root)[0]


def scan_tree(root: str | os.PathLike[str], marked_by: tuple[str, ...] = ()) -> tuple[list[LoraLocation], list[Path]]:
    """:func:`find_loras`, and the folders under ``root`` that hold a file of every name in ``marked_by`` (a built
    zoo's ``manifest.parquet`` and ``zoo.json``), sorted: both from one walk of the tree.

    Links to folders are not followed (as :meth:`pathlib.Path.rglob`); links to files are read.
    """
    root = Path(root)
    kind = path_kind(root)
    if kind is None:
        raise LoraFormatError(f"{root.name}: no such file or folder")
    if kind == "file":
        return [_location(root)], []
    out: list[LoraLocation] = []
    marked: list[Path] = []
    folders = [os.fspath(root)]
    while folders:  # os.scandir's entries know their type: no stat per name (os.walk + isfile made 1–3)
        top = folders.pop()
        try:
            with os.scandir(top) as listing:
                entries = list(listing)
        except OSError:  # unreadable or gone: skipped, as os.walk does
            continue
        files = set()
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                folders.append(entry.path)
            elif entry.is_file():  # a link to a file counts; a link to a folder is neither
                files.add(entry.name)
        folder = Path(top)
        if marked_by and all(n in files for n in marked_by):
            marked.append(folder)
        weights = [n for n in files if n.endswith(".safetensors")]
        if not weights:
            continue
        known = next((n for n in _ADAPTER_FILES if n in files), None)  # the folder's one LoRA, if it has one
        config = folder / _CONFIG if _CONFIG in files else None
        out += [LoraLocation(folder / n, config, display_name(folder / n)) for n in weights if known in (None, n)]
    return sorted(out, key=lambda loc: loc.weights), sorted(marked)


def _known_adapter(folder: Path) -> Path | None:
    """The folder's known adapter file, the first of :data:`_ADAPTER_FILES` present; ``None`` if it has none."""
    text = os.fspath(folder)
    return next((folder / name for name in _ADAPTER_FILES if os.path.isfile(os.path.join(text, name))), None)


def _location(weights: Path) -> LoraLocation:
    """A LoRA file with the ``adapter_config.json`` beside it (whatever the file's name: mlx-lm's numbered
    checkpoints take their scale from the folder's config) and its display name."""
    config = weights.parent / _CONFIG
    return LoraLocation(weights, config if os.path.isfile(config) else None, display_name(weights))


def _unread_hint(folder: Path) -> str:
    """``"; adapter_model.bin is a pickle, …"`` for the first never-read adapter file under ``folder``, else ``""``."""
    for name, what in _UNREAD_ADAPTERS.items():
        if (folder / name).exists():
            return f"; {name} is {what}"
    for name, what in _UNREAD_ADAPTERS.items():
        nested = sorted(folder.rglob(name))
        if nested:
            return f"; {nested[0].relative_to(folder)} is {what}"
    return ""
