"""One error tree. Every refusal the user can act on is a :class:`LolError` of one of four kinds.

- :class:`LoraFormatError` (``bad file``): a LoRA file, folder or ``adapter_config.json`` cannot be read;
- :class:`BadRequestError` (``bad request``): nothing uploaded, two LoRAs needed, an empty selection, a bad setting;
- :class:`NotFoundError` (``not found``): a LoRA, map, embedding or data source is not there;
- :class:`StoreError` (``store``): the collection database cannot be opened or written.

The message is for the user: it says what is wrong and what to do. The app shows :class:`LolError` messages (server
paths cut) and the CLI prints them as one ``error:`` line (exit status 2); anything else is a bug, which the app
logs with an id and shows as an internal error with that id. Each kind also derives from the builtin exception
that callers caught before the tree existed (``ValueError``, ``KeyError``, ``RuntimeError``), so ``except
ValueError`` around a read still works.
"""

from __future__ import annotations

__all__ = ["BadRequestError", "LolError", "LoraFormatError", "NotFoundError", "StoreError"]


class LolError(Exception):
    """Base of every refusal the user can act on; ``kind`` names which (see the module)."""

    kind = "error"

    def __str__(self) -> str:  # KeyError would quote its message; every kind prints it as written
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class LoraFormatError(LolError, ValueError):
    """A LoRA file or folder was refused; the message says what is wrong and where.

    Raised for every bad input: pickles, oversized or truncated files, malformed headers, unsupported
    LoRA variants (LoHa, LoKr, OFT, IA3, full), missing factors, mismatched shapes and non-finite values.
    """

    kind = "bad file"


class BadRequestError(LolError, ValueError):
    """A request that cannot be done as asked: nothing uploaded, an empty selection, a setting out of range."""

    kind = "bad request"


class NotFoundError(LolError, KeyError):
    """Something named is not there: a LoRA not in the collection, an encoder without embeddings, a data source."""

    kind = "not found"


class StoreError(LolError, RuntimeError):
    """The collection database could not be opened or written; the message says why and what to do.

    Raised for a corrupt or foreign file, a database held by another process, a path that cannot hold one, a
    database written by a newer release, and a write that failed (full disk, read-only file system). A failed write
    stores nothing of the LoRA being added.
    """

    kind = "store"
