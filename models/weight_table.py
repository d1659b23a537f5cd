"""HF checkpoint name → Flax parameter path tables, with explicit transforms (gpt-fast style).

Each model file declares a list of :class:`WeightRule`. A rule's ``pattern`` is a regular
expression matched against the full HF tensor name; ``targets`` are '/'-separated Flax parameter
paths (``\\1`` etc. refer to the pattern's groups); ``transform`` turns the HF array into one
array per target (e.g. a transpose, or a split of a packed QKV weight). ``targets=()`` means the
tensor is known and deliberately ignored (e.g. rotary ``inv_freq`` buffers).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import numpy as np

Transform = Callable[[np.ndarray, Any], "np.ndarray | tuple[np.ndarray, ...]"]


@dataclasses.dataclass(frozen=True)
class WeightRule:
    pattern: str
    targets: tuple[str, ...]
    transform: Transform | None = None

    def match(self, name: str) -> re.Match | None:
        return re.fullmatch(self.pattern, name)


def rule(pattern: str, *targets: str, transform: Transform | None = None) -> WeightRule:
    return WeightRule(pattern, tuple(targets), transform)


def transpose(x: np.ndarray, _config: Any = None) -> np.ndarray:
    """torch Linear [out, in] → Flax Dense kernel [in, out]."""
    return np.ascontiguousarray(x.T)


def identity(x: np.ndarray, _config: Any = None) -> np.ndarray:
    return x


def map_hf_name(
    table: Sequence[WeightRule], name: str, array: np.ndarray, config: Any
) -> list[tuple[tuple[str, ...], np.ndarray]] | None:
    """Applies the first matching rule. Returns [(param path, array)], [] if ignored, None if unknown."""
    for r in table:
        m = r.match(name)
        if m is None:
            continue
        if not r.targets:
            return []
        out = (r.transform or identity)(array, config)
        outs = out if isinstance(out, tuple) else (out,)
        if len(outs) != len(r.targets):
            raise ValueError(f"rule {r.pattern!r} produced {len(outs)} arrays for {len(r.targets)} targets")
        return [(tuple(m.expand(t).split("/")), a) for t, a in zip(r.targets, outs)]
    return None
