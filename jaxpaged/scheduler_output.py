"""The contract between the scheduler and the model runner: one step's ragged batch as plain
dataclasses (vLLM v1's ``SchedulerOutput`` idea), plus the scheduler's counters. No JAX, no logic.

It is the runner's whole input: the tokens to compute, where their keys/values go, the block moves
to apply first, and for every sequence that samples, its sampling parameters and token history
(``SamplingRow``, holding references to the sequence's lists, not copies). The runner never asks
the engine for anything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from jaxpaged.sampling_params import SamplingParams

PENDING_TOKEN = -1  # a row's input id that the previous (in-flight) step samples


class SamplingRow(NamedTuple):
    """One sequence to sample: its request's params and its token history.

    ``sample_index`` is the sequence's index among its request's ``n`` samples; a seeded request's
    sample i draws with seed + i (as vLLM v1), so parallel samples differ but stay reproducible.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # the live list: read when the step is packed
    sample_index: int = 0


@dataclass
class ScheduledSequence:
    """One row of the step's ragged batch."""

    seq_id: int
    token_ids: list[int]  # the tokens computed this step (a prompt chunk, or the last token;
    #   PENDING_TOKEN where the previous, in-flight step samples it)
    num_computed_tokens: int  # tokens of this sequence already in the KV cache (= position of token_ids[0])
    block_table: list[int]  # physical block ids covering num_computed_tokens + len(token_ids)
    sample_seq_ids: list[int]  # sequences that draw a token from this row's last-token logits:
    #   [] for a non-final prefill chunk; [seq_id] normally; all n sequences of a request when its
    #   prompt finishes and it forks
    want_prompt_logprobs: bool  # this chunk's tokens need prompt logprobs
    sample_rows: list[SamplingRow] = field(default_factory=list)  # one per sample_seq_ids entry, same order
    prompt_token_ids: Sequence[int] = ()  # the whole prompt (prompt logprobs pair position p with token p + 1)


@dataclass
class SchedulerOutput:
    """One step. The runner applies swap-outs, then swap-ins, then copies, then runs the step:
    a block freed by a swap-out may be handed out again (as a copy target or a new block) in the
    same step, so it must be read before anything writes it."""

    scheduled: list[ScheduledSequence] = field(default_factory=list)  # prefill chunks and decodes together
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host block, device block)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src device block, dst device block)
    preempted_seq_ids: list[int] = field(default_factory=list)  # lost their blocks (recompute) or swapped out
    swapped_in_seq_ids: list[int] = field(default_factory=list)  # their blocks come back in this step
    num_batched_tokens: int = 0

    def touched_seq_ids(self) -> set[int]:
        """Every sequence whose state this step changes (rows, samples, preemptions, swap-ins):
        what the engine resets if the step fails."""
        ids = set(self.preempted_seq_ids) | set(self.swapped_in_seq_ids)
        for row in self.scheduled:
            ids.add(row.seq_id)
            ids.update(row.sample_seq_ids)
        return ids

    @property
    def is_empty(self) -> bool:
        return not (self.scheduled or self.blocks_to_swap_out or self.blocks_to_swap_in or self.blocks_to_copy)


@dataclass(frozen=True)
class SchedulerStats:
    num_running_reqs: int
    num_waiting_reqs: int
    num_swapped_reqs: int
    num_running_seqs: int
    num_preemptions: int  # total since construction (requests preempted, either mode)
    kv_cache_usage: float  # fraction of device blocks in use
    num_free_blocks: int
    num_kv_cache_tokens: int  # tokens whose K/V sit in device blocks, summed over sequences
    num_used_blocks: int = 0  # device blocks referenced by some sequence
    num_logical_blocks: int = 0  # device blocks the tables list (a shared block once per table)
    prefix_cache_queries: int = 0  # total tokens looked up in the prefix cache at admissions
    prefix_cache_hits: int = 0  # total of those found cached
