"""An fp8 KV cache (``kv_cache_dtype="fp8"``): the write saturates into the format, the kernels read
fp8 tiles and convert them to q's dtype, and give the reference's output on the same fp8 cache
(interpret mode on the CPU; compiled with ``gpu``); the engine serves with it."""

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention_router import ragged_paged_attention
from pallas_kernels.kv_cache_write import to_cache_dtype, write_kv
from pallas_kernels.paged_attention_decode import paged_attention_decode, paged_attention_decode_reference
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_pallas, ragged_paged_attention_reference
from tests.helpers.paged_cases import BF16, F32, TOL, paged_case, rel_err

FP8 = (jnp.float8_e4m3fn, jnp.float8_e5m2)
ARGS = ("q", "k_cache", "v_cache", "positions", "query_start_loc", "seq_lens", "block_tables")


def _fp8_case(rng, q_lens, ctx, *, dtype, fp8, hq=8, hkv=2, d=64, bs=16):
    c = paged_case(rng, q_lens, ctx, hq=hq, hkv=hkv, d=d, bs=bs, dtype=F32, num_tokens=sum(q_lens) + 2)
    c["q"] = c["q"].astype(dtype)
    for name in ("k_cache", "v_cache"):
        c[name] = to_cache_dtype(c[name] * 3.0, fp8)  # NaN poison stays NaN: unwritten slots
    return c


@pytest.mark.parametrize("fp8", FP8, ids=lambda t: jnp.dtype(t).name)
def test_write_saturates_instead_of_nan(fp8):
    big = float(jnp.finfo(fp8).max)
    k = jnp.asarray([[[1e6, -1e6, 0.5, big]]], F32).reshape(1, 1, 4)
    kc = jnp.zeros((2, 4, 1, 4), fp8)
    for backend in ("reference", "pallas"):
        out, _ = write_kv(kc, kc, k, k, jnp.asarray([5]), backend=backend, interpret=True)
        row = np.asarray(out.reshape(8, 4)[5], np.float32)
        assert np.isfinite(row).all() and row[0] == big and row[1] == -big and row[3] == big, (backend, row)


@pytest.mark.parametrize("fp8", FP8, ids=lambda t: jnp.dtype(t).name)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_kernels_read_fp8_tiles_interpret(fp8, dtype):
    rng = np.random.default_rng(zlib.crc32(f"{fp8}{dtype}".encode()))
    # decode kernel
    c = _fp8_case(rng, [1, 1, 1, 0], [37, 5, 70, 0], dtype=dtype, fp8=fp8)
    args = (c["q"][:4], c["k_cache"], c["v_cache"], c["seq_lens"], c["block_tables"])  # one query a sequence
    out = paged_attention_decode(*args, scale=0.125, num_splits=2, interpret=True)
    ref = paged_attention_decode_reference(*args, scale=0.125)
    assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype]
    # ragged kernel: a prefill, a chunk on a context, a decode
    c = _fp8_case(rng, [21, 6, 1], [0, 19, 40], dtype=dtype, fp8=fp8)
    args = [c[k] for k in ARGS]
    out = ragged_paged_attention_pallas(*args, scale=0.125, interpret=True)
    ref = ragged_paged_attention_reference(*args, scale=0.125)
    assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype]
    np.testing.assert_array_equal(np.asarray(out[-2:], np.float32), 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("decode_only", [True, False])
def test_fp8_cache_kernels_gpu(decode_only):
    rng = np.random.default_rng(3)
    q_lens, ctx = ([1] * 6, [300, 17, 1000, 64, 5, 0]) if decode_only else ([200, 1, 1, 40], [0, 500, 70, 123])
    c = _fp8_case(rng, q_lens, ctx, dtype=BF16, fp8=jnp.float8_e4m3fn, hq=32, hkv=8, d=128)
    if decode_only:
        c = {k: (v[: len(q_lens)] if k in ("q", "positions") else v) for k, v in c.items()}
    args = [c[k] for k in ARGS]
    out = ragged_paged_attention(*args, scale=128**-0.5, backend="pallas", decode_only=decode_only)
    ref = ragged_paged_attention_reference(*args, scale=128**-0.5)
    assert rel_err(out, ref) < TOL[BF16]
