"""A model runner without a model, for scheduler tests: it keeps a simulated KV pool in NumPy.

Every slot the step writes receives the token id at that position, so a block table can be read
back and compared with the sequence's true history. Swaps and copy-on-write copies are applied to
the simulated pools exactly as the real runner must (swap-outs, then swap-ins, then copies, then
the step). A scheduler bug that loses, duplicates or mixes up KV blocks shows up as a wrong read.

Sampled tokens are a deterministic function of (seq_id, position), so the expected output of
every sequence is known in advance, whatever batching and preemption happened on the way.

With ``top_fn`` (beam search) a row's result is instead a distribution over next tokens, a
deterministic function of the sequence's whole token history (``top_fn(history) -> (ids,
logprobs)``, best first), and the cache is checked against each sequence's current history (beams
take over one another's histories, so it is not known in advance).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from jaxpaged.scheduler_output import SchedulerOutput


def default_token(seq_id: int, position: int) -> int:
    """Distinct-looking ids well away from small special ids like EOS."""
    return 1000 + (seq_id * 7919 + position * 104729) % 99991


class SimTop(NamedTuple):
    """The fields of the runner's SampledToken that beam search reads."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


class SimulatedKVRunner:
    def __init__(
        self,
        num_device_blocks: int,
        num_host_blocks: int,
        block_size: int,
        token_fn: Callable[[int, int], int] = default_token,
        top_fn: Callable[[tuple[int, ...]], tuple[list[int], list[float]]] | None = None,
    ) -> None:
        self.block_size = block_size
        self.device = np.full((num_device_blocks, block_size), -1, np.int64)
        self.host = np.full((max(num_host_blocks, 1), block_size), -1, np.int64)
        self.token_fn = token_fn
        self.top_fn = top_fn
        self.prompts: dict[int, list[int]] = {}  # seq_id -> its request's prompt
        self.seqs: dict[int, object] = {}  # seq_id -> Sequence (histories, under top_fn)
        self.num_swapped_out = 0
        self.num_swapped_in = 0
        self.num_copied = 0
        self.steps = 0

    def register(self, request) -> None:
        for s in request.seqs:
            self.prompts[s.seq_id] = list(request.prompt_token_ids)
            self.seqs[s.seq_id] = s

    def expected(self, seq_id: int, position: int) -> int:
        if self.top_fn is not None:
            return self.seqs[seq_id].get_token_ids_range(position, position + 1)[0]
        prompt = self.prompts[seq_id]
        return prompt[position] if position < len(prompt) else self.token_fn(seq_id, position)

    def _read(self, table: list[int], position: int) -> int:
        return int(self.device[table[position // self.block_size], position % self.block_size])

    def execute(self, out: SchedulerOutput) -> dict[int, tuple[int, float, None]]:
        self.steps += 1
        bs = self.block_size
        for d, h in out.blocks_to_swap_out:
            self.host[h] = self.device[d]
        for h, d in out.blocks_to_swap_in:
            self.device[d] = self.host[h]
        for src, dst in out.blocks_to_copy:
            self.device[dst] = self.device[src]
        self.num_swapped_out += len(out.blocks_to_swap_out)
        self.num_swapped_in += len(out.blocks_to_swap_in)
        self.num_copied += len(out.blocks_to_copy)

        written: set[tuple[int, int]] = set()
        for row in out.scheduled:
            nc, k = row.num_computed_tokens, len(row.token_ids)
            assert k >= 1, row
            assert len(row.block_table) == -(-(nc + k) // bs), f"table does not cover exactly: {row}"
            want = [self.expected(row.seq_id, p) for p in range(nc, nc + k)]
            assert row.token_ids == want, f"seq {row.seq_id} fed {row.token_ids}, its tokens are {want}"
            # What is already cached must be exactly this sequence's history (before any writes).
            for p in range(nc):
                got = self._read(row.block_table, p)
                assert got == self.expected(row.seq_id, p), f"seq {row.seq_id} pos {p}: cache has {got}"
        for row in out.scheduled:
            nc = row.num_computed_tokens
            for i, t in enumerate(row.token_ids):
                p = nc + i
                slot = (row.block_table[p // bs], p % bs)
                assert slot not in written, f"two rows write block {slot[0]} offset {slot[1]}"
                written.add(slot)
                self.device[slot] = t
        # After the writes, no row's history may have been overwritten by another row.
        for row in out.scheduled:
            for p in range(row.num_computed_tokens + len(row.token_ids)):
                assert self._read(row.block_table, p) == self.expected(row.seq_id, p)

        sampled = {}
        for row in out.scheduled:
            pos = row.num_computed_tokens + len(row.token_ids)
            for sid in row.sample_seq_ids:
                if self.top_fn is not None:
                    ids, lps = self.top_fn(tuple(self.seqs[sid].get_token_ids_range(0, pos)))
                    sampled[sid] = (ids[0], lps[0], SimTop(ids[0], lps[0], 1, list(ids), list(lps)))
                else:
                    sampled[sid] = (self.token_fn(sid, pos), -0.25, None)
        return sampled
