"""Physical KV blocks: a device pool, a host (swap) pool, and one block table per sequence.

The KV cache is carved into fixed-size blocks of ``block_size`` token slots. A sequence's block
table maps its logical blocks (positions ``i * block_size ...``) to physical block ids, so the cache
never needs one contiguous region per sequence and fragmentation is bounded by one partially
filled block per sequence. A block is taken only when a sequence's tokens reach it, which is what
lets many more sequences share a pool than a worst-case reservation would.

Blocks are reference counted so that sequences can share them: ``fork`` gives a child the parent's
table (all counts + 1), and a write into a shared block first copies it (copy-on-write). The copies
and the swaps are not done here: this class only decides them and returns ``(src, dst)`` block id
pairs that the model runner applies to the device arrays before the step.

Free-list order (deterministic, tested): both pools hand out blocks from the head of a FIFO queue
that starts as ``0, 1, ..., num_blocks - 1``; a released block is appended to the tail, and the
blocks of one sequence are released last-block-first. This is vLLM v1's order: a just-freed block
is reused as late as possible, and a sequence's tail blocks (the least likely to be a shared
prefix) come back before its head blocks, which is the eviction order prefix caching will want.

Pure Python/NumPy; no JAX.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import numpy as np

from pallas_kernels.sizes import cdiv


class _BlockPool:
    """Reference counts and a FIFO free queue for one pool of ``num_blocks`` blocks."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = np.zeros(num_blocks, np.int32)
        self.free: deque[int] = deque(range(num_blocks))

    def take(self) -> int:
        if not self.free:
            raise RuntimeError("out of KV blocks: the caller must check capacity first")
        block = self.free.popleft()
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        self.ref_counts[block] += 1

    def release(self, blocks: list[int]) -> None:
        """Drops one reference from each block, tail first; blocks reaching 0 go to the free tail."""
        for block in reversed(blocks):
            if self.ref_counts[block] <= 0:
                raise RuntimeError(f"block {block} released more often than it was referenced")
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free.append(block)


class BlockManager:
    """Allocates, shares, copies-on-write, swaps and frees KV blocks for sequences.

    Args:
        num_device_blocks: blocks in the device KV pool (block ids ``0 .. num_device_blocks - 1``).
        num_host_blocks: blocks in the host swap pool (the engine derives it from ``swap_space``
            GiB); 0 disables swapping.
        block_size: token slots per block.
        watermark: fraction of the device pool that admitting a new sequence (``can_allocate``)
            must leave free, so that running sequences can still grow by a block without
            immediately preempting the sequence just admitted. Growth (``append_slots``) and
            swap-in ignore it.

    A sequence's table is either on the device (``RUNNING``) or on the host (``SWAPPED``), never
    both. Every method takes sequence ids, not ``Sequence`` objects: the scheduler owns the
    sequences; this class only owns blocks.
    """

    def __init__(self, num_device_blocks: int, num_host_blocks: int, block_size: int, watermark: float = 0.01) -> None:
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
        self._device = _BlockPool(num_device_blocks)
        self._host = _BlockPool(num_host_blocks)
        self._device_tables: dict[int, list[int]] = {}
        self._host_tables: dict[int, list[int]] = {}

    # ------------------------------------------------------------------ queries
    def get_num_free_blocks(self) -> int:
        """Free blocks in the device pool."""
        return len(self._device.free)

    def get_num_free_host_blocks(self) -> int:
        return len(self._host.free)

    def get_usage(self) -> float:
        """Fraction of the device pool in use (vLLM's ``kv_cache_usage``)."""
        return 1.0 - len(self._device.free) / self.num_device_blocks

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
    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new sequence's first ``num_tokens`` slots fit and still leave the watermark."""
        return len(self._device.free) - self.num_blocks_for(num_tokens) >= self.watermark_blocks

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Creates the table of a sequence that has none, covering ``num_tokens`` slots."""
        if seq_id in self._device_tables or seq_id in self._host_tables:
            raise ValueError(f"sequence {seq_id} already has a block table")
        need = self.num_blocks_for(num_tokens)
        if need > len(self._device.free):
            raise RuntimeError(f"sequence {seq_id} needs {need} blocks, {len(self._device.free)} free")
        table = [self._device.take() for _ in range(need)]
        self._device_tables[seq_id] = table
        return list(table)

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
        return need <= len(self._device.free)

    def get_num_appendable_tokens(self, seq_id: int, num_computed_tokens: int, limit: int) -> int:
        """The most tokens (at most ``limit``) that ``append_slots`` can take now; lets the
        scheduler shrink a prefill chunk to the free blocks instead of skipping it."""
        lo, hi = 0, limit  # need(k) is non-decreasing in k, so bisect for the largest k that fits
        free = len(self._device.free)
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
        need = self.get_num_blocks_to_append(seq_id, num_computed_tokens, num_new_tokens)
        if need > len(self._device.free):
            raise RuntimeError(f"sequence {seq_id} needs {need} blocks, {len(self._device.free)} free")
        end_block = self.num_blocks_for(num_computed_tokens + num_new_tokens)
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
        """Gives the child the parent's device blocks (shared, reference counts + 1)."""
        parent = self._device_tables.get(parent_seq_id)
        if parent is None:
            raise ValueError(f"parent sequence {parent_seq_id} has no device block table")
        if child_seq_id in self._device_tables or child_seq_id in self._host_tables:
            raise ValueError(f"child sequence {child_seq_id} already has a block table")
        for b in parent:
            self._device.incref(b)
        self._device_tables[child_seq_id] = list(parent)

    def free(self, seq_id: int) -> None:
        """Releases the sequence's blocks, wherever they are. A no-op for a sequence without any
        (waiting, preempted by recompute, or already freed), so abort can call it blindly."""
        table = self._device_tables.pop(seq_id, None)
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
        return len(self._distinct(self._device_tables, seq_ids)) <= len(self._host.free)

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
        return self._move(seq_ids, self._device_tables, self._device, self._host_tables, self._host)

    def can_swap_in(self, seq_ids: Iterable[int], reserve_blocks: int = 0) -> bool:
        """Whether the device pool can take the sequences' distinct host blocks and still have
        ``reserve_blocks`` free (the scheduler reserves room for the step's appends)."""
        need = len(self._distinct(self._host_tables, seq_ids))
        return need + reserve_blocks <= len(self._device.free)

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
        src_pool: _BlockPool,
        dst_tables: dict[int, list[int]],
        dst_pool: _BlockPool,
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
