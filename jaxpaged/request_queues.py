"""The requests a scheduler holds, by state - the waiting, running and swapped queues - with what
moves them in and out outside of scheduling: admission (every check a request must pass to be
queued), abort, failure, reset for recompute after a failed step, and finishing, which frees the
sequence's blocks. The policy that moves requests between the queues each step is
``scheduler.py``'s (its ``Scheduler`` extends this class).

Pure Python; no JAX.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from jaxpaged.beam_search import BeamSearchState
from jaxpaged.block_manager import BlockManager
from jaxpaged.kv_cache_manager import KVCacheManager
from jaxpaged.request import Request, Sequence, SequenceStatus


class RequestQueues:
    """Unfinished requests and their sequences, by queue (see module docstring).

    Args:
        block_manager: the KV block pools (a finished or reset sequence's blocks go back there).
        max_num_seqs: most sequences a request may run (its ``n`` or ``best_of``).
        max_model_len: longest sequence (prompt + output).
        eos_token_id: the model's EOS id(s) (int or list, as HF configs give it), or None.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_model_len: int,
                 eos_token_id: int | Iterable[int] | None = None) -> None:
        self.block_manager = block_manager
        self.kv = KVCacheManager(block_manager)
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        if eos_token_id is None:
            self.eos_token_ids: frozenset[int] = frozenset()
        elif isinstance(eos_token_id, int):
            self.eos_token_ids = frozenset([eos_token_id])
        else:
            self.eos_token_ids = frozenset(int(t) for t in eos_token_id)
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._seqs: dict[int, Sequence] = {}
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # admission order: the tail is the next preemption victim
        self._swapped: list[Request] = []  # FCFS by add order
        self._order: dict[str, int] = {}  # add order, to keep the swapped queue FCFS
        self._next_order = 0

    def add_request(self, request: Request) -> None:
        """Queues a request; ValueError (naming the field) if it could never be served."""
        rid, p = request.request_id, request.num_prompt_tokens
        if rid in self._requests:
            raise ValueError(f"request_id {rid!r} is already in use")
        if p == 0:
            raise ValueError("prompt_token_ids must not be empty")
        if p > self.max_model_len:
            raise ValueError(f"prompt_token_ids has {p} tokens, more than max_model_len ({self.max_model_len})")
        if request.n > self.max_num_seqs:
            field = "best_of" if request.n > request.num_returned else "n"
            raise ValueError(f"{field} ({request.n}) must be <= max_num_seqs ({self.max_num_seqs})")
        for s in request.seqs:
            if s.seq_id in self._seqs:
                raise ValueError(f"seq_id {s.seq_id} is already in use")
        # A request must fit the pool on its own, with no sharing (a recompute after the fork
        # recomputes each sequence separately); otherwise it would preempt itself forever.
        max_tokens = getattr(request.sampling_params, "max_tokens", None)
        final_len = max(self.max_model_len, p + 1) if max_tokens is None else min(p + max_tokens, max(self.max_model_len, p + 1))
        # The last token of a finished sequence is never written to the cache.
        need = request.n * self.block_manager.num_blocks_for(final_len - 1)
        if need > self.block_manager.num_device_blocks:
            raise ValueError(
                f"request {rid!r} needs up to {need} KV blocks (n={request.n}, prompt_token_ids {p} tokens, "
                f"max_tokens {max_tokens}) but the pool has {self.block_manager.num_device_blocks}; "
                "lower max_tokens or n, or give the KV cache more memory")
        params = request.sampling_params
        if getattr(params, "use_beam_search", False):
            stop_ids = frozenset(getattr(params, "stop_token_ids", None) or ())
            request.beam_search = BeamSearchState(
                request.n, params.length_penalty, params.early_stopping, final_len - p,
                frozenset() if params.ignore_eos else self.eos_token_ids, stop_ids - self.eos_token_ids)
        self._requests[rid] = request
        self._order[rid] = self._next_order
        self._next_order += 1
        for s in request.seqs:
            self._seqs[s.seq_id] = s
        self._waiting.append(request)

    def abort_request(self, request_id: str) -> Request | None:
        """Finishes every unfinished sequence of the request with "abort" and frees its blocks, in
        any state. Returns the request, or None if it is unknown or already finished."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        for s in req.unfinished_seqs():
            self._finish(s, SequenceStatus.FINISHED_ABORTED, None)
        return req

    def fail_request(self, request_id: str) -> Request | None:
        """Finishes every unfinished sequence of the request with "error" (a step failed because
        of it) and frees its blocks. Returns the request, or None if unknown or finished."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        for s in req.unfinished_seqs():
            self._finish(s, SequenceStatus.FINISHED_ERROR, None)
        return req

    def reset_requests(self, request_ids: Iterable[str]) -> None:
        """Sends requests back to the front of the waiting queue (in admission order) with no
        blocks, as a recompute preemption does, outside any step: their generated tokens stay and
        are recomputed with the prompt. The engine calls it for the innocent requests of a step
        that failed, whose cache writes and sampled tokens may or may not have happened."""
        reqs = [self._requests[rid] for rid in set(request_ids) if rid in self._requests]
        for req in sorted(reqs, key=lambda r: self._order[r.request_id], reverse=True):
            for queue in (self._running, self._swapped):
                if req in queue:
                    queue.remove(req)
            for s in req.unfinished_seqs():
                self.block_manager.free(s.seq_id)
                s.num_computed_tokens = 0
                s.num_pending_tokens = 0
                s.status = SequenceStatus.WAITING
            if req.beam_search is not None:
                req.beam_search.drop_candidates([s.seq_id for s in req.seqs])
            if req in self._waiting:
                self._waiting.remove(req)
            self._waiting.appendleft(req)

    def request_of(self, seq_id: int) -> Request | None:
        """The unfinished request that owns a sequence."""
        seq = self._seqs.get(seq_id)
        return None if seq is None else self._requests.get(seq.request_id)

    def requests_with_device_blocks(self) -> list[Request]:
        return [r for r in self._requests.values()
                if any(self.block_manager.has_device_blocks(s.seq_id) for s in r.seqs)]

    def finish_sequence(self, seq_id: int, reason: str, stop_reason: int | str | None = None) -> None:
        """Finishes one sequence from outside (the engine's stop-string check): reason is "stop",
        "length" or "abort". A no-op for an unknown or already finished sequence."""
        status = SequenceStatus.from_finish_reason(reason)
        seq = self._seqs.get(seq_id)
        if seq is not None and not seq.is_finished:
            self._finish(seq, status, stop_reason)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def _num_running_seqs(self) -> int:
        return sum(len(r.unfinished_seqs()) for r in self._running)


    def _check_stop(self, seq: Sequence, req: Request) -> None:
        params = req.sampling_params
        token = seq.last_token_id
        if seq.num_output_tokens >= (getattr(params, "min_tokens", 0) or 0):
            if not getattr(params, "ignore_eos", False) and token in self.eos_token_ids:
                return self._finish(seq, SequenceStatus.FINISHED_STOPPED, None)
            if token in (getattr(params, "stop_token_ids", None) or ()):
                return self._finish(seq, SequenceStatus.FINISHED_STOPPED, token)
        max_tokens = getattr(params, "max_tokens", None)
        if (max_tokens is not None and seq.num_output_tokens >= max_tokens) or seq.num_tokens >= self.max_model_len:
            self._finish(seq, SequenceStatus.FINISHED_LENGTH_CAPPED, None)

    def _finish(self, seq: Sequence, status: SequenceStatus, stop_reason: int | str | None) -> None:
        seq.status = status
        seq.stop_reason = stop_reason
        self.block_manager.free(seq.seq_id)
        req = self._requests[seq.request_id]
        if not req.is_finished():
            return
        req.finished_time = time.time()
        del self._requests[req.request_id]
        del self._order[req.request_id]
        for s in req.seqs:
            del self._seqs[s.seq_id]
        for queue in (self._running, self._swapped, self._waiting):
            if req in queue:
                queue.remove(req)
