"""The Hugging Face Hub: fetch an adapter repository's safetensors and JSON files (or find them in the cache).

The only module that imports ``huggingface_hub``. With ``HF_HUB_OFFLINE=1`` (set before import) it reads the local
cache only. Which file of a fetched snapshot is the LoRA is decided by :func:`lol_engine.lora.locate.locate_lora`,
as for any folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lol_engine.errors import BadRequestError, NotFoundError

__all__ = ["REPO_ID", "fetch_repo", "is_repo_id"]

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MAX_REPO_ID = 96


def is_repo_id(text: str) -> bool:
    """Whether ``text`` reads as a Hub repo id ``owner/name``."""
    return len(text) <= MAX_REPO_ID and REPO_ID.match(text) is not None


def fetch_repo(repo_id: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download (or, with ``HF_HUB_OFFLINE=1``, find in the cache) a Hub repo's safetensors and JSON files.

    Raises :class:`BadRequestError` for text that is not a repo id and :class:`NotFoundError` when the repo cannot be
    fetched (network, offline mode without a cached copy, missing or private repo), naming the reason's type only.
    """
    if not is_repo_id(repo_id):
        raise BadRequestError(f"{repo_id[:100]!r} is not a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download

    cache = None if cache_dir is None else str(cache_dir)
    try:
        folder = snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json"], cache_dir=cache)
    except Exception as exc:  # network, offline mode, missing repo: one clear message, no server detail
        raise NotFoundError(f"could not fetch {repo_id} from the Hugging Face Hub: {_why(exc)}") from None
    return Path(folder)


def _why(exc: Exception) -> str:
    """Why a fetch failed, in words a user can act on (the most specific reason first; never a path or URL)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return "the repo is gated: its terms must be accepted on the Hub and the server given a token"
    if isinstance(exc, RepositoryNotFoundError):
        return "no such repo on the Hub, or it is private"
    if isinstance(exc, RevisionNotFoundError):
        return "the repo has no such revision"
    if isinstance(exc, LocalEntryNotFoundError) or constants.HF_HUB_OFFLINE:
        why = "this server works offline (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else "the Hub did not answer"
        return f"{why} and the repo is not in its local cache; upload the adapter's files instead"
    if isinstance(exc, OSError):
        return f"the download failed ({type(exc).__name__}); try again, or upload the adapter's files"
    return f"the download failed ({type(exc).__name__})"
