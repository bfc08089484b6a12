"""The exception types: one for every refusal to read a LoRA file, one for a collection database that fails."""

from __future__ import annotations

__all__ = ["LoraFormatError", "StoreError"]


class LoraFormatError(ValueError):
    """A LoRA file or folder was refused; the message says what is wrong and where.

    Raised for every bad input: pickles, oversized or truncated files, malformed headers, unsupported
    LoRA variants (LoHa, LoKr, OFT, IA3, full), missing factors, mismatched shapes and non-finite values.
    """


class StoreError(RuntimeError):
    """The collection database could not be opened or written; the message says why and what to do.

    Raised for a corrupt or foreign file, a database held by another process, a path that cannot hold one, and a
    write that failed (full disk, read-only file system). A failed write stores nothing of the LoRA being added.
    """
