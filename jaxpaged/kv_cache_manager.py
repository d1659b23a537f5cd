"""Sequence-level KV block operations that share blocks, on top of the id-level ``BlockManager``:
prefix-cache lookups when a sequence is admitted, registering the blocks a step filled, and the
forks of parallel samples and beams (their block keys travel with the blocks).

Decisions:
  - A hit covers at most ``num_tokens - 1`` tokens: the last token is always computed, because its
    logits are what the step samples from (vLLM v1's rule).
  - A request that still wants prompt logprobs does not read the cache: the logprobs of a prompt
    position come from that position's hidden state, which a hit skips; the request computes its
    whole prompt (and still registers its blocks for others). This is vLLM v1's choice, and it
    keeps ``prompt_logprobs`` exact; after the prompt (a recompute preemption) it reads the cache.
  - Blocks are registered after the step that wrote them has finished (``cache_computed`` from
    ``update_from_output``), never when it is scheduled: a step that fails leaves nothing cached
    that it was to write.

Pure Python; no JAX.
"""

from __future__ import annotations

from jaxpaged.beam_search import BeamToken
from jaxpaged.block_manager import BlockManager
from jaxpaged.prefix_cache import PrefixCacheStats, extend_block_keys
from jaxpaged.request import Request, Sequence


class KVCacheManager:
    """The scheduler's block operations that involve sharing (see module docstring)."""

    def __init__(self, block_manager: BlockManager) -> None:
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.stats = PrefixCacheStats()

    @property
    def enable_caching(self) -> bool:
        return self.block_manager.enable_caching

    def _reads_cache(self, req: Request) -> bool:
        wants_plp = getattr(req.sampling_params, "prompt_logprobs", None) is not None and not req.prompt_logprobs_done
        return self.enable_caching and not wants_plp

    def find_cached_prefix(self, req: Request, seq: Sequence) -> list[int]:
        """The cached blocks a sequence without blocks could start with (nothing is taken yet)."""
        if not self._reads_cache(req):
            return []
        keys = extend_block_keys(seq, seq.num_tokens, self.block_size, req.cache_salt)
        max_blocks = (seq.num_tokens + seq.num_pending_tokens - 1) // self.block_size
        return self.block_manager.find_cached_blocks(keys[:max_blocks])

    def admit(self, req: Request, seqs: list[Sequence]) -> None:
        """Starts each sequence that has no blocks from its cached prefix, one sequence at a time
        (a sibling's hit is taken before anything else can evict it); records the lookups."""
        bm = self.block_manager
        for seq in seqs:
            if bm.has_device_blocks(seq.seq_id) or bm.is_swapped(seq.seq_id) or seq.num_computed_tokens:
                continue
            hits = self.find_cached_prefix(req, seq)
            if self.enable_caching:
                self.stats.record(seq.num_tokens, len(hits) * self.block_size)
            if seq.index == 0 and req.num_cached_tokens is None:
                req.num_cached_tokens = min(len(hits) * self.block_size, req.num_prompt_tokens)
            if hits:
                bm.allocate(seq.seq_id, len(hits) * self.block_size, cached_blocks=hits)
                seq.num_computed_tokens = len(hits) * self.block_size

    def cache_computed(self, req: Request, seq: Sequence, num_tokens: int) -> None:
        """Registers the sequence's full blocks among its first ``num_tokens`` positions, which a
        finished step has written (only while the sequence still holds those device blocks)."""
        if not self.enable_caching or not self.block_manager.has_device_blocks(seq.seq_id):
            return
        num_tokens = min(num_tokens, seq.num_tokens)  # tokens sampled but not landed have no key yet
        if num_tokens // self.block_size <= self.block_manager.num_offered_blocks(seq.seq_id):
            return  # no block filled up since the last offer (most decode steps): nothing to hash
        keys = extend_block_keys(seq, num_tokens, self.block_size, req.cache_salt)
        self.block_manager.cache_blocks(seq.seq_id, keys, num_tokens)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares the parent's blocks (parallel samples after their prompt)."""
        self.block_manager.fork(parent.seq_id, child.seq_id)
        child.block_keys = list(parent.block_keys)

    def continue_beams(self, assignments: list[tuple[Sequence, Sequence, BeamToken]]) -> None:
        """Applies a beam-search step: each ``(holder, parent, token)`` makes ``holder`` the parent's
        continuation by ``token``. Holders that are not their parent drop their own blocks and take
        a fork of the parent's (history copied first, before any parent takes its new token)."""
        bm = self.block_manager
        moved = [(holder, parent) for holder, parent, _ in assignments if holder is not parent]
        for holder, _ in moved:
            bm.free(holder.seq_id)
        for holder, parent in moved:
            holder.take_history_of(parent)
            if bm.has_device_blocks(parent.seq_id) or bm.is_swapped(parent.seq_id):
                bm.fork(parent.seq_id, holder.seq_id)
        for holder, _, token in assignments:
            holder.append_token(token.token_id, token.logprob, token)

    def reset_prefix_cache(self) -> int:
        return self.block_manager.reset_prefix_cache()
