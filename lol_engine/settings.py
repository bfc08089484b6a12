"""Every setting in one place: read once from the environment, validated, documented in :data:`VARIABLES`.

>>> s = Settings.from_env({"LOL_DATA_DIR": "/srv/lol", "LOL_MAX_UPLOAD": "200mb", "LOL_DEVICE": "cuda:1"})
>>> (str(s.db_path), s.max_upload, s.device, s.host, s.port)
('/srv/lol/lol.duckdb', 209715200, 'cuda:1', '127.0.0.1', None)
>>> Settings.from_env({"LOL_DEVICE": "gpu"})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
lol_engine.errors.BadRequestError: LOL_DEVICE='gpu' is not a device: use cpu, cuda, cuda:N (N = 0, 1, …) or mps, ...

Data is found in three places:

- the shipped predictors travel inside the package (:data:`PREDICTORS_DIR`), so any install has them;
- the collection (``lol.duckdb``) and stored uploads live in the data folder ``LOL_DATA_DIR``;
- the default zoos (:data:`DEFAULT_ZOO_NAMES`, tens of MB, not in the wheel) are looked for in ``LOL_ZOO_DIR``, then
  ``<data folder>/zoo``, then the source checkout's ``data/zoo``; :data:`HOW_TO_GET_ZOOS` says what to do when none
  is found.

Nothing here imports torch, duckdb or gradio: :meth:`Settings.resolved_device` imports torch when called.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lol_engine.errors import BadRequestError

__all__ = [
    "DEFAULT_MAX_UPLOAD",
    "DEFAULT_ZOO_NAMES",
    "HOW_TO_GET_ZOOS",
    "PREDICTORS_DIR",
    "VARIABLES",
    "Settings",
    "Variable",
    "info_report",
    "parse_size",
    "settings",
    "settings_table",
    "shipped_predictors_info",
]

PACKAGE_DIR = Path(__file__).resolve().parent
PREDICTORS_DIR = PACKAGE_DIR / "predictors"  # package data: every wheel and install carries them
CHECKOUT_ZOO_DIR = PACKAGE_DIR.parent / "data" / "zoo"  # only in a source checkout (next to pyproject.toml)
DEFAULT_ZOO_NAMES = ("digits", "fashion-gen")
DEFAULT_MAX_UPLOAD = "1.5gb"
HOW_TO_GET_ZOOS = (
    "the default zoos (data/zoo/digits and data/zoo/fashion-gen, 2,023 LoRAs) come with the lol-explorer source "
    "repository, not with the package: clone it and set LOL_ZOO_DIR=<checkout>/data/zoo (or copy data/zoo into "
    "$LOL_DATA_DIR/zoo), or build a zoo with `lol zoo build digits --out DIR` and add it with `lol ingest DIR`"
)

_UNITS = {"b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb)?\s*$", re.IGNORECASE)
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Variable:
    """One environment variable: its name, the default as the README shows it, and what it sets."""

    name: str
    default: str
    meaning: str


VARIABLES: tuple[Variable, ...] = (
    Variable(
        "LOL_DATA_DIR",
        "`~/.cache/lol-explorer`",
        "the collection `lol.duckdb` and stored uploads (`uploads/<sha256>/`)",
    ),
    Variable(
        "LOL_ZOO_DIR",
        "`$LOL_DATA_DIR/zoo` if it holds zoos, else the checkout's `data/zoo`",
        "the default zoos (`digits/`, `fashion-gen/`) ingested into an empty collection; not in the package",
    ),
    Variable(
        "LOL_MAX_UPLOAD",
        "`1.5gb`",
        "per-file upload cap (1 gb = 2³⁰ bytes; a Flux LoRA at rank 128 is ~1.3 GB), for the server and the "
        "reader alike: a larger upload is refused with `413` from its `Content-Length`, before any of it is "
        "read",
    ),
    Variable(
        "LOL_DEVICE",
        "the accelerator torch sees (CUDA, MPS), else `cpu`",
        "where the LoL encoders run and predictors train (`lol train`, Train tab): `cpu`, `cuda`, `cuda:N` or `mps`",
    ),
    Variable("GRADIO_SERVER_NAME", "`127.0.0.1`", "the address the app binds (`0.0.0.0`: every interface)"),
    Variable("GRADIO_SERVER_PORT", "first free from 7860", "the app's port"),
    Variable(
        "GRADIO_TEMP_DIR",
        "the system temp folder",
        "where this run's private upload folder is made (and removed on stop)",
    ),
    Variable(
        "LOL_FASHION_MNIST_DIR",
        "`/usr/share/datasets/fashion-mnist`",
        "Fashion-MNIST for the zoo recipes (Debian `dataset-fashion-mnist`)",
    ),
    Variable("LOL_WORDNET_DIR", "`/usr/share/wordnet`", "WordNet 3.0 for the zoo recipes (Debian `wordnet-base`)"),
)


def parse_size(text: str | int) -> int:
    """Bytes in ``"1.5gb"``, ``"200mb"``, ``"512kb"`` or ``"1048576"`` (units as Gradio's: 1 kb = 1024 bytes).

    >>> parse_size("1.5gb"), parse_size("200 MB"), parse_size(7)
    (1610612736, 209715200, 7)
    """
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(text)
        if match is None:
            raise BadRequestError(
                f"not a size: {text!r} (a number of bytes with an optional unit b, kb, mb, gb or "
                "tb, e.g. 1.5gb, 200mb)"
            )
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])
    if size <= 0:
        raise BadRequestError(f"a size must be positive, got {text!r}")
    return size


@dataclass(frozen=True)
class Settings:
    """Every setting of the engine and the app; build it with :meth:`from_env` (or :func:`settings`)."""

    data_dir: Path  # LOL_DATA_DIR: holds lol.duckdb and uploads/
    device: str | None = None  # LOL_DEVICE: cpu, cuda, cuda:N, mps; None = the accelerator torch sees, else cpu
    max_upload: int = 3 * 2**29  # LOL_MAX_UPLOAD, in bytes
    host: str = "127.0.0.1"  # GRADIO_SERVER_NAME
    port: int | None = None  # GRADIO_SERVER_PORT; None = the first free port from 7860
    temp_dir: Path | None = None  # GRADIO_TEMP_DIR; None = the system temp folder
    zoo_dir: Path | None = None  # where the default zoos are; None = nowhere (see HOW_TO_GET_ZOOS)
    fashion_mnist_dir: Path = Path("/usr/share/datasets/fashion-mnist")  # LOL_FASHION_MNIST_DIR
    wordnet_dir: Path = Path("/usr/share/wordnet")  # LOL_WORDNET_DIR
    from_environment: frozenset[str] = field(default=frozenset())  # the variables that were set (not defaults)

    @property
    def db_path(self) -> Path:
        """The default collection: ``data_dir / "lol.duckdb"``."""
        return self.data_dir / "lol.duckdb"

    @property
    def uploads_dir(self) -> Path:
        """Where added uploads are stored: ``data_dir / "uploads"``."""
        return self.data_dir / "uploads"

    @property
    def default_zoos(self) -> tuple[Path, ...]:
        """The zoos of :data:`DEFAULT_ZOO_NAMES` found in :attr:`zoo_dir`; ``()`` if none."""
        return _zoos_in(self.zoo_dir) if self.zoo_dir is not None else ()

    @property
    def zoo_source(self) -> str | None:
        """Where :attr:`zoo_dir` came from: ``"LOL_ZOO_DIR"``, ``"data dir"``, ``"checkout"``, or ``None``."""
        if self.zoo_dir is None:
            return None
        if "LOL_ZOO_DIR" in self.from_environment:
            return "LOL_ZOO_DIR"
        return "data dir" if self.zoo_dir == self.data_dir / "zoo" else "checkout"

    def resolved_device(self) -> str:
        """:attr:`device`, or the accelerator torch sees (``torch.accelerator``), else ``cpu``; a device torch lacks
        is refused, naming how many of that kind it sees."""
        import torch

        accelerator = torch.accelerator.current_accelerator()
        if self.device is None:
            return accelerator.type if accelerator is not None else "cpu"
        wanted = torch.device(self.device)
        if wanted.type == "cpu":
            return self.device
        count = torch.accelerator.device_count() if accelerator is not None and accelerator.type == wanted.type else 0
        if (wanted.index or 0) >= count:
            raise BadRequestError(
                f"LOL_DEVICE={self.device!r}: torch sees {count} {wanted.type.upper()} device(s) here; use cpu, or "
                "leave LOL_DEVICE unset to use an accelerator only when there is one"
            )
        return self.device

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """The settings in ``environ``; an empty variable counts as unset, a bad value is a :class:`BadRequestError`
        naming the variable and what it accepts."""
        given = {v.name: environ[v.name].strip() for v in VARIABLES if environ.get(v.name, "").strip()}
        data_dir = _folder(given, "LOL_DATA_DIR") or Path.home() / ".cache" / "lol-explorer"
        return cls(
            data_dir=data_dir,
            device=_read(given, "LOL_DEVICE", _device, None),
            max_upload=_read(given, "LOL_MAX_UPLOAD", _max_upload, parse_size(DEFAULT_MAX_UPLOAD)),
            host=given.get("GRADIO_SERVER_NAME", "127.0.0.1"),
            port=_read(given, "GRADIO_SERVER_PORT", _port, None),
            temp_dir=_folder(given, "GRADIO_TEMP_DIR"),
            zoo_dir=_zoo_dir(given, data_dir),
            fashion_mnist_dir=_folder(given, "LOL_FASHION_MNIST_DIR") or Path("/usr/share/datasets/fashion-mnist"),
            wordnet_dir=_folder(given, "LOL_WORDNET_DIR") or Path("/usr/share/wordnet"),
            from_environment=frozenset(given),
        )


def settings() -> Settings:
    """The settings of the current environment (read anew on each call: tests and callers may change it)."""
    return Settings.from_env(os.environ)


def shipped_predictors_info(folder: Path = PREDICTORS_DIR) -> list[dict[str, str]]:
    """Name, base (the zoo it was trained on), task label, task kind and model of each predictor under ``folder``,
    from their ``config.json`` alone (no torch)."""
    out = []
    for config_path in sorted(folder.glob("*/config.json")):
        config = json.loads(config_path.read_text())
        task = config.get("task", {})
        out.append(
            {
                "name": config_path.parent.name,
                "base": Path(str(config.get("zoo", "?"))).name,
                "task": str(task.get("label", "?")),
                "kind": str(task.get("kind", "?")),
                "model": str(config.get("model", "?")),
            }
        )
    return out


def info_report(config: Settings) -> dict[str, Any]:
    """What ``lol info`` shows: version, data folder and where it came from, the collection (LoRA count when it
    exists; the error text when it cannot be opened), shipped predictors, default zoos, device, package versions."""
    import importlib.metadata
    import platform

    from lol_engine import __version__

    collection: dict[str, Any] = {"path": str(config.db_path), "exists": config.db_path.is_file()}
    if collection["exists"]:
        from lol_engine.errors import LolError
        from lol_engine.store import LoraStore

        collection["bytes"] = config.db_path.stat().st_size
        try:
            with LoraStore(config.db_path) as store:
                collection["loras"] = store.count()
        except LolError as exc:
            collection["error"] = str(exc)
    try:
        device = config.resolved_device()
    except BadRequestError as exc:
        device = f"unavailable: {exc}"
    versions = {"python": platform.python_version()}
    for package in ("lol-explorer", "torch", "safetensors", "numpy", "duckdb", "gradio"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "version": __version__,
        "package_dir": str(PACKAGE_DIR),
        "data_dir": {
            "path": str(config.data_dir),
            "source": "LOL_DATA_DIR" if "LOL_DATA_DIR" in config.from_environment else "default",
        },
        "collection": collection,
        "predictors_dir": str(PREDICTORS_DIR),
        "predictors": shipped_predictors_info(),
        "zoo_dir": {"path": str(config.zoo_dir) if config.zoo_dir else None, "source": config.zoo_source},
        "default_zoos": [str(z) for z in config.default_zoos],
        "how_to_get_zoos": None if config.default_zoos else HOW_TO_GET_ZOOS,
        "device": {"setting": config.device, "resolved": device},
        "max_upload": config.max_upload,
        "set_in_environment": sorted(config.from_environment),
        "versions": versions,
    }


def settings_table() -> str:
    """The README's Markdown table of :data:`VARIABLES` (``tests/test_settings.py`` checks the README holds it)."""
    rows = [f"| `{v.name}` | {v.default} | {v.meaning} |" for v in VARIABLES]
    return "\n".join(["| variable | default | |", "|---|---|---|", *rows])


# ------------------------------------------------------------------------------------------------ parsing
def _read(given: Mapping[str, str], name: str, parse: Callable[[str, str], Any], default: Any) -> Any:
    return parse(name, given[name]) if name in given else default


def _device(name: str, text: str) -> str | None:
    if text.lower() == "auto":
        return None
    if not _DEVICE.match(text.lower()):
        raise BadRequestError(
            f"{name}={text!r} is not a device: use cpu, cuda, cuda:N (N = 0, 1, …) or mps, or "
            "leave it unset (the accelerator torch sees, else CPU)"
        )
    return text.lower()


def _max_upload(name: str, text: str) -> int:
    try:
        return parse_size(text)
    except BadRequestError:
        raise BadRequestError(
            f"{name}={text!r} is not a size: use a positive number of bytes with an optional unit "
            "b, kb, mb, gb or tb (1 gb = 2³⁰ bytes), e.g. 200mb or 1.5gb"
        ) from None


def _port(name: str, text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise BadRequestError(
            f"{name}={text!r} is not a port: use a whole number from 1 to 65535, or leave it "
            "unset (the first free port from 7860)"
        )
    return int(text)


def _folder(given: Mapping[str, str], name: str) -> Path | None:
    if name not in given:
        return None
    path = Path(given[name]).expanduser()
    if path.exists() and not path.is_dir():
        raise BadRequestError(f"{name}={given[name]!r} is a file, not a folder: point it at a folder")
    return path


def _zoos_in(folder: Path) -> tuple[Path, ...]:
    return tuple(folder / n for n in DEFAULT_ZOO_NAMES if (folder / n / "manifest.parquet").is_file())


def _zoo_dir(given: Mapping[str, str], data_dir: Path) -> Path | None:
    if "LOL_ZOO_DIR" in given:
        folder = _folder(given, "LOL_ZOO_DIR")
        if folder is None or not folder.is_dir():
            zoos = ", ".join(DEFAULT_ZOO_NAMES)
            raise BadRequestError(
                f"LOL_ZOO_DIR={given['LOL_ZOO_DIR']!r} is not a folder: point it at a folder that "
                f"holds the zoos {zoos} (a checkout's data/zoo)"
            )
        return folder
    if _zoos_in(data_dir / "zoo"):
        return data_dir / "zoo"
    if (PACKAGE_DIR.parent / "pyproject.toml").is_file() and _zoos_in(CHECKOUT_ZOO_DIR):
        return CHECKOUT_ZOO_DIR
    return None


if __name__ == "__main__":  # python -m lol_engine.settings: the README's table
    print(settings_table())
