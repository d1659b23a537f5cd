"""BlockManager: exact block ids, reference counts, free-list order, COW pairs and swap mappings."""

import pytest

from jaxpaged.block_manager import BlockManager


def test_allocate_on_demand_and_free_list_order():
    bm = BlockManager(num_device_blocks=8, num_host_blocks=0, block_size=4, watermark=0.0)
    assert bm.get_free_block_ids() == list(range(8))
    assert bm.allocate(1, 5) == [0, 1]  # 5 slots -> 2 blocks, taken from the head
    assert bm.allocate(2, 4) == [2]
    # Appending inside the last block takes nothing; crossing into a new block takes one.
    assert bm.append_slots(1, 5, 3) == []
    assert bm.get_block_table(1) == [0, 1]
    assert bm.append_slots(1, 8, 1) == []
    assert bm.get_block_table(1) == [0, 1, 3]
    assert bm.get_num_free_blocks() == 4
    assert bm.get_usage() == pytest.approx(0.5)
    # Freed blocks go to the tail, last block first; the head keeps its order.
    bm.free(1)
    assert bm.get_free_block_ids() == [4, 5, 6, 7, 3, 1, 0]
    assert bm.allocate(3, 12) == [4, 5, 6]
    assert bm.allocate(4, 16) == [7, 3, 1, 0]
    assert bm.get_num_free_blocks() == 0
    assert not bm.can_append_slots(2, 4, 1)
    assert bm.can_append_slots(2, 1, 3)  # still inside its own block
    with pytest.raises(RuntimeError):
        bm.append_slots(2, 4, 1)
    bm.free(2)
    bm.free(2)  # idempotent: abort may free a sequence twice
    assert bm.get_free_block_ids() == [2]
    assert all(bm.get_ref_count(b) == 1 for b in [4, 5, 6, 7, 3, 1, 0])
    assert bm.get_ref_count(2) == 0


def test_watermark_applies_to_admission_only():
    bm = BlockManager(num_device_blocks=10, num_host_blocks=0, block_size=2, watermark=0.2)
    assert bm.watermark_blocks == 2
    assert bm.can_allocate(16)  # 8 blocks, leaves 2
    assert not bm.can_allocate(17)
    bm.allocate(1, 16)
    assert bm.can_append_slots(1, 16, 4)  # growth may use the watermark's blocks
    assert not bm.can_allocate(1)


def test_fork_shares_blocks_then_copy_on_write():
    bm = BlockManager(num_device_blocks=8, num_host_blocks=0, block_size=4, watermark=0.0)
    bm.allocate(10, 6)  # prompt of 6 tokens: blocks [0, 1], block 1 half full
    bm.fork(10, 11)
    bm.fork(10, 12)
    assert bm.get_block_table(11) == bm.get_block_table(12) == [0, 1]
    assert bm.get_ref_count(0) == 3 and bm.get_ref_count(1) == 3
    # Three sharers of block 1 need two copies together (the last writes in place).
    assert bm.get_num_blocks_to_append(10, 6, 1) == 1
    assert bm.get_num_blocks_to_append_many([(s, 6, 1) for s in (10, 11, 12)]) == 2
    assert bm.append_slots(10, 6, 1) == [(1, 2)]
    assert bm.get_block_table(10) == [0, 2]
    assert bm.get_ref_count(1) == 2 and bm.get_ref_count(2) == 1
    assert bm.append_slots(11, 6, 1) == [(1, 3)]
    assert bm.append_slots(12, 6, 1) == []  # sole owner now: writes in place
    assert bm.get_block_table(12) == [0, 1]
    assert [bm.get_ref_count(b) for b in range(4)] == [3, 1, 1, 1]
    # Writing from a block boundary into a shared block needs a new block but no copy.
    bm.allocate(20, 8)  # [4, 5]
    bm.fork(20, 21)
    assert bm.append_slots(20, 8, 2) == []
    assert bm.get_block_table(20) == [4, 5, 6]
    assert bm.get_ref_count(4) == 2 and bm.get_ref_count(6) == 1
    # Freeing a sharer only drops reference counts.
    bm.free(10)
    assert bm.get_free_block_ids() == [7, 2]
    assert bm.get_ref_count(0) == 2
    with pytest.raises(ValueError, match="child sequence"):
        bm.fork(11, 12)


def test_appendable_tokens_counts_cow_and_free_blocks():
    bm = BlockManager(num_device_blocks=4, num_host_blocks=0, block_size=4, watermark=0.0)
    bm.allocate(1, 6)  # [0, 1]
    bm.fork(1, 2)
    # 2 free blocks: the COW of block 1 takes one (its 2 free slots stay), one more block: 2 + 4.
    assert bm.get_num_appendable_tokens(1, 6, 100) == 6
    assert bm.get_num_appendable_tokens(1, 6, 3) == 3
    bm.free(2)
    assert bm.get_num_appendable_tokens(1, 6, 100) == 2 + 2 * 4
    assert bm.get_num_appendable_tokens(99, 0, 100) == 8  # a sequence with no table yet


def test_swap_out_and_in_preserve_sharing():
    bm = BlockManager(num_device_blocks=8, num_host_blocks=6, block_size=4, watermark=0.0)
    bm.allocate(0, 4)  # [0] : an unrelated sequence, so ids are not trivially equal
    bm.allocate(1, 6)  # [1, 2]
    bm.fork(1, 2)
    assert bm.append_slots(2, 6, 2) == [(2, 3)]  # seq 2: [1, 3], seq 1: [1, 2]
    assert bm.can_swap_out([1, 2])
    pairs = bm.swap_out([1, 2])
    assert pairs == [(1, 0), (2, 1), (3, 2)]  # shared block 1 copied once
    assert bm.get_block_table(1) == [0, 1] and bm.get_block_table(2) == [0, 2]
    assert bm.is_swapped(1) and not bm.has_device_blocks(1)
    assert bm.get_ref_count(0, host=True) == 2
    assert bm.get_ref_count(1, host=True) == 1
    assert bm.get_free_block_ids() == [4, 5, 6, 7, 2, 3, 1]
    assert bm.get_free_block_ids(host=True) == [3, 4, 5]
    # Swap in needs 3 device blocks (+ a reserve if asked).
    assert bm.can_swap_in([1, 2], reserve_blocks=4)
    assert not bm.can_swap_in([1, 2], reserve_blocks=5)
    pairs = bm.swap_in([1, 2])
    assert pairs == [(0, 4), (1, 5), (2, 6)]
    assert bm.get_block_table(1) == [4, 5] and bm.get_block_table(2) == [4, 6]
    assert bm.get_ref_count(4) == 2
    assert bm.get_free_block_ids(host=True) == [3, 4, 5, 1, 2, 0]
    bm.free(1)
    bm.free(2)
    assert bm.get_free_block_ids() == [7, 2, 3, 1, 5, 6, 4]


def test_swap_out_with_a_block_shared_outside_the_group():
    bm = BlockManager(num_device_blocks=4, num_host_blocks=4, block_size=2, watermark=0.0)
    bm.allocate(1, 4)  # [0, 1]
    bm.fork(1, 2)
    pairs = bm.swap_out([2])  # seq 1 stays on the device
    assert pairs == [(0, 0), (1, 1)]
    assert bm.get_ref_count(0) == 1 and bm.get_block_table(1) == [0, 1]
    assert bm.can_swap_out([1, 1, 1])  # distinct blocks are counted once
    assert bm.get_free_block_ids() == [2, 3]


def test_swap_capacity_checks():
    bm = BlockManager(num_device_blocks=4, num_host_blocks=1, block_size=2, watermark=0.0)
    bm.allocate(1, 4)
    assert not bm.can_swap_out([1])
    with pytest.raises(RuntimeError):
        bm.swap_out([1])
    with pytest.raises(ValueError):
        bm.swap_in([1])  # not swapped


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_device_blocks=0, num_host_blocks=0, block_size=4), "num_device_blocks"),
        (dict(num_device_blocks=4, num_host_blocks=-1, block_size=4), "num_host_blocks"),
        (dict(num_device_blocks=4, num_host_blocks=0, block_size=0), "block_size"),
        (dict(num_device_blocks=4, num_host_blocks=0, block_size=4, watermark=1.0), "watermark"),
    ],
)
def test_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BlockManager(**kwargs)
