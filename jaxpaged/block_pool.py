"""One pool of KV blocks: reference counts, the free queue in eviction order, and (device pool) the
prefix cache's map from block hashes to blocks.

Free queue: blocks are handed out from the head of an ordered queue that starts as ``0, 1, ...,
num_blocks - 1``; a block whose last reference is dropped goes to the tail, and a sequence's blocks
are released last-block-first. So the block freed longest ago is reused first (LRU), and among one
sequence's blocks its tail - the least likely to be someone else's prefix - goes before its head.

Prefix cache (vLLM v1's design): a full block can be registered under its ``BlockKey``. A
registered block keeps its key while it waits in the free queue, so a later sequence with the same
prefix takes it back (``touch``) instead of recomputing it; it is evicted - its key forgotten - only
when it reaches the head of the queue and is handed out for new contents (``take``). A lookup
compares the whole key (parent hash, token ids, extra key), not just the hash.

Pure Python/NumPy; no JAX.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import numpy as np

from jaxpaged.prefix_cache import BlockKey


class BlockPool:
    """Reference counts, an LRU free queue and (``enable_caching``) the hash -> block map of
    ``num_blocks`` blocks."""

    def __init__(self, num_blocks: int, enable_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = np.zeros(num_blocks, np.int32)
        # Insertion-ordered: O(1) pop at the head, append at the tail, and removal from the middle
        # (a cached free block taken back by a hit).
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._key_of: dict[int, BlockKey] = {}  # registered block -> its key
        self._block_of: dict[bytes, int] = {}  # hash -> the one block registered under it
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_cached(self) -> int:
        """Registered blocks, in use or waiting in the free queue."""
        return len(self._key_of)

    def take(self) -> int:
        """The head of the free queue, with one reference; its cached contents (if any) are
        evicted, since the caller is about to overwrite them."""
        if not self.free:
            raise RuntimeError("out of KV blocks: the caller must check capacity first")
        block, _ = self.free.popitem(last=False)
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._block_of[key.hash]
            self.num_evictions += 1
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        self.ref_counts[block] += 1

    def touch(self, blocks: Iterable[int]) -> None:
        """Adds a reference to each block, taking the free ones (cached, ref count 0) out of the
        free queue: a prefix-cache hit."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1

    def release(self, blocks: list[int]) -> None:
        """Drops one reference from each block, tail first; blocks reaching 0 go to the free tail
        (registered ones stay registered until evicted)."""
        for block in reversed(blocks):
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} released more often than it was referenced")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None

    def num_free_among(self, blocks: Iterable[int]) -> int:
        """How many of ``blocks`` sit in the free queue (touching them takes that many)."""
        return sum(1 for b in set(blocks) if self.ref_counts[b] == 0)

    # ------------------------------------------------------------------ prefix cache
    def lookup(self, key: BlockKey) -> int | None:
        """The block registered under ``key`` (hash and contents equal), or None."""
        block = self._block_of.get(key.hash)
        if block is None or self._key_of[block] != key:
            return None
        return block

    def register(self, block: int, key: BlockKey) -> bool:
        """Registers a full, written block under ``key``. A block already registered, or a key
        another block already holds (the same prefix computed twice), is left as it is."""
        if not self.enable_caching or block in self._key_of or key.hash in self._block_of:
            return False
        self._key_of[block] = key
        self._block_of[key.hash] = block
        return True

    def is_cached(self, block: int) -> bool:
        return block in self._key_of

    def reset_cache(self) -> int:
        """Forgets every registration (blocks in use keep their contents and their holders; they
        are just no longer found by lookups). Returns how many blocks were registered."""
        n = len(self._key_of)
        self._key_of.clear()
        self._block_of.clear()
        return n
