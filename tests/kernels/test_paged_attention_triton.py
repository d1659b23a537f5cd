"""The Triton-language (jax-triton) decode kernel against the jnp reference.

The kernel needs a GPU, triton and jax_triton: those tests are marked ``gpu``. On CPU only the
module import and the wrapper's input checks run (they come before any triton import). The
kernel logic is also checked on CPU under ``TRITON_INTERPRET=1`` outside this suite.
"""

from __future__ import annotations

import importlib.util
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.ablations.paged_attention_decode_triton import paged_attention_decode_triton
from pallas_kernels.paged_attention_decode import paged_attention_decode_reference
from tests.helpers.paged_cases import BF16, F16, F32, TOL, paged_case, rel_err

HAS_JAX_TRITON = importlib.util.find_spec("jax_triton") is not None


def _small(dtype=F32, hq=4, hkv=2, d=64, bs=16, S=2, mb=4):
    return dict(
        q=jnp.zeros((S, hq, d), dtype), k_cache=jnp.zeros((8, bs, hkv, d), dtype),
        v_cache=jnp.zeros((8, bs, hkv, d), dtype), seq_lens=jnp.ones((S,), jnp.int32),
        block_tables=jnp.zeros((S, mb), jnp.int32),
    )


@pytest.mark.parametrize(
    "change, kwargs, field",
    [
        (dict(hq=6, hkv=4), {}, "num_q_heads"),
        (dict(bs=64), {}, "block_size"),
        (dict(bs=4), {}, "block_size"),
        (dict(d=8), {}, "head_dim"),
        (dict(dtype=jnp.int8), {}, "dtype"),
        ({}, dict(keys_per_step=24), "keys_per_step"),
        ({}, dict(keys_per_step=8), "keys_per_step"),
        ({}, dict(sliding_window=0), "sliding_window"),
        ({}, dict(num_splits=0), "num_splits"),
        ({}, dict(num_warps=3), "num_warps"),
        ({}, dict(num_stages=0), "num_stages"),
        ({}, dict(logits_soft_cap=30.0), "not supported by the triton variant"),
        ({}, dict(alibi_slopes=jnp.ones((4,))), "not supported by the triton variant"),
    ],
)
def test_validation_errors_name_the_field(change, kwargs, field):
    a = _small(**change)
    with pytest.raises(ValueError, match=field):
        paged_attention_decode_triton(a["q"], a["k_cache"], a["v_cache"], a["seq_lens"], a["block_tables"], scale=0.1, **kwargs)


def test_shape_mismatch_errors():
    a = _small()
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention_decode_triton(a["q"], a["k_cache"], a["v_cache"], a["seq_lens"], a["block_tables"][:1], scale=0.1)
    with pytest.raises(ValueError, match="head_dim mismatch"):
        paged_attention_decode_triton(a["q"][..., :32], a["k_cache"], a["v_cache"], a["seq_lens"], a["block_tables"], scale=0.1)


@pytest.mark.skipif(HAS_JAX_TRITON, reason="jax_triton is installed")
def test_missing_jax_triton_is_a_clear_runtime_error():
    a = _small()
    with pytest.raises(RuntimeError, match="jax_triton"):
        paged_attention_decode_triton(a["q"], a["k_cache"], a["v_cache"], a["seq_lens"], a["block_tables"], scale=0.1)


# (hq, hkv, head_dim, block_size, dtype, sliding_window)
GPU_CASES = [
    (32, 8, 128, 16, BF16, None),
    (32, 32, 128, 16, BF16, None),
    (16, 1, 80, 8, F16, None),
    (16, 2, 80, 32, BF16, 100),
    (8, 2, 256, 16, F16, None),
    (8, 2, 64, 16, F32, 300),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-bs{c[3]}-{jnp.dtype(c[4]).name}-w{c[5]}")
def test_triton_decode_kernel_gpu(case):
    pytest.importorskip("jax_triton")
    hq, hkv, d, bs, dtype, window = case
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    ctx = [int(x) for x in rng.integers(0, 3000, 11)] + [0, 2047, 1]
    c = paged_case(rng, [1] * 14 + [0], ctx + [0], hq=hq, hkv=hkv, d=d, bs=bs, dtype=dtype, num_tokens=15)
    args = (c["q"], c["k_cache"], c["v_cache"], c["seq_lens"], c["block_tables"])
    ref = paged_attention_decode_reference(*args, scale=d**-0.5, sliding_window=window)
    variants = [dict(), dict(num_splits=1), dict(num_splits=5, prefetch=False), dict(keys_per_step=64, num_warps=8)]
    for kw in variants:
        out = paged_attention_decode_triton(*args, scale=d**-0.5, sliding_window=window, **kw)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert rel_err(out, ref) < TOL[dtype], kw
        np.testing.assert_array_equal(np.asarray(out[14], np.float32), 0.0)
