"""Bounded, validating access to ``.safetensors`` files. Nothing here ever unpickles.

The header is read and checked by this module *before* the safetensors library touches the file: the file size,
the header length, the JSON, the dtypes, every tensor's byte range (in bounds, no overlap, no gap) and the counts.
Only then are tensors read, through ``safetensors.safe_open``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lol_engine.errors import LoraFormatError

__all__ = [
    "DTYPE_SIZES",
    "ReadLimits",
    "SafetensorsHeader",
    "TensorInfo",
    "file_sha256",
    "read_header",
    "read_tensors",
]

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})  # LoRA factors; integers only for scalars such as alpha

# Magic bytes of formats that must never be opened: pickles (protocol 2-5), torch.save zips, numpy .npy.
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_ZIP_MAGIC = b"PK\x03\x04"
_REFUSED_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".npy", ".npz", ".joblib"}


@dataclass(frozen=True)
class ReadLimits:
    """Caps applied before any tensor data is read. The defaults suit every public LoRA seen so far."""

    max_file_bytes: int = 4 * 2**30  # a Flux LoRA at rank 128 is ~1.3 GB
    max_header_bytes: int = 16 * 2**20  # the safetensors library itself allows 100 MB
    max_tensors: int = 100_000
    max_ndim: int = 5  # Conv3d factors have 5 axes
    max_rank: int = 1024
    max_metadata_value_chars: int = 2**20  # longer __metadata__ values are dropped with a warning
    max_config_bytes: int = 2**20  # adapter_config.json
    max_pattern_chars: int = 512  # one rank_pattern / alpha_pattern regex
    pattern_timeout_s: float = 0.05  # time budget of one regex match

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"ReadLimits.{name} must be positive, got {value}")


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: name, dtype, shape and byte range inside the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors in file order, the ``__metadata__`` map and the file's size."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_size: int
    warnings: tuple[str, ...] = ()


def refuse_non_safetensors(path: Path) -> None:
    """Raise :class:`LoraFormatError` if ``path`` is named or shaped like a pickle; never opens it as one."""
    where = path.name
    if path.suffix.lower() in _REFUSED_SUFFIXES:
        raise LoraFormatError(
            f"{where}: '{path.suffix}' files are pickles and are never loaded (unpickling runs arbitrary code); "
            "convert the adapter to .safetensors with a trusted tool"
        )
    with path.open("rb") as fh:
        head = fh.read(8)
    if head.startswith(_PICKLE_MAGIC):
        raise LoraFormatError(f"{where}: this is a Python pickle, not a safetensors file; it was not unpickled")
    if head.startswith(_ZIP_MAGIC):
        raise LoraFormatError(f"{where}: this is a zip archive (torch.save checkpoint?), not a safetensors file")


def read_header(path: str | os.PathLike[str], limits: ReadLimits | None = None) -> SafetensorsHeader:
    """Read and validate a safetensors header without reading any tensor data.

    Raises :class:`LoraFormatError` naming the problem: wrong kind of file, size limits, truncation, malformed JSON,
    a dtype outside F32/F16/BF16/F64, a byte range that does not match its shape, overlaps or gaps.
    """
    limits = limits or ReadLimits()
    path = Path(path)
    where = path.name
    if not path.is_file():
        raise LoraFormatError(f"{path}: not a file")
    refuse_non_safetensors(path)
    size = path.stat().st_size
    if size < 8:
        raise LoraFormatError(
            f"{where}: file is {size} bytes; a safetensors file has at least an 8-byte header length"
        )
    if size > limits.max_file_bytes:
        raise LoraFormatError(f"{where}: file is {size:,} bytes, over the limit of {limits.max_file_bytes:,}")
    with path.open("rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > limits.max_header_bytes:
            raise LoraFormatError(
                f"{where}: header length {n:,} is over the limit of {limits.max_header_bytes:,} bytes"
            )
        if n > size - 8:
            raise LoraFormatError(
                f"{where}: truncated: the header claims {n:,} bytes but the file has {size - 8:,} after it"
            )
        raw = fh.read(n)
    entries, metadata = _parse_json(raw, where)
    buffer = size - 8 - n
    tensors = _validate_entries(entries, buffer, where, limits)
    metadata, warnings = _clean_metadata(metadata, where, limits)
    return SafetensorsHeader(path, tensors, metadata, size, tuple(warnings))


def _parse_json(raw: bytes, where: str) -> tuple[dict[str, Any], Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LoraFormatError(f"{where}: header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.startswith("{"):
        raise LoraFormatError(f"{where}: header does not start with '{{'; not a safetensors file")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise LoraFormatError(f"{where}: header names {key!r} twice")
            out[key] = value
        return out

    try:
        header = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise LoraFormatError(f"{where}: header is not valid JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(header, dict):
        raise LoraFormatError(f"{where}: header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    return header, metadata


def _validate_entries(entries: dict[str, Any], buffer: int, where: str, limits: ReadLimits) -> dict[str, TensorInfo]:
    if len(entries) > limits.max_tensors:
        raise LoraFormatError(f"{where}: {len(entries):,} tensors, over the limit of {limits.max_tensors:,}")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in entries.items():
        tensors[name] = _tensor_info(name, entry, buffer, where, limits)
    expected = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != expected:
            kind = "overlaps the previous tensor" if info.begin < expected else "leaves a gap before it"
            raise LoraFormatError(f"{where}: tensor {info.name!r} at bytes [{info.begin}, {info.end}) {kind}")
        expected = info.end
    if expected != buffer:
        raise LoraFormatError(f"{where}: tensors cover {expected:,} bytes but the data buffer holds {buffer:,}")
    return tensors


def _tensor_info(name: str, entry: Any, buffer: int, where: str, limits: ReadLimits) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise LoraFormatError(f"{where}: header entry {name!r} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise LoraFormatError(
            f"{where}: tensor {name!r} has dtype {dtype!r}; supported are {', '.join(DTYPE_SIZES)} "
            "(quantized and FP8 LoRA factors are not read)"
        )
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise LoraFormatError(f"{where}: tensor {name!r} has a malformed shape {shape!r}")
    if len(shape) > limits.max_ndim:
        raise LoraFormatError(f"{where}: tensor {name!r} has {len(shape)} axes, over the limit of {limits.max_ndim}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise LoraFormatError(f"{where}: tensor {name!r} has malformed data_offsets {offsets!r}")
    begin, end = offsets
    if end > buffer:
        raise LoraFormatError(
            f"{where}: truncated: tensor {name!r} needs bytes up to {end:,} but the data buffer has {buffer:,}"
        )
    if math.prod(shape) * DTYPE_SIZES[dtype] != end - begin:
        raise LoraFormatError(
            f"{where}: tensor {name!r} of shape {shape} and dtype {dtype} needs "
            f"{math.prod(shape) * DTYPE_SIZES[dtype]:,} bytes but its data_offsets span {end - begin:,}"
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _clean_metadata(metadata: Any, where: str, limits: ReadLimits) -> tuple[dict[str, str], list[str]]:
    if metadata is None:
        return {}, []
    if not isinstance(metadata, dict):
        raise LoraFormatError(f"{where}: __metadata__ is not a JSON object")
    out: dict[str, str] = {}
    warnings = []
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise LoraFormatError(f"{where}: __metadata__[{key!r}] is not a string")
        if len(value) > limits.max_metadata_value_chars:
            warnings.append(f"metadata value {key!r} ({len(value):,} chars) is over the cap and was dropped")
            continue
        out[key] = value
    return out, warnings


def read_tensors(header: SafetensorsHeader, names: list[str]) -> dict[str, torch.Tensor]:
    """Read the named tensors of a validated file as float32 (F16/BF16/F64 are converted)."""
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(str(header.path), framework="pt") as fh:
            for name in names:
                out[name] = fh.get_tensor(name).to(torch.float32)
    except (SafetensorError, OSError) as exc:  # the file changed under us, or the library disagrees
        raise LoraFormatError(f"{header.path.name}: safetensors could not read it: {exc}") from None
    return out


_TORCH_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
}


def write_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file with a deterministic byte layout (sorted keys and metadata).

    ``safetensors.save_file`` orders ``__metadata__`` by a randomly seeded hash map, so identical content can give
    different bytes, and different sha256 ids. Zoo builds must be bit-reproducible, hence this writer.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    blobs, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": _TORCH_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # align the data buffer to 8 bytes, as the reference writer does
    tmp = Path(str(path) + ".partial")
    with tmp.open("wb") as fh:
        fh.write(len(text).to_bytes(8, "little"))
        fh.write(text)
        for blob in blobs:
            fh.write(blob)
    tmp.replace(path)


def file_sha256(path: str | os.PathLike[str], chunk: int = 2**20) -> str:
    """The sha256 of the whole file, streamed: the LoRA's id."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
