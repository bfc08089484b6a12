"""Fuzzing the LoRA reader: mutated valid files either load or raise LoraFormatError — nothing else, ever.

Hypothesis draws a list of mutations (truncation, bit flips, byte splices, header rewrites: dtypes, shapes, offsets,
huge declared sizes, key renames, metadata, the length prefix) and applies them to valid seed files of every format;
failures shrink to a minimal list. A second fuzzer mutates *values* rather than structure: nesting depth (up to 10⁵),
magnitude (integers up to 5,000 digits, 1e999, NaN, factor entries up to 3e38), length (names and metadata values
past their caps) and count (metadata keys, duplicated tensors, pattern keys), in the header, in JSON inside metadata
strings, in the factor bytes and in ``adapter_config.json``. CI runs a bounded, derandomised pass; a longer random
run is

    LOL_FUZZ_EXAMPLES=20000 LOL_FUZZ_RANDOM=1 .venv/bin/python -m pytest tests/test_fuzz_reader.py -q

Every crash found this way becomes a named regression test below.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from pathlib import Path

import pytest
import torch
from lora_files import kohya, peft, save

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lol_engine import LoraFormatError, ReadLimits, inspect_lora, load_lora  # noqa: E402
from lol_engine.report import describe  # noqa: E402

EXAMPLES = int(os.environ.get("LOL_FUZZ_EXAMPLES", "300"))
RANDOM = os.environ.get("LOL_FUZZ_RANDOM") == "1"
LIMITS = ReadLimits(max_file_bytes=8 * 2**20)
# Bounded and derandomised in CI; LOL_FUZZ_EXAMPLES / LOL_FUZZ_RANDOM=1 for long random runs.
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SD1 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _seeds(folder: Path) -> dict[str, bytes]:
    """Valid files of several formats and dtypes."""
    folder.mkdir(parents=True, exist_ok=True)
    conv_a, conv_b = torch.randn(4, 8, 3, 3), torch.randn(6, 4, 1, 1)
    files = {
        "kohya": save(
            folder / "kohya.safetensors",
            kohya(SD1, rank=4, d_in=16, d_out=12, alpha=2.0),
            metadata={"ss_network_dim": "4", "ss_output_name": "x"},
        ),
        "peft-f16": save(folder / "peft.safetensors", {k: v.half() for k, v in peft(Q).items()}),
        "peft-bf16": save(folder / "bf16.safetensors", {k: v.bfloat16() for k, v in peft(Q, rank=2).items()}),
        "locon-conv": save(
            folder / "conv.safetensors",
            {
                "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": conv_a,
                "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": conv_b,
                "lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(4.0),
            },
        ),
    }
    return {name: path.read_bytes() for name, path in files.items()}


def _split(data: bytes) -> tuple[dict, bytes] | None:
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, UnicodeDecodeError):
        return None
    return (header, data[8 + n :]) if isinstance(header, dict) else None


def _join(header: object, body: bytes, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


_WEIRD = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64),
    st.sampled_from([0, 1, -1, 2**31, 2**40, 2**62]),
    st.text(max_size=8),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
    st.lists(st.integers(min_value=-5, max_value=2**33), max_size=6),
)
_DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "x", ""])


@st.composite
def mutation(draw: st.DrawFn) -> tuple:
    kind = draw(
        st.sampled_from(
            [
                "truncate",
                "flip",
                "splice",
                "dtype",
                "shape",
                "offsets",
                "drop",
                "rename",
                "duplicate",
                "metadata",
                "length",
                "value",
            ]
        )
    )
    if kind == "truncate":
        return (kind, draw(st.integers(min_value=0, max_value=4096)))
    if kind == "flip":
        return (kind, draw(st.integers(min_value=0, max_value=4095)), draw(st.integers(min_value=0, max_value=7)))
    if kind == "splice":
        return (kind, draw(st.integers(min_value=0, max_value=4095)), draw(st.binary(min_size=1, max_size=16)))
    if kind == "dtype":
        return (kind, draw(st.integers(min_value=0, max_value=7)), draw(_DTYPES))
    if kind == "length":
        return (kind, draw(st.sampled_from([0, 1, 7, 2**20, 2**40, 2**64 - 1])))
    if kind == "rename":
        suffix = draw(
            st.sampled_from(
                [
                    ".lora_up.weight",
                    ".lora_down.weight",
                    ".alpha",
                    ".lora_A.weight",
                    ".lora_B.weight",
                    ".lora_mid.weight",
                    ".hada_w1_a",
                    ".dora_scale",
                    "",
                ]
            )
        )
        return (kind, draw(st.integers(min_value=0, max_value=7)), suffix)
    if kind == "metadata":
        return (kind, draw(st.one_of(st.dictionaries(st.text(max_size=6), _WEIRD, max_size=3), _WEIRD)))
    return (kind, draw(st.integers(min_value=0, max_value=7)), draw(_WEIRD))


def apply(data: bytes, op: tuple) -> bytes:
    """One mutation; header-level ones keep the tensor bytes and rewrite the JSON."""
    kind = op[0]
    if kind == "truncate":
        return data[: op[1] % (len(data) + 1)]
    if kind == "flip":
        if not data:
            return data
        at = op[1] % len(data)
        return data[:at] + bytes([data[at] ^ (1 << op[2])]) + data[at + 1 :]
    if kind == "splice":
        at = op[1] % (len(data) + 1)
        return data[:at] + op[2] + data[at + len(op[2]) :]
    parts = _split(data)
    if parts is None:
        return data
    header, body = parts
    if kind == "length":
        raw = json.dumps(header).encode()
        return struct.pack("<Q", op[1] % 2**64) + raw + body
    if kind == "metadata":
        header["__metadata__"] = op[1]
        return _join(header, body)
    names = [k for k in header if k != "__metadata__"]
    if not names:
        return data
    name = names[op[1] % len(names)]
    entry = header[name]
    if kind == "dtype" and isinstance(entry, dict):
        entry["dtype"] = op[2]
    elif kind == "shape" and isinstance(entry, dict):
        entry["shape"] = op[2]
    elif kind == "offsets" and isinstance(entry, dict):
        entry["data_offsets"] = op[2]
    elif kind == "drop":
        del header[name]
    elif kind == "rename":
        stem = name.rsplit(".", 2)[0]
        header[stem + op[2]] = header.pop(name)
    elif kind == "duplicate":
        header[f"{name}.copy"] = entry
    elif kind == "value":
        header[name] = op[2]
    return _join(header, body)


def check(data: bytes, path: Path) -> None:
    """The reader's contract on arbitrary bytes: a LoRA, or LoraFormatError. Anything else is a bug."""
    path.write_bytes(data)
    with contextlib.suppress(LoraFormatError):
        inspect_lora(path, limits=LIMITS)
    try:
        lora = load_lora(path, limits=LIMITS)
    except LoraFormatError:
        return
    report = describe(lora)  # a file that loads must be describable (finite, consistent shapes)
    assert report["n_modules"] == len(lora) > 0
    json.dumps(report, allow_nan=False)  # and printable as strict JSON (`lol inspect --json`)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return _seeds(tmp_path_factory.mktemp("seeds"))


def test_seed_files_are_valid(seeds: dict[str, bytes], tmp_path: Path) -> None:
    for name, data in seeds.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        assert len(load_lora(path, limits=LIMITS)) == 1, name


@FUZZ
@given(
    seed=st.sampled_from(["kohya", "peft-f16", "peft-bf16", "locon-conv"]),
    ops=st.lists(mutation(), min_size=1, max_size=4),
)
def test_mutated_files_load_or_raise_lora_format_error(
    seeds: dict[str, bytes], tmp_path: Path, seed: str, ops: list[tuple]
) -> None:
    data = seeds[seed]
    for op in ops:
        data = apply(data, op)
    check(data, tmp_path / "fuzzed.safetensors")


# ------------------------------------------------------------------------------------- crashes the fuzzer found
def test_regression_linear_factors_with_a_tucker_mid(seeds: dict[str, bytes], tmp_path: Path) -> None:
    """kohya seed, alpha renamed to ``.lora_mid.weight``: a 0-d Tucker core reached einsum (RuntimeError)."""
    data = apply(seeds["kohya"], ("rename", 0, ".lora_mid.weight"))
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    with pytest.raises(LoraFormatError, match=r"lora_mid .* next to linear factors"):
        load_lora(path, limits=LIMITS)


_JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**65), max_value=2**65),
        st.floats(),
        st.text(max_size=12),
        st.sampled_from([".*", "(a+)+$", "q_proj", "[", "layers\\.0"]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
_CONFIG_KEYS = [
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "peft_type",
    "use_dora",
    "fan_in_fan_out",
    "modules_to_save",
    "layers_to_transform",
    "base_model_name_or_path",
]


@FUZZ
@given(config=st.one_of(st.dictionaries(st.sampled_from(_CONFIG_KEYS), _JSON, max_size=6), _JSON))
def test_hostile_adapter_configs_load_or_raise_lora_format_error(
    seeds: dict[str, bytes], tmp_path: Path, config: object
) -> None:
    from lol_engine.lora.config import read_adapter_config

    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(seeds["peft-f16"])
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with contextlib.suppress(LoraFormatError):
        read_adapter_config(folder / "adapter_config.json", LIMITS)
    try:
        lora = load_lora(folder, limits=LIMITS)
    except LoraFormatError:
        return
    assert len(describe(lora)["modules"]) == 1


# --------------------------------------------------------------------------------------------- value mutations
def _deep(depth: int, opener: str) -> str:
    if opener == "[":
        return "[" * depth + "1" + "]" * depth
    return '{"k":' * depth + "1" + "}" * depth


@st.composite
def hostile_value(draw: st.DrawFn) -> str:
    """Raw JSON text of a hostile value: deep, huge, long, many, or non-finite."""
    kind = draw(st.sampled_from(["deep", "digits", "float", "long", "many", "plain"]))
    if kind == "deep":
        return _deep(draw(st.sampled_from([2, 30, 65, 500, 5_000, 100_000])), draw(st.sampled_from(["[", "{"])))
    if kind == "digits":
        return draw(st.sampled_from(["-", ""])) + "9" * draw(st.sampled_from([19, 20, 33, 400, 4_301, 5_000]))
    if kind == "float":
        return draw(st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "3e38", "1e-320", "0.0", "-0.0"]))
    if kind == "long":
        return json.dumps("x" * draw(st.sampled_from([0, 1_000, 2**20 + 1])))
    if kind == "many":
        n = draw(st.sampled_from([100, 10_000]))
        return "{" + ",".join(f'"k{i}":"{i}"' for i in range(n)) + "}"
    return json.dumps(draw(_JSON))


_VALUE_TARGETS = st.sampled_from(
    [
        "dtype",
        "shape",
        "offsets",
        "shape-dim",
        "metadata-raw",
        "ss_tag_frequency",
        "ss_network_dim",
        "ss_network_args",
        "lora_adapter_metadata",
        "modelspec.title",
        "metadata-count",
        "name-length",
        "factor-bytes",
    ]
)
_FACTOR_VALUES = st.sampled_from([3e38, -3e38, float("inf"), float("nan"), 1e20, 65504.0, 1e-45, -0.0])


def apply_value(data: bytes, target: str, value: str, index: int, special: float) -> bytes:
    """Put ``value`` (raw JSON text) at ``target`` of a valid file; tensor bytes stay where the header says."""
    parts = _split(data)
    assert parts is not None
    header, body = parts
    names = sorted(k for k in header if k != "__metadata__")
    name = names[index % len(names)]
    metadata = dict(header.get("__metadata__") or {})
    placeholder = '"__FUZZ__"'
    if target == "factor-bytes":
        entry = header[name]
        size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(entry["dtype"])
        begin = entry["data_offsets"][0]
        if size is None or entry["data_offsets"][1] - begin < size:
            return data
        packed = {4: "<f", 2: "<e", 8: "<d"}[size]
        if entry["dtype"] == "BF16":
            blob = struct.pack("<f", special)[2:]
        else:
            try:
                blob = struct.pack(packed, special)
            except OverflowError:  # 3e38 does not fit fp16: use its infinity
                blob = struct.pack(packed, math.copysign(math.inf, special))
        return _join(header, body[:begin] + blob + body[begin + size :])
    if target in ("dtype", "shape", "offsets"):
        header[name][{"dtype": "dtype", "shape": "shape", "offsets": "data_offsets"}[target]] = "__FUZZ__"
    elif target == "shape-dim":
        header[name]["shape"] = ["__FUZZ__", *header[name]["shape"][1:]]
    elif target == "metadata-raw":
        header["__metadata__"] = {**metadata, "ss_output_name": "__FUZZ__"}
    elif target == "metadata-count":
        header["__metadata__"] = "__FUZZ__"
    elif target == "name-length":
        header["x" * 2000 + name] = header.pop(name)
        return _join(header, body)
    else:  # a metadata string whose *content* is the hostile JSON
        header["__metadata__"] = {**metadata, target: value}
        return _join(header, body)
    raw = json.dumps(header).replace(placeholder, value, 1).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@FUZZ
@given(
    seed=st.sampled_from(["kohya", "peft-f16", "peft-bf16", "locon-conv"]),
    target=_VALUE_TARGETS,
    value=hostile_value(),
    index=st.integers(min_value=0, max_value=7),
    special=_FACTOR_VALUES,
)
def test_value_mutations_load_or_raise_lora_format_error(
    seeds: dict[str, bytes], tmp_path: Path, seed: str, target: str, value: str, index: int, special: float
) -> None:
    check(apply_value(seeds[seed], target, value, index, special), tmp_path / "fuzzed.safetensors")


@FUZZ
@given(
    field=st.sampled_from(
        [
            "r",
            "lora_alpha",
            "use_rslora",
            "rank_pattern",
            "alpha_pattern",
            "lora_dropout",
            "target_modules",
            "peft_type",
            "lora_parameters",
            "fine_tune_type",
        ]
    ),
    value=hostile_value(),
    patterns=st.sampled_from([0, 1, 100, 10_001]),
)
def test_config_value_mutations_load_or_raise_lora_format_error(
    seeds: dict[str, bytes], tmp_path: Path, field: str, value: str, patterns: int
) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(seeds["peft-f16"])
    pattern_text = ",".join(f'"p{i}\\.x|q_proj": 2' for i in range(patterns))
    text = f'{{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {{{pattern_text}}}, "{field}": {value}}}'
    (folder / "adapter_config.json").write_text(text)
    try:
        lora = load_lora(folder, limits=LIMITS)
    except LoraFormatError:
        return
    json.dumps(describe(lora), allow_nan=False)
