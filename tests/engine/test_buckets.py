"""The padded step shapes the runner compiles (jaxpaged/buckets.py)."""

from __future__ import annotations

import pytest

from jaxpaged.buckets import Bucket, geometric_range, make_buckets, pick_bucket


def test_geometric_range_ends_at_its_limit():
    assert geometric_range(16, 512) == [16, 32, 64, 128, 256, 512]
    assert geometric_range(16, 100) == [16, 32, 64, 100]
    assert geometric_range(1, 64, 4) == [1, 4, 16, 64]
    assert geometric_range(8, 8) == [8]


def test_mixed_buckets_hold_at_most_as_many_sequences_as_tokens():
    buckets = make_buckets(512, 64, with_decode_buckets=False)
    assert buckets == [Bucket(t, min(t, 64)) for t in (16, 32, 64, 128, 256, 512)]
    assert all(not b.decode_only for b in buckets)
    # A budget that is not a power of two is its own largest bucket.
    assert make_buckets(100, 8, with_decode_buckets=False)[-1] == Bucket(100, 8)


def test_decode_buckets_and_coarser_mixed_ones_for_the_kernel_backends():
    buckets = make_buckets(2048, 256, with_decode_buckets=True, min_mixed_tokens=256, decode_growth=4)
    mixed = [b for b in buckets if not b.decode_only]
    decode = [b for b in buckets if b.decode_only]
    assert mixed == [Bucket(t, 256, False) for t in (256, 512, 1024, 2048)]
    assert decode == [Bucket(s, s, True) for s in (16, 64, 256)]
    assert buckets == sorted(buckets)
    # The decode buckets stop at the smaller of max_num_seqs and the token budget.
    top = make_buckets(64, 256, with_decode_buckets=True)
    assert max(b.num_seqs for b in top if b.decode_only) == 64


def test_pick_bucket_takes_the_smallest_that_fits():
    buckets = make_buckets(512, 64, with_decode_buckets=True)
    assert pick_bucket(buckets, 17, 3, False) == Bucket(32, 32)
    assert pick_bucket(buckets, 512, 64, False) == Bucket(512, 64)
    # A decode-only step prefers the decode bucket of the same size; a mixed step never takes one.
    assert pick_bucket(buckets, 20, 20, True) == Bucket(32, 32, True)
    assert pick_bucket(buckets, 20, 20, False) == Bucket(32, 32, False)
    # More sequences than a token bucket holds move the step to a bigger bucket.
    assert pick_bucket(buckets, 30, 33, False) == Bucket(64, 64)


def test_pick_bucket_refuses_a_step_no_bucket_holds():
    buckets = make_buckets(512, 64, with_decode_buckets=False)
    with pytest.raises(ValueError, match="no bucket holds 513 tokens / 1 sequences"):
        pick_bucket(buckets, 513, 1, False)
    with pytest.raises(ValueError, match="no bucket holds 128 tokens / 65 sequences"):
        pick_bucket(buckets, 128, 65, False)
