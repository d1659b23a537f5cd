"""Where jaxpaged keeps what it builds or fetches on first use (default models, GGUF side files)."""

from __future__ import annotations

import os


def cache_root() -> str:
    """``$JAXPAGED_CACHE``, else ``~/.cache/jaxpaged``."""
    return os.environ.get("JAXPAGED_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxpaged")
