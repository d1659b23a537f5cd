"""The "reference" backend's blockwise path gives the all-at-once oracle's output: prefill from
scratch, chunked prefill on a context, decodes, empty sequences and padding tokens, with sliding
window, ALiBi and soft cap, one block per chunk (many loop trips) and the default chunk, under jit."""

import functools
import zlib

import jax
import numpy as np
import pytest

from pallas_kernels.blockwise_attention import ragged_paged_attention_blockwise
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from tests.helpers.paged_cases import RAGGED_CASES, TOL
from tests.helpers.paged_cases import attention_features as _features
from tests.helpers.paged_cases import paged_case as _paged_case
from tests.helpers.paged_cases import rel_err as _rel_err


@pytest.mark.parametrize("keys_per_chunk", [1, 128])
@pytest.mark.parametrize("case", RAGGED_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-bs{c[3]}-w{c[5]}")
def test_blockwise_matches_the_oracle(case, keys_per_chunk):
    hq, hkv, d, bs, dtype, window, alibi, cap, _, _ = case
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()) + 7)
    q_lens = [int(rng.integers(9, 40)), int(rng.integers(2, 20)), 1, 1, 0]
    ctx = [0, int(rng.integers(5, 50)), int(rng.integers(0, 60)), 0, 0]
    T = sum(q_lens) + 3  # padding tokens come out as zeros
    c = _paged_case(rng, q_lens, ctx, hq=hq, hkv=hkv, d=d, bs=bs, dtype=dtype, num_tokens=T, extra_blocks=9)
    feats = _features(rng, hq, alibi, cap)
    args = [c[k] for k in ("q", "k_cache", "v_cache", "positions", "query_start_loc", "seq_lens", "block_tables")]
    ref = ragged_paged_attention_reference(*args, scale=d**-0.5, sliding_window=window, **feats)
    fn = jax.jit(functools.partial(ragged_paged_attention_blockwise, scale=d**-0.5, sliding_window=window,
                                   keys_per_chunk=keys_per_chunk, **feats))
    out = fn(*args)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert _rel_err(out, ref) < TOL[dtype]
    np.testing.assert_array_equal(np.asarray(out[-3:], np.float32), 0.0)


def test_all_padding_step_is_zero():
    rng = np.random.default_rng(3)
    c = _paged_case(rng, [0, 0], [0, 0], hq=4, hkv=2, d=32, bs=8, dtype=np.float32, num_tokens=4)
    args = [c[k] for k in ("q", "k_cache", "v_cache", "positions", "query_start_loc", "seq_lens", "block_tables")]
    np.testing.assert_array_equal(np.asarray(ragged_paged_attention_blockwise(*args, scale=0.1)), 0.0)
