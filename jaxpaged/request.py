"""A request (one prompt) and its sequences (the completions drawn from it).

The scheduler works on sequences: each one has its own token history, its own KV block table in
the :class:`~jaxpaged.block_manager.BlockManager` and its own ``num_computed_tokens`` (how many of
its tokens already have keys/values in the cache). A request groups the sequences that share a
prompt - ``n`` parallel samples, ``best_of`` of which ``n`` are returned, or the beams of a beam
search - because they are admitted, preempted, swapped and aborted together: their KV blocks are
shared (the prompt is computed once and forked), so moving one without the others would either
break the sharing or strand blocks.

Nothing here touches JAX; it is plain host-side bookkeeping.
"""

from __future__ import annotations

import enum
import time
from typing import Any

from jaxpaged.prefix_cache import BlockKey


class SequenceStatus(enum.IntEnum):
    """Where a sequence is in its life. The FINISHED_* states map to vLLM's finish reasons."""

    WAITING = 0  # not admitted, preempted by recompute, or a sibling waiting for its prompt's fork
    RUNNING = 1  # admitted: its blocks are in the device pool
    SWAPPED = 2  # preempted by swapping: its blocks are in the host pool
    FINISHED_STOPPED = 3  # EOS, a stop token id, or a stop string
    FINISHED_LENGTH_CAPPED = 4  # max_tokens or max_model_len
    FINISHED_ABORTED = 5  # aborted by the caller
    FINISHED_ERROR = 6  # a step failed because of this request (the engine went on without it)

    @property
    def is_finished(self) -> bool:
        return self >= SequenceStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        """vLLM's ``CompletionOutput.finish_reason`` string, or None while unfinished."""
        return _FINISH_REASONS.get(self)

    @staticmethod
    def from_finish_reason(reason: str) -> "SequenceStatus":
        """The FINISHED_* status for "stop", "length" or "abort" (ValueError otherwise)."""
        for status, name in _FINISH_REASONS.items():
            if name == reason:
                return status
        raise ValueError(f"finish reason must be one of {sorted(_FINISH_REASONS.values())}, got {reason!r}")


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH_CAPPED: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
    SequenceStatus.FINISHED_ERROR: "error",
}


class Sequence:
    """One completion: the prompt (shared with its siblings, never copied) plus its own output.

    ``num_computed_tokens`` counts the leading tokens whose keys/values are in the KV cache. A
    running sequence always has ``num_computed_tokens < num_tokens``: the tokens in between are what
    the next step must compute (a prefill chunk, or exactly the last sampled token when decoding).
    After a recompute preemption it drops to 0 and prompt + output are recomputed as one prefill,
    which is how the sampled tokens survive the loss of their cache.

    With async scheduling, ``num_pending_tokens`` counts tokens sampled by a step still in flight:
    they are not in ``output_token_ids`` yet, but the next step already computes them (its input
    id is taken from the previous step's sampled tokens on the device).
    """

    def __init__(self, seq_id: int, index: int, request_id: str, prompt_token_ids: list[int]) -> None:
        self.seq_id = seq_id
        self.index = index  # position among the request's n sequences (CompletionOutput.index)
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[float] = []  # logprob of each sampled token
        self.output_top_logprobs: list[Any] = []  # whatever the runner returned as top-k, per token
        self.cumulative_logprob = 0.0
        self.num_computed_tokens = 0
        self.num_pending_tokens = 0
        self.status = SequenceStatus.WAITING
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        self.block_keys: list[BlockKey] = []  # prefix-cache keys of its full blocks so far

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def get_token_ids(self) -> list[int]:
        """Prompt followed by output (a new list)."""
        return list(self.prompt_token_ids) + self.output_token_ids

    def get_token_ids_range(self, start: int, end: int) -> list[int]:
        """Tokens at positions ``[start, end)`` without concatenating the whole history (decode
        steps ask for one token of a possibly long sequence every step)."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return list(self.prompt_token_ids[start:end])
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return list(self.prompt_token_ids[start:]) + self.output_token_ids[: end - p]

    def take_history_of(self, other: "Sequence") -> None:
        """Becomes a copy of ``other`` (a beam that continues another beam): same output tokens,
        logprobs, cached-token count and block keys. Its blocks are the caller's business."""
        self.output_token_ids = list(other.output_token_ids)
        self.output_logprobs = list(other.output_logprobs)
        self.output_top_logprobs = list(other.output_top_logprobs)
        self.cumulative_logprob = other.cumulative_logprob
        self.num_computed_tokens = other.num_computed_tokens
        self.num_pending_tokens = other.num_pending_tokens
        self.block_keys = list(other.block_keys)
        self.status = other.status

    def append_token(self, token_id: int, logprob: float = 0.0, top_logprobs: Any = None) -> None:
        self.output_token_ids.append(int(token_id))
        self.output_logprobs.append(float(logprob))
        self.output_top_logprobs.append(top_logprobs)
        self.cumulative_logprob += float(logprob)

    def __repr__(self) -> str:
        return (
            f"Sequence(seq_id={self.seq_id}, status={self.status.name}, num_tokens={self.num_tokens}, "
            f"num_computed_tokens={self.num_computed_tokens})"
        )


class Request:
    """A prompt and its sequences: ``sampling_params.best_of`` of them when set (``n`` are
    returned, the best by cumulative logprob), else ``n`` (parallel samples, or the beam width of
    a beam search).

    Sequence ids are ``first_seq_id .. first_seq_id + num_seqs - 1``; the caller (the engine) owns
    the counter so that ids stay unique across requests without any module-level state.

    ``sampling_params`` is duck-typed: the scheduler reads ``n``, ``max_tokens`` (None: up to
    max_model_len), ``min_tokens``, ``ignore_eos``, ``stop_token_ids`` and, if present,
    ``best_of``, ``use_beam_search`` and ``prompt_logprobs``.

    With several sequences only sequence 0 computes the prompt; the others wait (status WAITING,
    no blocks) until the scheduler forks them from sequence 0 - in the step that completes the
    prompt, or for a beam search in the first beam step - so the prompt's KV blocks are computed
    once and shared (``forked`` records that this happened).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: Any,
        first_seq_id: int,
        prompt: str | None = None,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
    ) -> None:
        n = getattr(sampling_params, "n", 1)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        num_seqs = getattr(sampling_params, "best_of", None) or n
        if not isinstance(num_seqs, int) or num_seqs < n:
            raise ValueError(f"best_of must be an integer >= n ({n}), got {num_seqs!r}")
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = [int(t) for t in prompt_token_ids]
        self.sampling_params = sampling_params
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.seqs = [
            Sequence(first_seq_id + i, i, request_id, self.prompt_token_ids) for i in range(num_seqs)
        ]
        self.num_returned = n  # outputs handed back (the best n of best_of)
        self.forked = num_seqs == 1  # a single sequence has nothing to fork
        self.cache_salt = cache_salt  # prefix-cache namespace: only requests with the same salt share
        self.num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at admission
        self.beam_search: Any = None  # the scheduler's BeamSearchState for a beam-search request
        # The scheduler stops asking for prompt logprobs once the prompt has been computed (a
        # recompute after preemption does not ask again); the output processor keeps them.
        self.prompt_logprobs_done = False
        # Timestamps for RequestMetrics (time.time()); set by the scheduler.
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None

    @property
    def n(self) -> int:
        """Sequences the request runs (``best_of`` when set, else ``n``)."""
        return len(self.seqs)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def get_seqs(self, status: SequenceStatus | None = None) -> list[Sequence]:
        if status is None:
            return list(self.seqs)
        return [s for s in self.seqs if s.status == status]

    def unfinished_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    def active_seqs(self) -> list[Sequence]:
        """Unfinished sequences that compute on their own: before the fork, only sequence 0."""
        if self.forked:
            return self.unfinished_seqs()
        return [s for s in self.seqs[:1] if not s.is_finished]

    def __repr__(self) -> str:
        return f"Request(request_id={self.request_id!r}, n={self.n}, num_prompt_tokens={self.num_prompt_tokens})"
