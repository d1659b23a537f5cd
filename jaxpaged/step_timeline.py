"""``StepTimeline``: where an engine step's wall time goes, per phase and per bucket.

Off by default (a disabled timeline's ``mark`` returns at once). When on (``LLMEngine.timeline
.enable()``), every ``step()`` records the wall time of its phases — ``schedule``, ``dispatch``
(block moves, packing, enqueueing the device work; split into ``dispatch.*`` parts by the runner),
``wait`` (blocking on the device for the
results: with async scheduling, the part of the device step the host did not overlap), ``process``
(scheduler update and output building) — under the label of the bucket it ran ("256d": a decode-only
step of 256 rows; "512": a mixed step of 512 tokens). ``summary()`` groups them per label, which is
the per-step timeline benchmarks/throughput.py prints (figures in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import collections
import time

PHASES = ("schedule", "dispatch", "wait", "process")


class StepTimeline:
    def __init__(self) -> None:
        self.enabled = False
        self._last = 0.0
        self._current: dict[str, float] = {}
        self._totals: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))

    def enable(self) -> None:
        self.enabled = True
        self.reset()

    def reset(self) -> None:
        self._totals.clear()

    def start(self) -> None:
        if self.enabled:
            self._last = time.perf_counter()
            self._current = {}

    def mark(self, phase: str) -> None:
        """Adds the time since the previous mark (or ``start``) to ``phase``."""
        if self.enabled:
            now = time.perf_counter()
            self._current[phase] = self._current.get(phase, 0.0) + now - self._last
            self._last = now

    def end(self, label: str | None, num_tokens: int = 0, num_padded_tokens: int = 0) -> None:
        if not self.enabled or label is None:
            return
        totals = self._totals[label]
        totals["steps"] += 1
        totals["tokens"] += num_tokens
        totals["padded_tokens"] += num_padded_tokens
        for phase, seconds in self._current.items():
            totals[phase] += seconds
            totals["wall"] += seconds

    def summary(self) -> dict[str, dict[str, float]]:
        """Per bucket label: steps, total seconds per phase and in all (``wall``), mean ms per step."""
        out = {}
        for label, totals in sorted(self._totals.items(), key=lambda kv: -kv[1]["wall"]):
            row = dict(totals)
            steps = max(1.0, totals["steps"])
            for phase in {*PHASES, "wall", *totals} - {"steps", "tokens", "padded_tokens"}:
                row[f"{phase}_ms_per_step"] = 1e3 * totals.get(phase, 0.0) / steps
            out[label] = row
        return out
