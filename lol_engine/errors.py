"""The one exception type for every refusal to read a LoRA file."""

from __future__ import annotations

__all__ = ["LoraFormatError"]


class LoraFormatError(ValueError):
    """A LoRA file or folder was refused; the message says what is wrong and where.

    Raised for every bad input: pickles, oversized or truncated files, malformed headers, unsupported
    LoRA variants (LoHa, LoKr, OFT, IA3, full), missing factors, mismatched shapes and non-finite values.
    """
