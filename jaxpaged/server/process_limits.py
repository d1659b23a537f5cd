"""Process limits a server needs raised: open files (one socket per connected client)."""

from __future__ import annotations

import logging
import resource

logger = logging.getLogger("jaxpaged.serve")


def raise_open_files_limit(target: int = 65535) -> int:
    """Raises this process's soft limit on open files towards ``target`` (within the hard limit),
    as vLLM's server does: each streaming client holds a socket, and a soft limit of 1024 (a common
    default) is reached by a benchmark's 1000 concurrent requests. Returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open files limit from %d to %d: %s", soft, wanted, exc)
    return soft
