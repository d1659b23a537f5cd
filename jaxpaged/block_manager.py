"""Physical KV blocks: a device pool, a host (swap) pool, and one block table per sequence.

The KV cache is carved into fixed-size blocks of ``block_size`` token slots. A sequence's block
table maps its logical blocks (positions ``i * block_size ...``) to physical block ids, so the cache
never needs one contiguous region per sequence and fragmentation is bounded by one partially
filled block per sequence. A block is taken only when a sequence's tokens reach it, which is what
lets many more sequences share a pool than a worst-case reservation would.

Blocks are reference counted so that sequences can share them: ``fork`` gives a child the parent's
table (all counts + 1) - parallel samples after their prompt, a beam that continues another - and a
write into a shared block first copies it (copy-on-write). The copies and the swaps are not done
here: this class only decides them and returns ``(src, dst)`` block id pairs that the model runner
applies to the device arrays before the step.

Prefix caching (``enable_caching``): sequences of different requests share full blocks with the
same token prefix through the device pool's hash -> block map (``block_pool.py``): a new or
re-admitted sequence starts with the cached blocks of its longest cached prefix
(``find_cached_blocks`` + ``allocate(..., cached_blocks=)``), and the blocks a step has filled are
registered for later ones (``cache_blocks``). A registered block is never written again: writes
start at a sequence's ``num_computed_tokens``, which is past every full block it holds.

Free-list order (deterministic, tested): see ``block_pool.py`` - the head of the free queue is
the block freed longest ago (vLLM v1's order), so a just-freed block, and the cached prefix it may
hold, is reused as late as possible.

Pure Python/NumPy; no JAX.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from jaxpaged.block_pool import BlockPool
from jaxpaged.prefix_cache import BlockKey
from pallas_kernels.sizes import cdiv


class BlockManager:
    """Allocates, shares, copies-on-write, swaps and frees KV blocks for sequences.

    Args:
        num_device_blocks: blocks in the device KV pool (block ids ``0 .. num_device_blocks - 1``).
        num_host_blocks: blocks in the host swap pool (the engine derives it from ``swap_space``
            GiB); 0 disables swapping.
        block_size: token slots per block.
        enable_caching: keep full blocks findable by their prefix (device pool only).
        watermark: fraction of the device pool that admitting a new sequence (``can_allocate``)
            must leave free, so that running sequences can still grow by a block without
            immediately preempting the sequence just admitted. Growth (``append_slots``) and
            swap-in ignore it.

    A sequence's table is either on the device (``RUNNING``) or on the host (``SWAPPED``), never
    both. Every method takes sequence ids, not ``Sequence`` objects: the scheduler owns the
    sequences; this class only owns blocks.
    """

    def __init__(self, num_device_blocks: int, num_host_blocks: int, block_size: int, watermark: float = 0.01,
                 enable_caching: bool = False) -> None:
        if not isinstance(num_device_blocks, int) or num_device_blocks < 1:
            raise ValueError(f"num_device_blocks must be an integer >= 1, got {num_device_blocks!r}")
        if not isinstance(num_host_blocks, int) or num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be an integer >= 0, got {num_host_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {watermark!r}")
        self.block_size = block_size
        self.num_device_blocks = num_device_blocks
        self.num_host_blocks = num_host_blocks
        self.watermark_blocks = int(watermark * num_device_blocks)
        self.enable_caching = enable_caching
        self._device = BlockPool(num_device_blocks, enable_caching)
        self._host = BlockPool(num_host_blocks)
        self._device_tables: dict[int, list[int]] = {}
        self._host_tables: dict[int, list[int]] = {}
        # Leading blocks of a device table already offered to the prefix cache (cache_blocks).
        self._num_offered: dict[int, int] = {}

    # ------------------------------------------------------------------ queries
    def get_num_free_blocks(self) -> int:
        """Free blocks in the device pool (cached ones waiting in the free queue included)."""
        return self._device.num_free

    def get_num_free_host_blocks(self) -> int:
        return self._host.num_free

    def get_usage(self) -> float:
        """Fraction of the device pool in use (vLLM's ``kv_cache_usage``)."""
        return 1.0 - self._device.num_free / self.num_device_blocks

    def get_num_used_blocks(self) -> int:
        """Device blocks referenced by at least one sequence."""
        return self.num_device_blocks - self._device.num_free

    def get_num_logical_blocks(self) -> int:
        """Device blocks the sequences' tables list, a shared block once per table: what the
        pool would hold if nothing were shared."""
        return sum(len(t) for t in self._device_tables.values())

    def get_num_cached_blocks(self) -> int:
        """Device blocks registered in the prefix cache (in use or free)."""
        return self._device.num_cached

    def get_free_block_ids(self, host: bool = False) -> list[int]:
        """The free queue in allocation order (head first)."""
        return list((self._host if host else self._device).free)

    def get_ref_count(self, block_id: int, host: bool = False) -> int:
        return int((self._host if host else self._device).ref_counts[block_id])

    def get_block_table(self, seq_id: int) -> list[int]:
        """A copy of the sequence's table (device or host ids, whichever pool it is in)."""
        table = self._device_tables.get(seq_id)
        if table is None:
            table = self._host_tables.get(seq_id, [])
        return list(table)

    def has_device_blocks(self, seq_id: int) -> bool:
        return seq_id in self._device_tables

    def is_swapped(self, seq_id: int) -> bool:
        return seq_id in self._host_tables

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` slots."""
        return cdiv(num_tokens, self.block_size)

    # ------------------------------------------------------------ allocation
    def _num_blocks_to_allocate(self, num_tokens: int, cached_blocks: Sequence[int]) -> int:
        """Free blocks a new table of ``num_tokens`` slots takes: fresh ones past the cached
        prefix, plus the cached ones that wait in the free queue."""
        fresh = max(0, self.num_blocks_for(num_tokens) - len(cached_blocks))
        return fresh + self._device.num_free_among(cached_blocks)

    def can_allocate(self, num_tokens: int, cached_blocks: Sequence[int] = (), use_watermark: bool = True) -> bool:
        """Whether a new sequence's first ``num_tokens`` slots (starting with ``cached_blocks``)
        fit and still leave the watermark (``use_watermark``)."""
        left = self._device.num_free - self._num_blocks_to_allocate(num_tokens, cached_blocks)
        return left >= (self.watermark_blocks if use_watermark else 0)

    def allocate(self, seq_id: int, num_tokens: int, cached_blocks: Sequence[int] = ()) -> list[int]:
        """Creates the table of a sequence that has none, covering ``num_tokens`` slots; it starts
        with ``cached_blocks`` (a prefix-cache hit from ``find_cached_blocks``, shared), the rest
        are fresh blocks."""
        if seq_id in self._device_tables or seq_id in self._host_tables:
            raise ValueError(f"sequence {seq_id} already has a block table")
        if len(cached_blocks) * self.block_size > num_tokens:
            raise ValueError(f"{len(cached_blocks)} cached blocks hold more than the {num_tokens} slots asked for")
        need = self._num_blocks_to_allocate(num_tokens, cached_blocks)
        if need > self._device.num_free:
            raise RuntimeError(f"sequence {seq_id} needs {need} blocks, {self._device.num_free} free")
        self._device.touch(cached_blocks)  # before any take(): a fresh block must not evict a hit
        table = list(cached_blocks) + [self._device.take() for _ in range(self.num_blocks_for(num_tokens) - len(cached_blocks))]
        self._device_tables[seq_id] = table
        self._num_offered[seq_id] = len(cached_blocks)
        return list(table)

    # ------------------------------------------------------------ prefix cache
    def find_cached_blocks(self, keys: Sequence[BlockKey]) -> list[int]:
        """The blocks of the longest prefix of ``keys`` found in the cache (stops at the first
        miss: a block is only worth its whole prefix). Nothing changes until ``allocate``."""
        blocks = []
        if self.enable_caching:
            for key in keys:
                block = self._device.lookup(key)
                if block is None:
                    break
                blocks.append(block)
        return blocks

    def cache_blocks(self, seq_id: int, keys: Sequence[BlockKey], num_tokens: int) -> int:
        """Registers the sequence's full device blocks among its first ``num_tokens`` slots
        (written by a finished step) under ``keys``; returns how many were newly registered. A
        block another table already registered, or whose prefix is cached in another block, is
        left as it is."""
        table = self._device_tables.get(seq_id)
        if not self.enable_caching or table is None:
            return 0
        end = min(num_tokens // self.block_size, len(keys), len(table))
        start = self._num_offered.get(seq_id, 0)
        added = sum(self._device.register(table[i], keys[i]) for i in range(start, end))
        self._num_offered[seq_id] = max(start, end)
        return added

    def num_offered_blocks(self, seq_id: int) -> int:
        """How many of the sequence's leading blocks were already offered to the prefix cache
        (registered, or found registered); ``cache_blocks`` starts after them."""
        return self._num_offered.get(seq_id, 0)

    def is_cached(self, block_id: int) -> bool:
        return self._device.is_cached(block_id)

    def reset_prefix_cache(self) -> int:
        """Forgets every cached prefix (after the device pool's contents were lost, or on
        request). Tables in use keep their blocks. Returns how many blocks were registered."""
        return self._device.reset_cache()

    def get_num_blocks_to_append(self, seq_id: int, num_computed_tokens: int, num_new_tokens: int) -> int:
        """New device blocks that writing ``num_new_tokens`` from position ``num_computed_tokens``
        takes: blocks past the end of the table, plus one per shared block the write lands in
        (copy-on-write). A sequence without a table counts as an empty one."""
        return self.get_num_blocks_to_append_many([(seq_id, num_computed_tokens, num_new_tokens)])

    def get_num_blocks_to_append_many(self, appends: list[tuple[int, int, int]]) -> int:
        """Blocks that ``append_slots`` on each ``(seq_id, num_computed_tokens, num_new_tokens)``
        in turn takes. Counted together because sequences that share a block with each other
        need one copy fewer than they would alone: once the others have copied it away, the last
        one holds the only reference and writes in place."""
        need = 0
        hits: dict[int, int] = {}
        for seq_id, num_computed_tokens, num_new_tokens in appends:
            table = self._device_tables.get(seq_id, [])
            end_block = self.num_blocks_for(num_computed_tokens + num_new_tokens)
            need += max(0, end_block - len(table))
            for b in table[num_computed_tokens // self.block_size : end_block]:
                if self._device.ref_counts[b] > 1:
                    hits[b] = hits.get(b, 0) + 1
        for b, c in hits.items():
            need += c if self._device.ref_counts[b] > c else c - 1
        return need

    def can_append_slots(self, seq_id: int, num_computed_tokens: int, num_new_tokens: int) -> bool:
        need = self.get_num_blocks_to_append(seq_id, num_computed_tokens, num_new_tokens)
        return need <= self._device.num_free

    def get_num_appendable_tokens(self, seq_id: int, num_computed_tokens: int, limit: int) -> int:
        """The most tokens (at most ``limit``) that ``append_slots`` can take now; lets the
        scheduler shrink a prefill chunk to the free blocks instead of skipping it."""
        lo, hi = 0, limit  # need(k) is non-decreasing in k, so bisect for the largest k that fits
        free = self._device.num_free
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.get_num_blocks_to_append(seq_id, num_computed_tokens, mid) <= free:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def append_slots(self, seq_id: int, num_computed_tokens: int, num_new_tokens: int) -> list[tuple[int, int]]:
        """Makes the table cover ``num_computed_tokens + num_new_tokens`` slots, writable from
        ``num_computed_tokens`` on.

        A block the write lands in that other sequences also reference is replaced by a fresh
        block (the others keep the old one). If the old block already holds this sequence's
        earlier tokens (the write starts inside it), the pair ``(old, new)`` is returned: the
        runner must copy the block before the step, or those tokens would be lost. A block the
        write starts at the boundary of needs no copy.
        """
        table = self._device_tables.get(seq_id)
        if table is None:
            raise ValueError(f"sequence {seq_id} has no device block table (allocate or swap_in first)")
        end_block = self.num_blocks_for(num_computed_tokens + num_new_tokens)
        if end_block <= len(table):  # most decode steps: the write lands in blocks the table holds
            ref_counts = self._device.ref_counts
            if all(ref_counts[table[i]] == 1 for i in range(num_computed_tokens // self.block_size, end_block)):
                return []  # none of them shared: written in place, nothing taken
        need = self.get_num_blocks_to_append(seq_id, num_computed_tokens, num_new_tokens)
        if need > self._device.num_free:
            raise RuntimeError(f"sequence {seq_id} needs {need} blocks, {self._device.num_free} free")
        copies: list[tuple[int, int]] = []
        for i in range(num_computed_tokens // self.block_size, min(len(table), end_block)):
            old = table[i]
            if self._device.ref_counts[old] > 1:
                new = self._device.take()
                self._device.ref_counts[old] -= 1  # still > 0: the other owners keep it
                table[i] = new
                if i * self.block_size < num_computed_tokens:
                    copies.append((old, new))
        while len(table) < end_block:
            table.append(self._device.take())
        return copies

    def fork(self, parent_seq_id: int, child_seq_id: int) -> None:
        """Gives the child the parent's blocks (shared, reference counts + 1), in whichever pool
        the parent's table is (a beam search step may fork beams that are swapped out)."""
        if child_seq_id in self._device_tables or child_seq_id in self._host_tables:
            raise ValueError(f"child sequence {child_seq_id} already has a block table")
        for tables, pool in ((self._device_tables, self._device), (self._host_tables, self._host)):
            parent = tables.get(parent_seq_id)
            if parent is not None:
                for b in parent:
                    pool.incref(b)
                tables[child_seq_id] = list(parent)
                if pool is self._device:
                    self._num_offered[child_seq_id] = self._num_offered.get(parent_seq_id, 0)
                return
        raise ValueError(f"parent sequence {parent_seq_id} has no block table")

    def free(self, seq_id: int) -> None:
        """Releases the sequence's blocks, wherever they are. A no-op for a sequence without any
        (waiting, preempted by recompute, or already freed), so abort can call it blindly."""
        table = self._device_tables.pop(seq_id, None)
        self._num_offered.pop(seq_id, None)
        if table is not None:
            self._device.release(table)
        table = self._host_tables.pop(seq_id, None)
        if table is not None:
            self._host.release(table)

    # ------------------------------------------------------------------ swap
    def _distinct(self, tables: dict[int, list[int]], seq_ids: Iterable[int]) -> list[int]:
        seen: dict[int, None] = {}
        for sid in seq_ids:
            if sid not in tables:
                raise ValueError(f"sequence {sid} has no block table in the expected pool")
            for b in tables[sid]:
                seen.setdefault(b, None)
        return list(seen)

    def can_swap_out(self, seq_ids: Iterable[int]) -> bool:
        """Whether the host pool can take the sequences' distinct device blocks."""
        return len(self._distinct(self._device_tables, seq_ids)) <= self._host.num_free

    def swap_out(self, seq_ids: Iterable[int]) -> list[tuple[int, int]]:
        """Moves the sequences' tables to the host pool; returns ``(device, host)`` copy pairs.

        Pass all sequences of a request at once: a device block shared by several of them maps to
        a single host block (its host reference count = the number of those sequences), so the
        sharing made by ``fork`` survives the round trip and no block is copied twice. Device
        blocks still referenced by sequences not passed here stay on the device.
        """
        seq_ids = list(seq_ids)
        if not self.can_swap_out(seq_ids):
            raise RuntimeError("not enough free host blocks to swap out")
        for sid in seq_ids:  # blocks copied back in are fresh: offered to the cache again then
            self._num_offered.pop(sid, None)
        return self._move(seq_ids, self._device_tables, self._device, self._host_tables, self._host)

    def can_swap_in(self, seq_ids: Iterable[int], reserve_blocks: int = 0) -> bool:
        """Whether the device pool can take the sequences' distinct host blocks and still have
        ``reserve_blocks`` free (the scheduler reserves room for the step's appends)."""
        need = len(self._distinct(self._host_tables, seq_ids))
        return need + reserve_blocks <= self._device.num_free

    def swap_in(self, seq_ids: Iterable[int]) -> list[tuple[int, int]]:
        """Moves the sequences' tables back to the device; returns ``(host, device)`` copy pairs
        (sharing preserved as in ``swap_out``)."""
        seq_ids = list(seq_ids)
        if not self.can_swap_in(seq_ids):
            raise RuntimeError("not enough free device blocks to swap in")
        return self._move(seq_ids, self._host_tables, self._host, self._device_tables, self._device)

    @staticmethod
    def _move(
        seq_ids: list[int],
        src_tables: dict[int, list[int]],
        src_pool: BlockPool,
        dst_tables: dict[int, list[int]],
        dst_pool: BlockPool,
    ) -> list[tuple[int, int]]:
        mapping: dict[int, int] = {}  # insertion-ordered: pairs come out in first-seen order
        for sid in seq_ids:
            table = src_tables.pop(sid)
            new_table = []
            for b in table:
                if b in mapping:
                    dst_pool.incref(mapping[b])
                else:
                    mapping[b] = dst_pool.take()
                new_table.append(mapping[b])
            src_pool.release(table)
            dst_tables[sid] = new_table
        return list(mapping.items())
