"""Iteration-level scheduling: which sequences advance by how many tokens in the next step.

Every step the scheduler hands the model runner one ragged batch (:class:`SchedulerOutput`) in
which prefill chunks and decode tokens sit side by side; a sequence's ``num_computed_tokens``
catches up with its ``num_tokens`` a chunk at a time, and once it has caught up the row's last
logits are sampled. Requests join and leave between any two steps (continuous batching), so a
finished request's slot is refilled at once instead of idling until the whole batch drains.

Order within a step, against a budget of ``max_num_batched_tokens`` tokens and ``max_num_seqs``
sequences: (1) running requests that only decode, oldest first - their latency is what users see,
and each needs one token; (2) running requests still in their prompt, oldest first, with whatever
budget is left (chunked prefill: a long prompt advances in chunks instead of stalling decodes);
(3) swapped requests, brought back before (4) waiting requests are admitted in FCFS order.

When the device pool runs out, the most recently admitted running request is preempted (the one
that has made the least progress and whose loss costs least): ``"recompute"`` frees its blocks and
sends it to the front of the waiting queue, where prompt + generated tokens are recomputed as one
prefill; ``"swap"`` copies its blocks to the host pool and brings them back before any new
admission (falling back to recompute when the host pool is full). A request already given work in
this step is never preempted in the same step (its row would have to be unwound), so a prefill that
finds no blocks shrinks its chunk to what fits or waits a step instead.

Sharing (``kv_cache_manager.py``): an admitted sequence starts from its longest cached prefix
(prefix caching), the blocks a step filled are registered once it has finished, parallel samples
fork the prompt's blocks when it completes, and a beam search's beams are the request's sequences,
reassigned after every step by ``beam_search.py`` (forks and frees, copy-on-write on the shared
last block). A request with ``best_of`` runs ``best_of`` sequences; the output side returns the
best ``n``.

Pure Python; no JAX.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from jaxpaged.beam_search import assign_beams
from jaxpaged.block_manager import BlockManager
from jaxpaged.request import Request, Sequence, SequenceStatus
from jaxpaged.request_queues import RequestQueues
from jaxpaged.scheduler_output import PENDING_TOKEN, SamplingRow, ScheduledSequence, SchedulerOutput, SchedulerStats


class _Step:
    """Scratch state of one ``schedule()`` call."""

    def __init__(self, token_budget: int) -> None:
        self.token_budget = token_budget
        self.out = SchedulerOutput()
        self.touched: set[str] = set()  # requests given a row (never preempted this step)
        self.preempted: set[str] = set()


class Scheduler(RequestQueues):
    """Continuous-batching scheduler over a :class:`BlockManager` (see module docstring); the
    queues it moves requests between, and admission, are :class:`RequestQueues`'.

    Args:
        block_manager: the KV block pools.
        max_num_seqs: most unfinished sequences in running requests (a request with n samples
            counts n from admission, so its fork never overflows the batch).
        max_num_batched_tokens: most tokens computed in one step.
        max_model_len: longest sequence (prompt + output); reaching it finishes with "length".
        preemption_mode: "recompute" or "swap" (needs host blocks).
        enable_chunked_prefill: split prompts across steps; without it a prompt runs whole, so
            ``max_num_batched_tokens`` must be at least ``max_model_len``.
        eos_token_id: the model's EOS id(s) (int or list, as HF configs give it), or None.
        async_scheduling: ``schedule()`` may run while the previous step is still on the device.
            It then advances ``num_computed_tokens`` itself and counts each sampled row's token
            as pending (``Sequence.num_pending_tokens``); the next step computes that token from
            a placeholder (``PENDING_TOKEN``) the runner resolves on the device, and
            ``update_from_output`` only appends tokens and checks stops.
    """

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        preemption_mode: str = "recompute",
        enable_chunked_prefill: bool = True,
        eos_token_id: int | Iterable[int] | None = None,
        async_scheduling: bool = False,
    ) -> None:
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                            ("max_model_len", max_model_len)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs ({max_num_seqs})")
        if not enable_chunked_prefill and max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_model_len ({max_model_len}) "
                "when enable_chunked_prefill is False")
        if preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {preemption_mode!r}")
        if preemption_mode == "swap" and block_manager.num_host_blocks == 0:
            raise ValueError("preemption_mode='swap' needs swap space (num_host_blocks > 0)")
        super().__init__(block_manager, max_num_seqs, max_model_len, eos_token_id)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.enable_chunked_prefill = enable_chunked_prefill
        self.async_scheduling = async_scheduling
        self.num_preemptions = 0

    def reset_prefix_cache(self) -> int:
        """Forgets every cached prefix (blocks in use stay with their sequences)."""
        return self.kv.reset_prefix_cache()

    def get_stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            prefix_cache_queries=self.kv.stats.queries,
            prefix_cache_hits=self.kv.stats.hits,
            num_used_blocks=bm.get_num_used_blocks(),
            num_logical_blocks=bm.get_num_logical_blocks(),
            num_running_reqs=len(self._running),
            num_waiting_reqs=len(self._waiting),
            num_swapped_reqs=len(self._swapped),
            num_running_seqs=self._num_running_seqs(),
            num_preemptions=self.num_preemptions,
            kv_cache_usage=bm.get_usage(),
            num_free_blocks=bm.get_num_free_blocks(),
            num_kv_cache_tokens=sum(s.num_computed_tokens for s in self._seqs.values() if bm.has_device_blocks(s.seq_id)),
        )

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        """Picks the next step's work (see module docstring for the order)."""
        step = _Step(self.max_num_batched_tokens)
        for decode_phase in (True, False):  # (1) then (2)
            # touched: a fork in (1) turns a request into a non-decoding one; once a step is enough
            for req in [r for r in self._running
                        if r.request_id not in step.touched and self._is_decoding(r) == decode_phase]:
                if req.request_id not in step.preempted and step.token_budget > 0:
                    self._schedule_running(req, step, allow_preempt=True)
        if not step.preempted:  # (3) a step that had to preempt has no room to bring anyone back
            self._schedule_swapped(step)
        if not step.preempted and not self._swapped:  # (4) swapped requests go first
            self._schedule_waiting(step)
        step.out.num_batched_tokens = self.max_num_batched_tokens - step.token_budget
        return step.out

    @staticmethod
    def _remaining(s: Sequence) -> int:
        """Tokens the sequence still has to compute (pending ones included)."""
        return s.num_tokens + s.num_pending_tokens - s.num_computed_tokens

    def _is_decoding(self, req: Request) -> bool:
        if len(req.seqs) == 1:  # the common case, without building the active list
            s = req.seqs[0]
            return s.is_finished or self._remaining(s) == 1
        return all(self._remaining(s) == 1 for s in req.active_seqs())

    def _finishes_when_pending_lands(self, s: Sequence, req: Request) -> bool:
        """A pending token that reaches max_tokens or max_model_len ends the sequence for sure:
        computing it would be wasted work."""
        if not s.num_pending_tokens:
            return False
        max_tokens = getattr(req.sampling_params, "max_tokens", None)
        n_out = s.num_output_tokens + s.num_pending_tokens
        return (max_tokens is not None and n_out >= max_tokens) or s.num_tokens + s.num_pending_tokens >= self.max_model_len

    def _chunk(self, remaining: int, budget: int) -> int:
        """Tokens of ``remaining`` that one step computes within ``budget``."""
        return min(remaining, budget) if self.enable_chunked_prefill else (remaining if remaining <= budget else 0)

    def _plan(self, req: Request, budget: int) -> list[tuple[Sequence, int]]:
        """Tokens each active sequence would compute within ``budget``, before checking blocks."""
        plan = []
        for s in req.active_seqs():
            if self._finishes_when_pending_lands(s, req):
                continue
            k = self._chunk(self._remaining(s), budget)
            if k > 0:
                plan.append((s, k))
                budget -= k
        return plan

    def _schedule_running(self, req: Request, step: _Step, allow_preempt: bool) -> None:
        bm = self.block_manager
        plan = self._plan(req, step.token_budget)
        if not plan:
            return
        need = bm.get_num_blocks_to_append_many([(s.seq_id, s.num_computed_tokens, k) for s, k in plan])
        while allow_preempt and need > bm.get_num_free_blocks():
            victim = self._running[-1]
            if victim is req:
                if self._is_decoding(req):  # a decode cannot shrink: give way entirely
                    self._preempt(req, step)
                    return
                break  # a prefill shrinks or waits; older requests will preempt it if they must
            if victim.request_id in step.touched:
                break
            self._preempt(victim, step)
        if need <= bm.get_num_free_blocks():  # counted together above: every planned append fits
            for s, k in plan:
                self._schedule_seq(req, s, k, step)
            return
        for s, k in plan:
            if not bm.can_append_slots(s.seq_id, s.num_computed_tokens, k):
                if k == 1 or not self.enable_chunked_prefill:
                    continue
                k = bm.get_num_appendable_tokens(s.seq_id, s.num_computed_tokens, k)
                if k == 0:
                    continue
            self._schedule_seq(req, s, k, step)

    def _schedule_seq(self, req: Request, seq: Sequence, k: int, step: _Step) -> None:
        # Runs once per scheduled sequence per step (512 times a step at max_num_seqs=512): locals
        # instead of repeated attribute lookups (benchmarks/tools/scheduler_host.py).
        bm = self.block_manager
        sid = seq.seq_id
        start = seq.num_computed_tokens
        end = start + k
        if bm.has_device_blocks(sid):
            copies = bm.append_slots(sid, start, k)
            if copies:
                step.out.blocks_to_copy.extend(copies)
        else:
            bm.allocate(sid, end)
        num_known = seq.num_tokens
        sample: list[int] = []
        if end == num_known + seq.num_pending_tokens:
            sample = [sid]
            # The prompt completes this step: share it with the siblings (beams fork in the first
            # beam step instead, once they know which tokens continue it).
            if not req.forked and req.beam_search is None:
                for sib in req.seqs[1:]:
                    if not sib.is_finished:
                        self.kv.fork(seq, sib)
                        sib.status = SequenceStatus.RUNNING
                        sample.append(sib.seq_id)
                req.forked = True
        params = req.sampling_params
        want_pl = (seq.index == 0 and start < req.num_prompt_tokens and not req.prompt_logprobs_done
                   and getattr(params, "prompt_logprobs", None) is not None)
        known = min(end, num_known)
        token_ids = seq.get_token_ids_range(start, known)
        if end > known:
            token_ids = token_ids + [PENDING_TOKEN] * (end - known)
        seqs = self._seqs
        rows = [SamplingRow(params, s.prompt_token_ids, s.output_token_ids, s.index) for s in (seqs[i] for i in sample)]
        step.out.scheduled.append(ScheduledSequence(
            seq_id=sid,
            token_ids=token_ids,
            num_computed_tokens=start,
            block_table=bm.get_block_table(sid),
            sample_seq_ids=sample,
            want_prompt_logprobs=want_pl,
            sample_rows=rows,
            prompt_token_ids=seq.prompt_token_ids,
        ))
        if self.async_scheduling:  # the step is committed: later schedules build on it at once
            seq.num_computed_tokens = end
            for i in sample[1:]:  # forked siblings share this row's cache
                seqs[i].num_computed_tokens = end
            if req.beam_search is None:  # a beam's next token is chosen on the host, not pending
                for i in sample:
                    seqs[i].num_pending_tokens += 1
        step.token_budget -= k
        step.touched.add(req.request_id)
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.time()

    def _preempt(self, req: Request, step: _Step) -> None:
        bm = self.block_manager
        self._running.remove(req)
        self.num_preemptions += 1
        step.preempted.add(req.request_id)
        seqs = [s for s in req.unfinished_seqs() if bm.has_device_blocks(s.seq_id)]
        ids = [s.seq_id for s in seqs]
        step.out.preempted_seq_ids.extend(ids)
        if self.preemption_mode == "swap" and ids and bm.can_swap_out(ids):
            step.out.blocks_to_swap_out.extend(bm.swap_out(ids))
            for s in req.active_seqs():  # those not yet given blocks simply wait with the rest
                s.status = SequenceStatus.SWAPPED if s.seq_id in ids else SequenceStatus.WAITING
            self._swapped.append(req)
            self._swapped.sort(key=lambda r: self._order[r.request_id])
            return
        for s in req.unfinished_seqs():
            bm.free(s.seq_id)
            s.num_computed_tokens = 0
            s.status = SequenceStatus.WAITING
        if req.beam_search is not None:  # recomputed beams return their candidates again
            req.beam_search.drop_candidates([s.seq_id for s in req.seqs])
        self._waiting.appendleft(req)  # preempted requests resume before new ones

    def _schedule_swapped(self, step: _Step) -> None:
        bm = self.block_manager
        while self._swapped and step.token_budget > 0:
            req = self._swapped[0]
            ids = [s.seq_id for s in req.get_seqs(SequenceStatus.SWAPPED)]
            if self._num_running_seqs() + len(req.unfinished_seqs()) > self.max_num_seqs:
                break
            # Keep a block per sequence for its next token, unless nothing else runs: then the
            # whole pool is this request's (add_request checked it fits) and a reserve could
            # keep it out forever.
            if not bm.can_swap_in(ids, reserve_blocks=len(ids) if self._running else 0):
                break
            step.out.blocks_to_swap_in.extend(bm.swap_in(ids))
            step.out.swapped_in_seq_ids.extend(ids)
            for s in req.active_seqs():
                s.status = SequenceStatus.RUNNING
            self._swapped.pop(0)
            self._running.append(req)
            self._schedule_running(req, step, allow_preempt=False)

    def _schedule_waiting(self, step: _Step) -> None:
        bm = self.block_manager
        while self._waiting and step.token_budget > 0:
            req = self._waiting[0]
            if self._num_running_seqs() + len(req.unfinished_seqs()) > self.max_num_seqs:
                break
            plan = self._plan(req, step.token_budget)
            if not plan:
                break
            # Its first chunk, after the prefix the cache already holds, must fit. The watermark
            # keeps room for running requests to grow; with none running, the whole pool is this
            # request's (add_request checked that it fits), so it must not apply.
            seq = plan[0][0]
            hits = self.kv.find_cached_prefix(req, seq)
            start = len(hits) * bm.block_size
            k = self._chunk(self._remaining(seq) - start, step.token_budget)
            if k == 0 or not bm.can_allocate(start + k, hits, use_watermark=bool(self._running)):
                break
            self._waiting.popleft()
            self._running.append(req)
            self.kv.admit(req, req.active_seqs())
            for s in req.active_seqs():
                s.status = SequenceStatus.RUNNING
            self._schedule_running(req, step, allow_preempt=False)

    # ------------------------------------------------------------------ after the step
    def update_from_output(
        self,
        scheduler_output: SchedulerOutput,
        sampled: dict[int, tuple[int, float, Any]],
    ) -> list[Request]:
        """Records a finished step: advances ``num_computed_tokens``, appends each sampled
        ``(token_id, logprob, top_logprobs)`` and checks stop conditions (freeing the blocks of
        sequences that finish). Rows of sequences aborted since ``schedule()`` are skipped.

        Returns the requests that received tokens, in row order (each once), so the engine can
        detokenize them, check stop strings (``finish_sequence``) and emit outputs.
        """
        touched: dict[str, Request] = {}
        now = time.time()
        for row in scheduler_output.scheduled:
            seq = self._seqs.get(row.seq_id)
            if seq is None or not self._takes_output(seq):
                continue
            req = self._requests[seq.request_id]
            computed = row.num_computed_tokens + len(row.token_ids)
            if not self.async_scheduling:  # (async: advanced when scheduled)
                seq.num_computed_tokens = computed
            if seq.index == 0 and computed >= req.num_prompt_tokens:
                req.prompt_logprobs_done = True
            if seq.status == SequenceStatus.RUNNING:
                self.kv.cache_computed(req, seq, computed)
            for sid in row.sample_seq_ids:
                s = self._seqs.get(sid)
                if s is None or not self._takes_output(s):
                    continue
                if sid not in sampled:
                    raise KeyError(f"the runner returned no token for sampled sequence {sid}")
                token_id, logprob, top = sampled[sid]
                if req.beam_search is not None:
                    # Candidates of the history as it is now (not of one since reset for recompute).
                    if s.num_computed_tokens == computed == s.num_tokens:
                        req.beam_search.add_candidates(sid, top)
                    if req.first_token_time is None:
                        req.first_token_time = now
                    touched[req.request_id] = req
                    continue
                if self.async_scheduling:
                    s.num_pending_tokens -= 1
                else:
                    s.num_computed_tokens = computed  # forked siblings share the row's cache
                s.append_token(token_id, logprob, top)
                if req.first_token_time is None:
                    req.first_token_time = now
                touched[req.request_id] = req
                self._check_stop(s, req)
            if req.beam_search is not None and req.beam_search.ready(req.active_seqs()):
                self._beam_step(req)
        return list(touched.values())

    def _beam_step(self, req: Request) -> None:
        """Every running beam has its candidates: choose the next beams and continue them on
        shared blocks, or finish the request when the search is done."""
        state, beams = req.beam_search, req.active_seqs()
        choices = state.step(beams)
        if state.done:
            results = state.results()
            status = SequenceStatus.FINISHED_STOPPED if results and results[0].finish_reason == "stop" \
                else SequenceStatus.FINISHED_LENGTH_CAPPED
            for s in req.unfinished_seqs():
                self._finish(s, status, None)
            return
        spare = [s for s in req.unfinished_seqs() if s not in beams]
        self.kv.continue_beams(assign_beams(beams, spare, choices))
        req.forked = True

    def _takes_output(self, seq: Sequence) -> bool:
        """Whether a finished step's row still counts for the sequence. Synchronously only running
        ones do; with async scheduling a sequence preempted after the step was dispatched still
        receives its token (a recompute then includes it), and only finished ones drop it."""
        if self.async_scheduling:
            return not seq.is_finished
        return seq.status == SequenceStatus.RUNNING
