"""Mosaic GPU decode kernel vs the jnp reference: in the Mosaic GPU interpreter on CPU, and
compiled on a Hopper GPU (``gpu`` marker)."""

from __future__ import annotations

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.ablations.paged_attention_decode_mosaic import paged_attention_decode_mosaic
from pallas_kernels.paged_attention_decode import paged_attention_decode_reference
from tests.helpers.paged_cases import paged_case, rel_err

BF16, F16 = jnp.bfloat16, jnp.float16


def _decode_case(seed, seq_lens, *, hq, hkv, d, bs, dtype):
    """Shuffled blocks, NaN in every cache row no sequence owns; seq_len 0 marks a padding row."""
    rng = np.random.default_rng(seed)
    lens = np.asarray(seq_lens)
    case = paged_case(rng, [1] * len(lens), np.maximum(lens - 1, 0), hq=hq, hkv=hkv, d=d, bs=bs, dtype=dtype)
    sl = jnp.where(jnp.asarray(lens) == 0, 0, case["seq_lens"])
    args = (case["q"], case["k_cache"], case["v_cache"], sl, case["block_tables"])
    return args, d ** -0.5


def _check(args, scale, tol, **kw):
    out = paged_attention_decode_mosaic(*args, scale=scale, **kw)
    ref = paged_attention_decode_reference(*args, scale=scale)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not bool(jnp.isnan(out.astype(jnp.float32)).any())
    assert rel_err(out, ref) < tol
    padding = np.asarray(args[3]) == 0
    assert not bool(jnp.any(out[padding] != 0))


# (hq, hkv, head_dim, block_size, dtype, seq_lens, kwargs)
INTERPRET_CASES = [
    (32, 8, 64, 16, BF16, [0, 1, 37], {}),  # GQA 32:8, lengths 0 / 1 / not a block multiple
    (4, 4, 64, 32, F16, [70, 1, 0, 33], dict(num_splits=2, num_stages=2)),  # MHA, split context
    (8, 1, 128, 16, BF16, [17, 140], dict(keys_per_step=128, num_stages=2)),  # MQA, head_dim 128
    # Group 3: windows start 8-aligned, so groups sit 0..7 rows in; the last ones clamp at q's end.
    (6, 2, 64, 16, BF16, [3, 0, 20, 1, 9, 33, 2, 17, 5, 40, 1, 12], dict(num_splits=1, num_stages=2)),
]


@pytest.mark.parametrize("case", INTERPRET_CASES, ids=lambda c: f"{c[0]}:{c[1]}-d{c[2]}-bs{c[3]}")
def test_mosaic_decode_matches_reference_interpret(case):
    hq, hkv, d, bs, dtype, lens, kw = case
    args, scale = _decode_case(zlib.crc32(repr(case).encode()), lens, hq=hq, hkv=hkv, d=d, bs=bs, dtype=dtype)
    _check(args, scale, 2e-2, interpret=True, **kw)


def test_mosaic_decode_validation_names_the_field():
    args, scale = _decode_case(0, [5], hq=4, hkv=2, d=64, bs=16, dtype=BF16)
    q, kc, vc, sl, bt = args
    bad = {
        "dtype": ((q.astype(jnp.float32), kc.astype(jnp.float32), vc.astype(jnp.float32), sl, bt), {}),
        "head_dim": ((q[..., :32], kc[..., :32], vc[..., :32], sl, bt), {}),
        "block_size": ((q, kc[:, :8], vc[:, :8], sl, bt), {}),
        "num_q_heads": ((q[:, :3], kc, vc, sl, bt), {}),
        "keys_per_step": (args, dict(keys_per_step=32)),
        "num_stages": (args, dict(num_stages=0)),
        "shared memory": (args, dict(keys_per_step=128, num_stages=8)),
        "block_tables": ((q, kc, vc, sl, bt[0]), {}),
    }
    for field, (a, kw) in bad.items():
        with pytest.raises(ValueError, match=field):
            paged_attention_decode_mosaic(*a, scale=scale, **kw)
    # 62 heads can start 6 rows into their 8-aligned window: they do not fit 64 rows.
    with pytest.raises(ValueError, match="num_q_heads"):
        paged_attention_decode_mosaic(jnp.zeros((1, 62, 64), BF16), kc[:, :, :1], vc[:, :, :1], sl[:1], bt[:1], scale=scale)


GPU_CASES = [
    (32, 8, 128, 16, BF16, [0, 1, 15, 16, 17, 1000, 2049], {}),
    (32, 32, 128, 16, BF16, [1, 63, 64, 65, 700, 0], dict(num_stages=4)),
    (32, 8, 128, 32, F16, [3, 333, 4097], dict(keys_per_step=128, num_splits=3, num_stages=2)),
    (16, 2, 64, 16, BF16, [5, 130, 900], dict(p_in_smem=True, num_stages=2)),
    (64, 1, 128, 16, BF16, [1, 2, 3000], dict(num_splits=1)),
    (8, 8, 128, 16, F16, [7] * 40 + [0, 515], {}),
    (24, 8, 128, 16, BF16, [9, 300, 0, 64, 1, 2000, 77], dict(num_splits=1)),  # group 3: unaligned windows
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}:{c[1]}-d{c[2]}-bs{c[3]}-{sorted(c[6])}")
def test_mosaic_decode_matches_reference_gpu(case):
    hq, hkv, d, bs, dtype, lens, kw = case
    args, scale = _decode_case(zlib.crc32(repr(case).encode()), lens, hq=hq, hkv=hkv, d=d, bs=bs, dtype=dtype)
    _check(args, scale, 2e-2, **kw)
