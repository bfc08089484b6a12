"""A corpus of hostile inputs for the reader, shared by the tests and ``benchmarks/bench_hostile.py``.

Each :class:`Case` writes its file (or PEFT folder) and says what the reader must do with it: refuse it with a
:class:`~lol_engine.LoraFormatError` whose message matches ``expect``, or read it (``loads=True``) with a warning that
matches ``expect``. Files are written by hand where a real writer would refuse to produce them, and kept small
unless the size is the point (the 50,000-module file).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEEP = 100_000  # nesting depth of the deep-JSON cases
Q = "base_model.model.model.layers.0.self_attn.q_proj"
SD1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


def write_raw(path: Path, header: bytes | str, tensors: dict[str, np.ndarray]) -> Path:
    """A safetensors file from a hand-written header *prefix* (or b"") and float32 tensors appended after it.

    ``header`` is spliced in verbatim as the first members of the JSON object, so it can hold JSON no writer would
    produce (deep nesting, 5,000-digit numbers, lists as dtypes).
    """
    entries, blobs, offset = [], [], 0
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array, dtype="<f4").tobytes()
        entry = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        entries.append(json.dumps(name) + ":" + json.dumps(entry))
        blobs.append(blob)
        offset += len(blob)
    prefix = header.decode() if isinstance(header, bytes) else header
    text = "{" + ",".join(([prefix] if prefix else []) + entries) + "}"
    raw = text.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    return path


def _pair(
    stem: str, rank: int = 2, d_in: int = 8, d_out: int = 6, value: float | None = None
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rank, d_in)) if value is None else np.full((rank, d_in), value)
    b = rng.standard_normal((d_out, rank)) if value is None else np.full((d_out, rank), value)
    return {f"{stem}.lora_A.weight": a, f"{stem}.lora_B.weight": b}


def _kohya(stem: str = SD1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        f"{stem}.lora_down.weight": rng.standard_normal((2, 768)),
        f"{stem}.lora_up.weight": rng.standard_normal((320, 2)),
    }


def _metadata(fields: dict[str, str]) -> str:
    return '"__metadata__":' + json.dumps(fields)


def _peft_folder(folder: Path, config_text: str, tensors: dict[str, np.ndarray] | None = None) -> Path:
    write_raw(folder / "adapter_model.safetensors", "", tensors or _pair(Q))
    (folder / "adapter_config.json").write_text(config_text)
    return folder


def _deep(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


def _many_modules(path: Path, n: int, rank: int = 1, d: int = 8, sparse: bool = False) -> Path:
    """``n`` PEFT modules of rank ``rank`` with ``d``-wide factors, written directly (fast at any ``n``).

    ``sparse``: the data is a hole in the file (zeros that take no disk), for files refused from the header alone.
    """
    entries, offset = [], 0
    per = rank * d * 4
    for i in range(n):
        stem = f"base_model.model.model.layers.{i}.mlp.down_proj"
        for role, shape in (("lora_A", [rank, d]), ("lora_B", [d, rank])):
            entries.append(
                f'"{stem}.{role}.weight":{{"dtype":"F32","shape":{shape},"data_offsets":[{offset},{offset + per}]}}'
            )
            offset += per
    raw = ("{" + ",".join(entries) + "}").encode()
    if sparse:
        with path.open("wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + offset)
        return path
    rng = np.random.default_rng(0)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + rng.standard_normal(offset // 4).astype("<f4").tobytes())
    return path


def _patterns(folder: Path, n_patterns: int, n_modules: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _many_modules(folder / "adapter_model.safetensors", n_modules)
    patterns = {f"zz{i}(x|y)*w": 4 for i in range(n_patterns)}
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "rank_pattern": patterns, "alpha_pattern": patterns}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@dataclass(frozen=True)
class Case:
    """One hostile input: ``make(folder)`` writes it and returns the path to read."""

    name: str
    what: str
    make: Callable[[Path], Path]
    expect: str  # regex the refusal (or, with loads=True, one of the warnings) must match; "" for none
    loads: bool = False


def _entry(dtype: str) -> str:
    return '"w.lora_A.weight":{"dtype":' + dtype + ',"shape":[1],"data_offsets":[0,4]}'


def cases() -> list[Case]:
    """Every hostile input of the reader's error contract, in the order of the issue that listed them."""
    diffusers_te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    return [
        Case(
            "dtype-list",
            "a header whose dtype is a list",
            lambda f: write_raw(f / "x.safetensors", _entry('["F32"]'), {}),
            r"dtype",
        ),
        Case(
            "dtype-object",
            "a header whose dtype is an object",
            lambda f: write_raw(f / "x.safetensors", _entry('{"a":1}'), {}),
            r"dtype",
        ),
        Case(
            "metadata-deep",
            "__metadata__ nested 10^5 levels deep",
            lambda f: write_raw(f / "x.safetensors", '"__metadata__":' + _deep(), _pair(Q)),
            r"nested|__metadata__",
        ),
        Case(
            "tag-frequency-deep",
            "ss_tag_frequency nested 10^5 levels deep (informational: kept with a warning)",
            lambda f: write_raw(f / "x.safetensors", _metadata({"ss_tag_frequency": _deep()}), _kohya()),
            r"ss_tag_frequency",
            loads=True,
        ),
        Case(
            "adapter-metadata-deep",
            "lora_adapter_metadata nested 10^5 levels deep",
            lambda f: write_raw(
                f / "x.safetensors",
                _metadata({"lora_adapter_metadata": _deep()}),
                _pair("unet.down_blocks.0.attentions.0.proj_in"),
            ),
            r"lora_adapter_metadata",
        ),
        Case(
            "config-deep",
            "adapter_config.json nested 10^5 levels deep",
            lambda f: _peft_folder(f / "peft", '{"r": ' + _deep() + "}"),
            r"adapter_config\.json",
        ),
        Case(
            "config-r-400-digits",
            "a 400-digit integer r in adapter_config.json",
            lambda f: _peft_folder(f / "peft", '{"peft_type": "LORA", "r": ' + "9" * 400 + "}"),
            r"adapter_config\.json.*\br\b|\br\b.*adapter_config\.json",
        ),
        Case(
            "adapter-metadata-alpha-400-digits",
            "a 400-digit lora_alpha in lora_adapter_metadata",
            lambda f: write_raw(
                f / "x.safetensors",
                _metadata(
                    {"lora_adapter_metadata": '{"text_encoder.r": 2, "text_encoder.lora_alpha": ' + "9" * 400 + "}"}
                ),
                _pair(diffusers_te),
            ),
            r"lora_alpha",
        ),
        Case(
            "factors-3e38",
            "finite factors whose ΔW overflows float32 (entries 3e38)",
            lambda f: write_raw(f / "x.safetensors", "", _pair(Q, value=3e38)),
            r"overflow|too large",
        ),
        Case(
            "header-int-5000-digits",
            "a 5,000-digit integer in the header (past Python's 4,300-digit limit)",
            lambda f: write_raw(
                f / "x.safetensors",
                '"w.lora_A.weight":{"dtype":"F32","shape":[' + "1" * 5000 + '],"data_offsets":[0,4]}',
                {},
            ),
            r"x\.safetensors.*digits",
        ),
        Case(
            "config-int-5000-digits",
            "a 5,000-digit lora_alpha in adapter_config.json",
            lambda f: _peft_folder(f / "peft", '{"peft_type": "LORA", "lora_alpha": ' + "7" * 5000 + "}"),
            r"adapter_config\.json.*digits",
        ),
        Case(
            "ss-junk-number",
            "a 5,000-digit ss_network_dim (informational: kept with a warning)",
            lambda f: write_raw(f / "x.safetensors", _metadata({"ss_network_dim": "1" * 5000}), _kohya()),
            r"ss_network_dim",
            loads=True,
        ),
        Case(
            "ss-junk-type",
            "a non-string ss_* and modelspec.* value (informational: kept with a warning)",
            lambda f: write_raw(
                f / "x.safetensors",
                '"__metadata__":{"ss_network_args":{"algo":["x"]},"modelspec.title":[1,2]}',
                _kohya(),
            ),
            r"ss_network_args|modelspec",
            loads=True,
        ),
        Case(
            "config-junk-info",
            "NaN, 1e999 and a 400-digit number in informational adapter_config.json fields",
            lambda f: _peft_folder(
                f / "peft",
                '{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "lora_dropout": NaN, '
                '"revision": 1e999, "layers_to_transform": ' + "3" * 400 + "}",
            ),
            "",
            loads=True,
        ),
        Case(
            "patterns-2000x2000",
            "rank_pattern and alpha_pattern of 2,000 patterns over 2,000 modules",
            lambda f: _patterns(f / "peft", 2000, 2000),
            "",
            loads=True,
        ),
        Case(
            "modules-50000",
            "a 14 MB file of 50,000 rank-1 modules",
            lambda f: _many_modules(f / "x.safetensors", 50_000),
            r"50,000 modules",
        ),
        Case(
            "tucker-expansion",
            "an 18 MB LyCORIS Tucker file whose lora_mid expands A to 720 GB",
            lambda f: write_raw(
                f / "x.safetensors",
                "",
                {
                    "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": np.ones((1, 20000, 1, 1)),
                    "lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight": np.ones((1, 1, 1500, 3000)),
                    "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": np.ones((8, 1, 1, 1)),
                },
            ),
            r"expand to [\d,]+ values",
        ),
        Case(
            "spectrum-work",
            "a 1 GB (sparse) file of rank-1,024 factors whose exact spectra would take minutes",
            lambda f: _many_modules(f / "x.safetensors", 32, rank=1024, d=4096, sparse=True),
            r"exact spectra .* cost",
        ),
        Case(
            "text-file",
            "a text file renamed .safetensors",
            lambda f: _text(f / "notes.safetensors"),
            r"not a safetensors file",
        ),
    ]


def _text(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("These are my training notes for the LoRA: 3000 steps, lr 1e-4, rank 32.\n" * 20)
    return path
