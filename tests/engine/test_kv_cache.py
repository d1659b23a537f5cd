"""The device KV pool and its host swap pool (jaxpaged/kv_cache.py): block copies, swap round
trips, padded index arrays and chunking."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.kv_cache import KVCache

LAYERS, BLOCKS, HOST, BS, HEADS, DIM = 2, 12, 6, 2, 1, 4


def filled_cache(num_host_blocks: int = HOST) -> KVCache:
    """Every (layer, k/v, block) holds its own values, so any misplaced block shows."""
    kv = KVCache(num_layers=LAYERS, num_blocks=BLOCKS, num_host_blocks=num_host_blocks, block_size=BS,
                 num_kv_heads=HEADS, head_dim=DIM, dtype=jnp.float32)
    kv.caches = [tuple(jnp.asarray(pool_values(layer, j)) for j in range(2)) for layer in range(LAYERS)]
    return kv


def pool_values(layer: int, j: int) -> np.ndarray:
    base = np.arange(BLOCKS * BS * HEADS * DIM, dtype=np.float32).reshape(BLOCKS, BS, HEADS, DIM)
    return base + 1000 * layer + 100_000 * j


def device(kv: KVCache) -> np.ndarray:
    return np.stack([np.stack([np.asarray(k), np.asarray(v)]) for k, v in kv.caches])  # [L, 2, blocks, ...]


def test_bytes_per_block_counts_k_and_v_of_every_layer():
    assert KVCache.bytes_per_block(32, 16, 32, 128, jnp.bfloat16) == 2 * 32 * 16 * 32 * 128 * 2
    assert KVCache.bytes_per_block(LAYERS, BS, HEADS, DIM, jnp.float32) == 2 * LAYERS * BS * HEADS * DIM * 4


def test_index_arrays_are_padded_to_a_power_of_two():
    kv = filled_cache()
    for n, size in ((1, 1), (2, 2), (3, 4), (5, 8), (8, 8), (9, 16)):
        out = kv._pad(list(range(n)), BLOCKS)
        assert out.dtype == np.int32 and out.shape == (size,)
        np.testing.assert_array_equal(out[:n], range(n))
        np.testing.assert_array_equal(out[n:], BLOCKS)  # past the pool: the scatter drops them


def test_copy_writes_only_the_destinations():
    kv = filled_cache()
    before = device(kv)
    kv.copy([(1, 7), (4, 2), (4, 9)])  # 3 pairs: padded to 4, the padding dropped
    after = device(kv)
    want = before.copy()
    for src, dst in ((1, 7), (4, 2), (4, 9)):
        want[:, :, dst] = before[:, :, src]
    np.testing.assert_array_equal(after, want)
    kv.copy([])
    np.testing.assert_array_equal(device(kv), want)


def test_swap_out_then_in_round_trips_every_layer():
    kv = filled_cache()
    original = device(kv)
    kv.swap_out([(3, 0), (5, 4), (10, 1)])
    np.testing.assert_array_equal(kv.host[:, :, [0, 4, 1]], original[:, :, [3, 5, 10]])
    kv.copy([(0, 3), (0, 5), (0, 10)])  # the device blocks are reused meanwhile
    kv.swap_in([(0, 6), (4, 7), (1, 8)])  # back, into other device blocks
    after = device(kv)
    np.testing.assert_array_equal(after[:, :, [6, 7, 8]], original[:, :, [3, 5, 10]])
    untouched = [b for b in range(BLOCKS) if b not in (3, 5, 10, 6, 7, 8)]
    np.testing.assert_array_equal(after[:, :, untouched], original[:, :, untouched])


def test_moves_larger_than_the_warmed_size_run_in_chunks():
    kv = filled_cache()
    kv.warm_up(3)
    assert kv.max_pairs_per_call == 4
    original = device(kv)
    pairs = [(b, b + 6) for b in range(6)]  # 6 pairs: chunks of 4 and 2
    assert [len(c) for c in kv._chunks(pairs)] == [4, 2]
    kv.copy(pairs)
    want = original.copy()
    want[:, :, 6:12] = original[:, :, 0:6]
    np.testing.assert_array_equal(device(kv), want)
    kv.swap_out([(b, b) for b in range(6)])
    np.testing.assert_array_equal(kv.host, want[:, :, :6])
    kv.swap_in([(h, 5 - h) for h in range(6)])
    np.testing.assert_array_equal(device(kv)[:, :, :6], want[:, :, :6][:, :, ::-1])


def test_warm_up_changes_nothing_and_reset_zeroes_the_pool():
    kv = filled_cache()
    original = device(kv)
    kv.warm_up(8)
    np.testing.assert_array_equal(device(kv), original)
    np.testing.assert_array_equal(kv.host, 0)
    assert not kv.is_lost()
    kv.caches[0][0].delete()  # what a failed donated call leaves behind
    assert kv.is_lost()
    kv.reset()
    assert not kv.is_lost()
    np.testing.assert_array_equal(device(kv), 0)
    assert all(k.shape == (BLOCKS, BS, HEADS, DIM) and k.dtype == jnp.float32 for k, _ in kv.caches)


def test_no_host_pool_without_swap_space():
    kv = filled_cache(num_host_blocks=0)
    original = device(kv)
    assert kv.host is None
    kv.warm_up(4)  # compiles the copy program only
    kv.copy([(0, 1)])
    np.testing.assert_array_equal(device(kv)[:, :, 1], original[:, :, 0])


@pytest.mark.parametrize("n", [1, 3, 5])
def test_swap_round_trip_of_any_pair_count(n):
    kv = filled_cache()
    original = device(kv)
    kv.swap_out([(b, b) for b in range(n)])
    kv.swap_in([(b, BLOCKS - 1 - b) for b in range(n)])
    after = device(kv)
    for b in range(n):
        np.testing.assert_array_equal(after[:, :, BLOCKS - 1 - b], original[:, :, b])
