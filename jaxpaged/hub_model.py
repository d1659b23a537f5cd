"""Hugging Face Hub model names (``org/name``) resolved to a local snapshot directory.

The local HF cache comes first (``HF_HOME`` / ``HF_HUB_CACHE`` layout, ``revision`` a branch, tag
or commit), so a cached model starts without network; a download is tried only when the cache
lacks it and ``HF_HUB_OFFLINE`` is not set. Only what the engine reads is fetched: configs,
safetensors weights and tokenizer files (never pickled ``.bin`` weights).
"""

from __future__ import annotations

import os
import re

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def looks_like_repo_id(name: str) -> bool:
    """``org/name`` that is not a path on this machine."""
    return bool(_REPO_ID.match(name)) and not os.path.exists(name) and ".." not in name


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or flag


def resolve_hub_model(repo_id: str, revision: str | None = None) -> str:
    """The snapshot directory of ``repo_id`` at ``revision`` (default branch when None)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    where = f"model {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=ALLOW_PATTERNS)
    except LocalEntryNotFoundError:
        if _offline():
            raise ValueError(f"{where} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                             "HF_HUB_OFFLINE is set, so it is not downloaded") from None
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise ValueError(f"{where} is neither in the local Hugging Face cache ({constants.HF_HUB_CACHE}) nor "
                         f"downloadable: {type(e).__name__}: {e}") from e
