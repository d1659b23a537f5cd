"""The engine's own ``Scheduler`` and ``BlockManager``, stepped without a model.

With greedy decoding and ``ignore_eos`` every request generates exactly its output length, so what
the scheduler decides - which rows each step runs, when the KV pool runs out, whom it preempts,
which blocks it swaps - depends on the requests' lengths and the engine's limits, not on what the
model computes. A replay costs one ``schedule()`` per step instead of a model step, which lets the
notebooks sweep block sizes and pool sizes at the scale of a GPU run on a CPU;
``notebooks/batching.ipynb`` checks that a replay's counts equal a real engine run's.

Every request has one sequence (``n=1``) and no prefix is shared, so no block has two owners and
the per-sequence accounting of :func:`kv_usage` counts each slot once.
"""

from __future__ import annotations

import dataclasses

from benchmarks.common import SyntheticRequest
from jaxpaged.block_manager import BlockManager
from jaxpaged.request import Request
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.scheduler import Scheduler

SAMPLED_TOKEN = 0  # what the replay "samples"; with ignore_eos and no stop ids it never ends a request


@dataclasses.dataclass(frozen=True)
class KVUsage:
    """The device pool's token slots at one moment, by what they hold: the categories of the
    PagedAttention paper's Figure 2 (section 3: reserved slots, internal and external fragmentation)."""

    token_states: int  # hold the K/V of a token already computed
    reserved: int  # allocated to a request, filled later by its own tokens
    internal: int  # allocated to a request past its last token: never filled
    unallocated: int  # in no request's table: free blocks, and the slots past the pool's last whole block
    num_seqs: int  # sequences holding device blocks

    @property
    def total(self) -> int:
        return self.token_states + self.reserved + self.internal + self.unallocated


def kv_usage(scheduler: Scheduler, pool_slots: int, final_slots: dict[int, int]) -> KVUsage:
    """Classifies the slots of a pool of ``pool_slots`` (``final_slots``: seq id -> K/V slots the
    sequence writes by the time it finishes, prompt + output - 1). The allocated categories are
    read from the block tables, ``unallocated`` from the free list, so ``total == pool_slots``
    holds only if no block is lost or counted twice."""
    bm = scheduler.block_manager
    filled = reserved = internal = num_seqs = 0
    for req in scheduler.requests_with_device_blocks():
        for s in req.seqs:
            if not bm.has_device_blocks(s.seq_id):
                continue
            allocated = len(bm.get_block_table(s.seq_id)) * bm.block_size
            final = final_slots[s.seq_id]
            num_seqs += 1
            filled += s.num_computed_tokens
            reserved += max(0, min(allocated, final) - s.num_computed_tokens)
            internal += max(0, allocated - final)
    unallocated = bm.get_num_free_blocks() * bm.block_size + pool_slots - bm.num_device_blocks * bm.block_size
    return KVUsage(filled, reserved, internal, unallocated, num_seqs)


@dataclasses.dataclass
class ReplayResult:
    num_steps: int = 0
    num_preemptions: int = 0
    num_computed_tokens: int = 0  # tokens run through the model, recomputed ones included
    num_blocks_swapped_out: int = 0
    num_blocks_swapped_in: int = 0
    first_token_step: list[int] = dataclasses.field(default_factory=list)  # per request, 1-based step
    finish_step: list[int] = dataclasses.field(default_factory=list)
    step_num_tokens: list[int] = dataclasses.field(default_factory=list)
    step_num_seqs: list[int] = dataclasses.field(default_factory=list)
    step_num_waiting: list[int] = dataclasses.field(default_factory=list)  # requests still queued after the step
    kv: list[KVUsage] = dataclasses.field(default_factory=list)  # after each step (record_kv=True)


def replay(reqs: list[SyntheticRequest], *, block_size: int, pool_slots: int, max_num_seqs: int,
           max_num_batched_tokens: int, max_model_len: int, num_host_blocks: int = 0,
           preemption_mode: str = "recompute", watermark: float = 0.01, admit_in_groups_of: int | None = None,
           record_kv: bool = False) -> ReplayResult:
    """Runs ``reqs`` to completion through a ``Scheduler`` over a pool of ``pool_slots // block_size``
    blocks (the engine's defaults otherwise: chunked prefill, the 1 % admission watermark).

    ``admit_in_groups_of=None`` queues every request at once (continuous batching);
    ``admit_in_groups_of=B`` queues B at a time, the next B once all of them finished (static
    batching: pad the requests to their group's longest first to account its padding).
    """
    bm = BlockManager(pool_slots // block_size, num_host_blocks, block_size, watermark=watermark)
    sched = Scheduler(bm, max_num_seqs, max_num_batched_tokens, max_model_len, preemption_mode=preemption_mode)
    res = ReplayResult(first_token_step=[0] * len(reqs), finish_step=[0] * len(reqs))
    final_slots: dict[int, int] = {}
    group = admit_in_groups_of or len(reqs)
    next_req = 0
    while next_req < len(reqs) or sched.has_unfinished_requests():
        if not sched.has_unfinished_requests():
            for i in range(next_req, min(next_req + group, len(reqs))):
                r = reqs[i]
                params = SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True, detokenize=False)
                request = Request(str(i), r.prompt_token_ids, params, first_seq_id=i)
                sched.add_request(request)
                final_slots[i] = len(r.prompt_token_ids) + r.output_len - 1
            next_req = min(next_req + group, len(reqs))
        out = sched.schedule()
        if out.is_empty:
            raise RuntimeError(f"the scheduler made no progress at step {res.num_steps + 1}: {sched.get_stats()}")
        res.num_steps += 1
        step = res.num_steps
        res.num_computed_tokens += out.num_batched_tokens
        res.num_blocks_swapped_out += len(out.blocks_to_swap_out)
        res.num_blocks_swapped_in += len(out.blocks_to_swap_in)
        res.step_num_tokens.append(out.num_batched_tokens)
        res.step_num_seqs.append(len(out.scheduled))
        sampled = {sid: (SAMPLED_TOKEN, 0.0, None) for row in out.scheduled for sid in row.sample_seq_ids}
        for req in sched.update_from_output(out, sampled):
            i = int(req.request_id)
            if not res.first_token_step[i]:
                res.first_token_step[i] = step
            if req.is_finished():
                res.finish_step[i] = step
        stats = sched.get_stats()
        res.step_num_waiting.append(stats.num_waiting_reqs + stats.num_swapped_reqs + len(reqs) - next_req)
        if record_kv:
            res.kv.append(kv_usage(sched, pool_slots, final_slots))
    res.num_preemptions = sched.num_preemptions
    return res
