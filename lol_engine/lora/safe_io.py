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
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lol_engine.errors import LoraFormatError

__all__ = [
    "DTYPE_SIZES",
    "HugeNumber",
    "ReadLimits",
    "SafetensorsHeader",
    "TensorInfo",
    "WorkBudget",
    "file_sha256",
    "json_depth",
    "parse_json",
    "read_header",
    "read_into",
    "read_tensors",
    "safetensors_hashes",
    "shown",
]

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})  # LoRA factors; integers only for scalars such as alpha

# Magic bytes of formats that must never be opened: pickles (protocol 2-5), torch.save zips, numpy .npy.
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_ZIP_MAGIC = b"PK\x03\x04"
_REFUSED_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle", ".npy", ".npz", ".joblib"}


@dataclass(frozen=True)
class ReadLimits:
    """The caps and work budget of reading one LoRA; each is checked before the work it bounds.

    The defaults pass every public LoRA seen so far with room to spare (an SDXL LoRA has about 1,000 modules, a full
    LyCORIS file a few thousand, a Flux rank-128 file about 1.3 GB) and refuse hostile files in about a second.
    """

    max_file_bytes: int = 4 * 2**30  # a Flux LoRA at rank 128 is ~1.3 GB
    max_header_bytes: int = 16 * 2**20  # the safetensors library itself allows 100 MB
    max_tensors: int = 100_000
    max_modules: int = 20_000  # adapted modules (A/B pairs); SDXL ~1,000, full LyCORIS a few thousand
    max_name_chars: int = 1024  # one tensor name; real ones are under 200
    max_ndim: int = 5  # Conv3d factors have 5 axes
    max_rank: int = 1024
    max_json_depth: int = 64  # nesting of the header, adapter_config.json and JSON inside metadata values
    max_number_digits: int = 32  # longer integers in any JSON are refused (or dropped from informational fields)
    max_metadata_value_chars: int = 2**20  # longer __metadata__ values are dropped with a warning
    max_config_bytes: int = 2**20  # adapter_config.json
    max_pattern_chars: int = 512  # one rank_pattern / alpha_pattern regex
    max_patterns: int = 10_000  # rank_pattern and alpha_pattern keys together
    max_pattern_pairs: int = 20_000_000  # (patterns) × (modules) regex matches, each linear-time (RE2)
    max_factor_values: int = 1_500_000_000  # Σ r·(d_in + d_out) of the canonical factors (full Flux r128: 0.6e9)
    max_spectrum_work: float = 2e11  # Σ r²·(d_in + d_out): the cost of exact spectra (Flux r128: ~0.8e11)
    max_cpu_seconds: float = 60.0  # CPU time of one read in the reading thread, checked between stages

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"ReadLimits.{name} must be positive, got {value}")


class WorkBudget:
    """The CPU-time budget of one read: :meth:`check` between stages refuses the file once it is spent.

    Counts the reading thread's own CPU time (``time.thread_time``), so other requests running at the same time do
    not eat into it. The count limits of :class:`ReadLimits` refuse hostile files long before this one should fire;
    it is the backstop for work no count foresaw.
    """

    def __init__(self, limits: ReadLimits, where: str) -> None:
        self.limits = limits
        self.where = where
        self._start = time.thread_time()
        self._wall_start = time.perf_counter()

    def check(self, stage: str) -> None:
        """Raise :class:`LoraFormatError` if this read has used more CPU than ``limits.max_cpu_seconds``."""
        # A thread cannot use more CPU time than the wall time that passed; reading the wall clock is much cheaper
        # than the thread's CPU clock (a system call on some virtual machines), so the common case asks only it.
        if time.perf_counter() - self._wall_start <= self.limits.max_cpu_seconds:
            return
        used = time.thread_time() - self._start
        if used > self.limits.max_cpu_seconds:
            raise LoraFormatError(
                f"{self.where}: reading it used {used:.3g} s of CPU ({stage}), over the budget of "
                f"{self.limits.max_cpu_seconds:g} s"
            )


class HugeNumber(float):
    """An integer with more digits than :attr:`ReadLimits.max_number_digits`, as found in untrusted JSON.

    It is infinite as a float (every numeric check refuses it) and says how long it was in messages. Python itself
    refuses to parse integers past 4,300 digits, with a message that names no file; this never gets there.
    """

    digits: int

    def __new__(cls, digits: int) -> HugeNumber:
        number = super().__new__(cls, math.inf)
        number.digits = digits
        return number

    def __repr__(self) -> str:
        return f"<a number of {self.digits:,} digits>"

    __str__ = __repr__


def shown(value: Any, limit: int = 80) -> str:
    """``repr`` of untrusted data for a message, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_json(
    text: str | bytes, what: str, limits: ReadLimits, object_pairs_hook: Any = None, check_depth: bool = True
) -> Any:
    """``json.loads`` for untrusted text; every problem is a :class:`LoraFormatError` that names ``what``.

    Nesting is capped at ``limits.max_json_depth`` (deeper input would crash ``json`` or later recursive code),
    integers longer than ``limits.max_number_digits`` become :class:`HugeNumber` (so the field that holds one can be
    named when it is refused), and NaN/Infinity literals stay floats for the callers' finiteness checks.
    """

    def integer(digits: str) -> int | float:
        n = len(digits) - digits.startswith("-")
        return int(digits) if n <= limits.max_number_digits else HugeNumber(n)

    # The per-integer hook only where an integer can be too long: a text without a run of more digits than the limit
    # has none, and json's own C parsing of integers is much faster than a Python call per number.
    hook = integer if has_digit_run(text, limits.max_number_digits + 1) else None
    try:
        value = json.loads(text, parse_int=hook, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise LoraFormatError(f"{what} is nested too deeply (the limit is {limits.max_json_depth} levels)") from None
    except UnicodeDecodeError as exc:
        raise LoraFormatError(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise LoraFormatError(f"{what} is not valid JSON ({exc.msg} at char {exc.pos})") from None
    # Each level of nesting needs an opening bracket: a text with few of them (any config) is not walked.
    brackets = text.count(b"{") + text.count(b"[") if isinstance(text, bytes) else text.count("{") + text.count("[")
    deep = check_depth and brackets > limits.max_json_depth
    if deep and json_depth(value, limits.max_json_depth) > limits.max_json_depth:
        raise LoraFormatError(f"{what} is nested more than {limits.max_json_depth} levels deep")
    return value


# Every byte to a space but ASCII digits, which become "0": a run of n digits is then the substring "0" * n.
_DIGITS_TO_ZEROS = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))


def has_digit_run(text: str | bytes, n: int) -> bool:
    """Whether ``text`` holds ``n`` ASCII digits in a row: a byte translation and a substring search, about ten
    times faster than the regular expression ``[0-9]{n}`` (which tries every position)."""
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")  # other characters: not digits
    return b"0" * n in raw.translate(_DIGITS_TO_ZEROS)


def json_depth(value: Any, stop: int | None = None) -> int:
    """Nesting depth of decoded JSON (a scalar is 0), computed without recursion; stops counting past ``stop``."""
    deepest = 0
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if stop is not None and deepest > stop:
            break
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


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
    data_start: int = 8  # byte offset of the data buffer: 8 + the header's length
    # The whole file, when read_header read it at once (``whole_under``): tensors are then read from it, not the file.
    content: bytearray | None = field(default=None, repr=False, compare=False)


def refuse_non_safetensors(path: Path) -> None:
    """Raise :class:`LoraFormatError` if ``path`` is named or shaped like a pickle; never opens it as one."""
    _refuse_pickle_name(path)
    with path.open("rb") as fh:
        _refuse_pickle_bytes(fh.read(9), os.fstat(fh.fileno()).st_size, path.name)


def _refuse_pickle_name(path: Path) -> None:
    if path.suffix.lower() in _REFUSED_SUFFIXES:
        raise LoraFormatError(
            f"{path.name}: '{path.suffix}' files are pickles and are never loaded (unpickling runs arbitrary code); "
            "convert the adapter to .safetensors with a trusted tool"
        )


def _refuse_pickle_bytes(head: bytes, size: int, where: str) -> None:
    """Refuse a file of ``size`` bytes starting with ``head`` (its first 9 bytes) that is a pickle or a zip."""
    # A safetensors header length of 640, 896, 1152 or 1408 bytes starts with the same two bytes as a pickle; its
    # JSON header (ninth byte "{") tells it apart.
    looks_safetensors = head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8
    if head.startswith(_PICKLE_MAGIC) and not looks_safetensors:
        raise LoraFormatError(f"{where}: this is a Python pickle, not a safetensors file; it was not unpickled")
    if head.startswith(_ZIP_MAGIC):
        raise LoraFormatError(f"{where}: this is a zip archive (torch.save checkpoint?), not a safetensors file")


def read_header(
    path: str | os.PathLike[str],
    limits: ReadLimits | None = None,
    precheck: Callable[[dict[str, Any]], None] | None = None,
    whole_under: int = 0,
) -> SafetensorsHeader:
    """Read and validate a safetensors header without reading any tensor data.

    Raises :class:`LoraFormatError` naming the problem: wrong kind of file, size limits, truncation, malformed JSON,
    a dtype outside F32/F16/BF16/F64, a byte range that does not match its shape, overlaps or gaps. ``precheck`` sees
    the parsed entries before they are validated one by one (the caller's own cheap counts go there).

    A file of fewer than ``whole_under`` bytes is read whole in one call and kept as the header's ``content``:
    :func:`read_into` and :func:`read_tensors` then convert and hash those very bytes without opening it again.
    """
    limits = limits or ReadLimits()
    path = Path(path)
    where = path.name
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)  # before opening: a FIFO or device would block or never end
    except (OSError, ValueError):
        regular = False
    if not regular:
        raise LoraFormatError(f"{where}: not a file")
    _refuse_pickle_name(path)
    with path.open("rb") as fh:  # one open for the kind checks and the header
        size = os.fstat(fh.fileno()).st_size
        prefix = fh.read(9)
        _refuse_pickle_bytes(prefix, size, where)
        if size < 8:
            raise LoraFormatError(
                f"{where}: file is {size} bytes; a safetensors file has at least an 8-byte header length"
            )
        if size > limits.max_file_bytes:
            raise LoraFormatError(f"{where}: file is {size:,} bytes, over the limit of {limits.max_file_bytes:,}")
        _refuse_non_container(prefix, where)
        n = int.from_bytes(prefix[:8], "little")
        if n > limits.max_header_bytes:
            raise LoraFormatError(
                f"{where}: header length {n:,} is over the limit of {limits.max_header_bytes:,} bytes"
            )
        if n > size - 8:
            raise LoraFormatError(
                f"{where}: truncated: the header claims {n:,} bytes but the file has {size - 8:,} after it"
            )
        content = None
        if size < whole_under:
            content = bytearray(size)
            fh.seek(0)
            if fh.readinto(content) != size or fh.read(1):
                raise LoraFormatError(f"{where}: the file changed while it was being read")
            raw = bytes(memoryview(content)[8 : 8 + n])  # one copy (a bytearray slice would be a second)
        else:
            fh.seek(8)
            raw = fh.read(n)
    entries, metadata = _parse_header(raw, where, limits)
    if len(entries) > limits.max_tensors:
        raise LoraFormatError(f"{where}: {len(entries):,} tensors, over the limit of {limits.max_tensors:,}")
    if precheck is not None:
        precheck(entries)
    buffer = size - 8 - n
    tensors = _validate_entries(entries, buffer, where, limits)
    metadata, warnings = _clean_metadata(metadata, where, limits)
    return SafetensorsHeader(path, tensors, metadata, size, tuple(warnings), 8 + n, content)


def _refuse_non_container(prefix: bytes, where: str) -> None:
    """A safetensors file is ``[u64 header length]{JSON…``: anything else is named as what it looks like."""
    if len(prefix) < 9 or prefix[8:9] == b"{":
        return
    start = prefix[:8]
    if all(32 <= c < 127 or c in b"\t\r\n" for c in start):
        kind = f"it is text (it starts with {start.decode()!r})"
    else:
        kind = f"its 9th byte is {prefix[8:9]!r}, not the '{{' that opens a safetensors header"
    raise LoraFormatError(f"{where}: not a safetensors file: {kind}")


def _parse_header(raw: bytes, where: str, limits: ReadLimits) -> tuple[dict[str, Any], Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LoraFormatError(f"{where}: header is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.startswith("{"):
        raise LoraFormatError(f"{where}: header does not start with '{{'; not a safetensors file")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):  # rare: find the key that came twice
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise LoraFormatError(f"{where}: header names {shown(key)} twice")
                seen.add(key)
        return out

    # The header's own structure is checked entry by entry below, so its depth is not walked (json still refuses
    # nesting past the interpreter's recursion limit).
    header = parse_json(text, f"{where}: header", limits, object_pairs_hook=no_duplicates, check_depth=False)
    if not isinstance(header, dict):
        raise LoraFormatError(f"{where}: header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    return header, metadata


def _validate_entries(entries: dict[str, Any], buffer: int, where: str, limits: ReadLimits) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for name, entry in entries.items():
        tensors[name] = _tensor_info(name, entry, buffer, where, limits)
    expected = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != expected:
            kind = "overlaps the previous tensor" if info.begin < expected else "leaves a gap before it"
            raise LoraFormatError(f"{where}: tensor {shown(info.name)} at bytes [{info.begin}, {info.end}) {kind}")
        expected = info.end
    if expected != buffer:
        raise LoraFormatError(f"{where}: tensors cover {expected:,} bytes but the data buffer holds {buffer:,}")
    return tensors


def _tensor_info(name: str, entry: Any, buffer: int, where: str, limits: ReadLimits) -> TensorInfo:
    if len(name) > limits.max_name_chars:
        raise LoraFormatError(
            f"{where}: a tensor name of {len(name):,} characters ({shown(name, 60)}) is over the limit of "
            f"{limits.max_name_chars:,}"
        )
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise LoraFormatError(f"{where}: header entry {shown(name)} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise LoraFormatError(
            f"{where}: tensor {shown(name)} has dtype {shown(dtype, 40)}; supported are {', '.join(DTYPE_SIZES)} "
            "(quantized and FP8 LoRA factors are not read)"
        )
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise LoraFormatError(f"{where}: tensor {shown(name)} has a malformed shape {shown(shape, 60)}")
    if len(shape) > limits.max_ndim:
        raise LoraFormatError(
            f"{where}: tensor {shown(name)} has {len(shape)} axes, over the limit of {limits.max_ndim}"
        )
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise LoraFormatError(f"{where}: tensor {shown(name)} has malformed data_offsets {shown(offsets, 60)}")
    begin, end = offsets
    if end > buffer:
        raise LoraFormatError(
            f"{where}: truncated: tensor {shown(name)} needs bytes up to {end:,} but the data buffer has {buffer:,}"
        )
    if math.prod(shape) * DTYPE_SIZES[dtype] != end - begin:
        raise LoraFormatError(
            f"{where}: tensor {shown(name)} of shape {shape} and dtype {dtype} needs "
            f"{math.prod(shape) * DTYPE_SIZES[dtype]:,} bytes but its data_offsets span {end - begin:,}"
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


# __metadata__ keys that decide how the factors are read. Every other key is information: junk in it is dropped with
# a warning instead of refusing the LoRA.
SCALE_METADATA = frozenset({"lora_adapter_metadata"})


def _clean_metadata(metadata: Any, where: str, limits: ReadLimits) -> tuple[dict[str, str], list[str]]:
    if metadata is None:
        return {}, []
    if not isinstance(metadata, dict):
        raise LoraFormatError(f"{where}: __metadata__ is not a JSON object of strings")
    out: dict[str, str] = {}
    warnings = []
    for key, value in metadata.items():
        problem = ""
        if not isinstance(value, str):
            problem = f"is not a string (a JSON {type(value).__name__})"
        elif len(value) > limits.max_metadata_value_chars:
            problem = f"has {len(value):,} chars, over the cap of {limits.max_metadata_value_chars:,}"
        if not problem:
            out[key] = value
        elif key in SCALE_METADATA:
            raise LoraFormatError(f"{where}: __metadata__[{shown(key)}] {problem}; it sets the scales")
        else:
            warnings.append(f"metadata value {shown(key)} {problem} and was dropped")
    return out, warnings


_TORCH_DTYPES_BY_NAME = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
}


def read_tensors(header: SafetensorsHeader, names: list[str]) -> dict[str, torch.Tensor]:
    """Read the named tensors of a validated file as float32 (F16/BF16/F64 and integer scalars are converted).

    The byte range of every tensor was checked by :func:`read_header` (in bounds, matching its shape and dtype, no
    overlaps), so this reads exactly those bytes. The safetensors library is not used here because it refuses files
    whose ``__metadata__`` holds a non-string value, and such junk in an informational field must not cost the LoRA.
    """
    out = {}
    where = header.path.name
    if header.content is not None:  # read whole by read_header
        for name in names:
            info = header.tensors[name]
            out[name] = _float32(header.content[header.data_start + info.begin : header.data_start + info.end], info)
        return out
    try:
        with header.path.open("rb") as fh:
            if os.fstat(fh.fileno()).st_size != header.file_size:
                raise LoraFormatError(f"{where}: the file changed while it was being read")
            for name in names:
                info = header.tensors[name]
                blob = bytearray(info.end - info.begin)
                fh.seek(header.data_start + info.begin)
                if fh.readinto(blob) != len(blob):
                    raise LoraFormatError(f"{where}: the file changed while it was being read")
                out[name] = _float32(blob, info)
    except OSError as exc:
        raise LoraFormatError(f"{where}: could not be read ({exc.strerror or type(exc).__name__})") from None
    return out


def _float32(blob: bytearray, info: TensorInfo) -> torch.Tensor:
    """``info``'s tensor from its own bytes, as float32 (little-endian, as the format prescribes)."""
    dtype = _TORCH_DTYPES_BY_NAME[info.dtype]
    flat = torch.frombuffer(blob, dtype=dtype) if blob else torch.empty(0, dtype=dtype)
    return flat.reshape(info.shape).to(torch.float32)


class _Hasher:
    """``(sha256 of the whole file, sha256 of its data buffer)`` fed block by block, in file order.

    Large files are hashed on two background threads, one per digest (``hashlib`` releases the GIL on large blocks),
    so that both hashes run beside each other and beside the conversion of the blocks already read instead of after
    it: hashing a 218 MB SDXL file twice is about 0.35 s of one core. Each digest has a single worker: its FIFO queue
    keeps a file's blocks in order (a pool of several would hash them out of order).
    """

    _POOLS: tuple[ThreadPoolExecutor, ThreadPoolExecutor] | None = None
    _POOL_LOCK = threading.Lock()
    THREAD_BYTES = 2**24  # files smaller than this are hashed inline: a thread hand-off costs more than it saves
    MAX_PENDING_BYTES = 2**27  # blocks read but not hashed yet: bounds the extra memory of a fast reader

    def __init__(self, size: int) -> None:
        self.full, self.data = hashlib.sha256(), hashlib.sha256()
        self._pending: deque[tuple[Future[None], Future[None] | None, int]] = deque()
        self._pending_bytes = 0
        self._pools: tuple[ThreadPoolExecutor, ThreadPoolExecutor] | None = None
        if size >= self.THREAD_BYTES:
            with _Hasher._POOL_LOCK:
                if _Hasher._POOLS is None:
                    _Hasher._POOLS = (
                        ThreadPoolExecutor(1, thread_name_prefix="lol-sha256-file"),
                        ThreadPoolExecutor(1, thread_name_prefix="lol-sha256-data"),
                    )
                self._pools = _Hasher._POOLS

    def update(self, block: bytes | bytearray, data: bool = True) -> None:
        """Hash ``block`` (into the data hash too unless ``data`` is False); the caller must not change it after."""
        if self._pools is None:
            self.full.update(block)
            if data:
                self.data.update(block)
            return
        full = self._pools[0].submit(self.full.update, block)
        both = self._pools[1].submit(self.data.update, block) if data else None
        self._pending.append((full, both, len(block)))
        self._pending_bytes += len(block)
        while self._pending_bytes > self.MAX_PENDING_BYTES:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        full, data, size = self._pending.popleft()
        self._pending_bytes -= size
        full.result()
        if data is not None:
            data.result()

    def digests(self) -> tuple[str, str]:
        """Wait for the blocks still being hashed; then ``(full, data)`` as hex."""
        while self._pending:
            self._wait_oldest()
        return self.full.hexdigest(), self.data.hexdigest()


def read_into(header: SafetensorsHeader, targets: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """Read the whole file once: each named tensor converted into its ``targets`` tensor, every byte hashed.

    Returns ``(sha256 of the file, sha256 of its data buffer)`` (:func:`safetensors_hashes` of the very bytes that
    were converted). A target must hold as many elements as its tensor; its dtype (float32) and layout are the
    caller's: a view into a stacked buffer fills that buffer in place. Tensors are read in file order, in runs of
    about :data:`READ_BLOCK` bytes (one read and one hand-off to the hashing threads per run, not per tensor); the
    ones not named are only hashed. The byte ranges were checked by :func:`read_header`.
    """
    where = header.path.name
    if header.content is not None:  # read whole by read_header: convert and hash those bytes
        content = header.content
        for info in header.tensors.values():
            target = targets.get(info.name)
            if target is not None:
                _convert(content, header.data_start + info.begin, info, target)
        return _content_hashes(header.data_start, content)
    hasher = _Hasher(header.file_size)
    try:
        with header.path.open("rb") as fh:
            if os.fstat(fh.fileno()).st_size != header.file_size:
                raise LoraFormatError(f"{where}: the file changed while it was being read")
            head = fh.read(header.data_start)
            if len(head) != header.data_start:
                raise LoraFormatError(f"{where}: the file changed while it was being read")
            hasher.update(head, data=False)
            for run in _runs(sorted(header.tensors.values(), key=lambda t: t.begin), READ_BLOCK):
                first = run[0].begin
                blob = bytearray(run[-1].end - first)  # a fresh buffer: the hashing threads may still hold the last
                if fh.readinto(blob) != len(blob):
                    raise LoraFormatError(f"{where}: the file changed while it was being read")
                hasher.update(blob)
                for info in run:
                    target = targets.get(info.name)
                    if target is not None:
                        _convert(blob, info.begin - first, info, target)
            if fh.read(1):
                raise LoraFormatError(f"{where}: the file changed while it was being read")
    except OSError as exc:
        raise LoraFormatError(f"{where}: could not be read ({exc.strerror or type(exc).__name__})") from None
    finally:
        full, data = hasher.digests()
    return full, data


@dataclass(frozen=True)
class Run:
    """``count`` values of ``dtype`` at byte ``begin`` of the data buffer, bound for a flat target from ``at``."""

    begin: int
    dtype: str
    count: int
    at: int


def read_runs(header: SafetensorsHeader, target: torch.Tensor, runs: Sequence[Run]) -> tuple[str, str]:
    """:func:`read_into` for a file read whole (``header.content``) into one flat ``target``, a few runs at a time.

    Each run is one conversion, however many tensors it spans. The runs must lie inside the tensors of the validated
    header (the caller made them from its entries). Returns ``(sha256 of the file, sha256 of its data buffer)``.
    """
    content = header.content
    if content is None:
        raise ValueError("read_runs needs a header read whole (read_header's whole_under)")
    for run in runs:
        info = TensorInfo("", run.dtype, (run.count,), run.begin, run.begin + run.count * DTYPE_SIZES[run.dtype])
        _convert(content, header.data_start + run.begin, info, target[run.at : run.at + run.count])
    return _content_hashes(header.data_start, content)


def _content_hashes(data_start: int, content: bytearray) -> tuple[str, str]:
    with memoryview(content) as whole:
        return hashlib.sha256(whole).hexdigest(), hashlib.sha256(whole[data_start:]).hexdigest()


READ_BLOCK = 2**22  # bytes read (and handed to the hashing threads) at a time, in whole tensors


def _runs(infos: list[TensorInfo], block: int) -> list[list[TensorInfo]]:
    """Consecutive tensors (in file order) in runs of at most ``block`` bytes; a larger tensor is a run of its own."""
    runs: list[list[TensorInfo]] = []
    run: list[TensorInfo] = []
    size = 0
    for info in infos:
        if run and size + info.end - info.begin > block:
            runs.append(run)
            run, size = [], 0
        run.append(info)
        size += info.end - info.begin
    if run:
        runs.append(run)
    return runs


def _convert(blob: bytearray, offset: int, info: TensorInfo, target: torch.Tensor) -> None:
    """Convert ``info``'s bytes at ``blob[offset:]`` into ``target`` (its own dtype) in one pass."""
    dtype = _TORCH_DTYPES_BY_NAME[info.dtype]
    size = info.end - info.begin
    if size == 0:
        flat = torch.empty(0, dtype=dtype)
    elif offset % dtype.itemsize:  # misaligned for its dtype (a hostile layout): an aligned copy of its own
        flat = torch.frombuffer(bytearray(blob[offset : offset + size]), dtype=dtype)
    else:
        flat = torch.frombuffer(blob, dtype=dtype, count=size // dtype.itemsize, offset=offset)
    if target.numel() != flat.numel():
        raise ValueError(f"{info.name}: target of {target.numel()} elements for {flat.numel()} values")
    target.copy_(flat.view(target.shape))  # converts to the target's dtype in the same pass


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


def safetensors_hashes(path: str | os.PathLike[str], max_bytes: int, chunk: int = 2**20) -> tuple[str, str]:
    """``(sha256 of the whole file, sha256 of its data buffer)`` in one streamed pass; the file is size-checked.

    The second is the kohya-ss / A1111 "LoRA hash" (sd-scripts ``addnet_hash_safetensors``: skip the 8-byte header
    length ``n`` and the ``n`` header bytes, hash the rest), which stays the same when only ``__metadata__`` is
    edited. Raises :class:`LoraFormatError` for a file over ``max_bytes`` or too short for the header it claims.
    """
    where = Path(path).name
    full, data = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise LoraFormatError(f"{where}: file is {size:,} bytes, over the limit of {max_bytes:,}")
        prefix = fh.read(8)
        n = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or n > size - 8:
            raise LoraFormatError(f"{where}: truncated: no complete safetensors header to skip")
        full.update(prefix)
        left = n
        while left and (block := fh.read(min(chunk, left))):  # the header: in the file's hash only
            full.update(block)
            left -= len(block)
        while block := fh.read(chunk):
            full.update(block)
            data.update(block)
    return full.hexdigest(), data.hexdigest()
