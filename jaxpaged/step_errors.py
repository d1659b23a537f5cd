"""What a failed step raises, and how the engine tells a request's fault from its own.

Policy (the engine's containment, see ``LLMEngine.step``): a step that raises
``SequenceError`` failed because of the named sequences' inputs — the engine finishes their
requests with ``finish_reason="error"`` and serves everyone else. Any other exception in a step is
blamed on the step's whole batch. ``EngineDeadError`` is the one that is not contained: the engine
cannot serve anything any more (the KV pool could not be rebuilt, or steps keep failing after
every recovery), and whoever runs it should stop and be restarted.
"""

from __future__ import annotations

from collections.abc import Iterable


class SequenceError(Exception):
    """A step failed because of the inputs of specific sequences (``seq_ids``)."""

    def __init__(self, seq_ids: Iterable[int], cause: BaseException) -> None:
        self.seq_ids = sorted(set(seq_ids))
        self.cause = cause
        super().__init__(f"sequences {self.seq_ids}: {type(cause).__name__}: {cause}")


class EngineDeadError(RuntimeError):
    """The engine cannot go on serving (device lost, pool unrecoverable, repeated failures)."""
