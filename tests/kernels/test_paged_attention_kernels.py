"""Pallas paged-attention kernels against the jnp reference.

On CPU the kernels run in the Pallas interpreter (``interpret=True``); tests marked ``gpu`` compile
them with the Triton lowering. Every cache starts as NaN and only the slots a sequence owns are
written, and block tables are shuffled, so a read outside a sequence's keys shows up as NaN.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention_metadata import pack_attention_metadata
from models.layers import paged_attention
from pallas_kernels import default_attention_backend
from pallas_kernels.attention_router import ragged_paged_attention
from pallas_kernels.kv_cache_write import write_kv, write_kv_reference
from pallas_kernels.paged_attention_decode import (
    paged_attention_decode,
    paged_attention_decode_reference,
)
from pallas_kernels.ragged_paged_attention import (
    ragged_paged_attention_pallas,
    ragged_paged_attention_reference,
)
from tests.helpers.paged_cases import BF16, F16, F32, RAGGED_CASES, TOL, attention_features, paged_case, rel_err

ON_GPU = jax.default_backend() == "gpu"


# (hq, hkv, head_dim, block_size, dtype, sliding_window, alibi, soft_cap, num_splits)
DECODE_CASES = [
    (4, 4, 64, 16, F32, None, False, None, None),  # MHA
    (8, 2, 32, 8, F32, None, False, None, 3),  # GQA, split-K
    (4, 1, 80, 8, F32, None, False, None, None),  # MQA, head_dim padded to 128
    (4, 2, 96, 32, F32, 21, False, None, 2),  # sliding window across splits
    (4, 2, 64, 16, F32, None, True, None, 2),  # ALiBi
    (4, 2, 64, 8, BF16, None, False, 30.0, None),  # soft cap, bf16
    (2, 2, 128, 16, F16, None, False, None, None),  # fp16
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-bs{c[3]}-{jnp.dtype(c[4]).name}")
def test_decode_kernel_matches_reference_interpret(case):
    hq, hkv, d, bs, dtype, window, alibi, cap, splits = case
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    ctx = [int(x) for x in rng.integers(0, 70, 4)] + [0]
    q_lens = [1, 1, 1, 1, 0]  # last: a padding sequence (seq_len 0) must come out as zeros
    c = paged_case(rng, q_lens, ctx, hq=hq, hkv=hkv, d=d, bs=bs, dtype=dtype, num_tokens=5)
    feats = attention_features(rng, hq, alibi, cap)
    args = (c["q"], c["k_cache"], c["v_cache"], c["seq_lens"], c["block_tables"])
    out = paged_attention_decode(
        *args, scale=d**-0.5, sliding_window=window, num_splits=splits, interpret=True, **feats,
    )
    ref = paged_attention_decode_reference(*args, scale=d**-0.5, sliding_window=window, **feats)
    assert out.shape == c["q"].shape and out.dtype == c["q"].dtype
    assert rel_err(out, ref) < TOL[dtype]
    np.testing.assert_array_equal(np.asarray(out[4], np.float32), 0.0)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_merge_splits_kernel_matches_jnp_merge_interpret(dtype):
    """The one-launch merge against the jnp merge: 5 splits (padded to 8), GQA 3 of 16 padded rows,
    head_dim 80 of 128; some splits empty (l = 0, m = mask value), one head with every split empty."""
    from pallas_kernels.kernel_shapes import MASK_VALUE
    from pallas_kernels.paged_attention_decode import merge_splits, merge_splits_pallas

    rng = np.random.default_rng(5)
    S, hkv, splits, G, gp, D, dp = 2, 2, 5, 3, 16, 80, 128
    o = rng.standard_normal((S, hkv, splits, gp, dp)).astype(np.float32) * 4
    m = rng.uniform(-8, 8, (S, hkv, splits, gp)).astype(np.float32)
    l = rng.uniform(0.5, 3, (S, hkv, splits, gp)).astype(np.float32)
    empty = rng.random((S, hkv, splits)) < 0.3
    empty[1, 0] = True  # sequence 1, KV head 0: no keys in any split
    m = np.where(empty[..., None], MASK_VALUE, m)
    l = np.where(empty[..., None], 0.0, l)
    o = np.where(empty[..., None, None], 0.0, o)
    # Padded rows / columns hold garbage the merge must not read into the output.
    o[:, :, :, G:, :] = np.nan
    o[:, :, :, :, D:] = np.nan
    out = merge_splits_pallas(jnp.asarray(o), jnp.asarray(m), jnp.asarray(l), num_q_heads=hkv * G, head_dim=D,
                              dtype=dtype, interpret=True)
    ref = merge_splits(jnp.asarray(o[:, :, :, :G, :D]), jnp.asarray(m[..., :G]), jnp.asarray(l[..., :G]))
    ref = ref.reshape(S, hkv * G, D)
    assert out.shape == (S, hkv * G, D) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    np.testing.assert_array_equal(np.asarray(out[1, :G], np.float32), 0.0)
    with pytest.raises(ValueError, match="num_q_heads"):
        merge_splits_pallas(jnp.asarray(o), jnp.asarray(m), jnp.asarray(l), num_q_heads=hkv * 17, head_dim=D,
                            dtype=dtype, interpret=True)




@pytest.mark.parametrize("loop", [(False, False), (True, False), (False, True)],
                         ids=lambda p: f"prefetch{int(p[0])}-flat{int(p[1])}")
@pytest.mark.parametrize("case", RAGGED_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-bs{c[3]}-{jnp.dtype(c[4]).name}")
def test_ragged_kernel_matches_reference_interpret(case, loop):
    prefetch, flat_gather = loop
    hq, hkv, d, bs, dtype, window, alibi, cap, block_m, bpi = case
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    # prefill from scratch, chunked prefill on a context, decode tokens, an empty sequence
    q_lens = [int(rng.integers(9, 40)), int(rng.integers(2, 20)), 1, 1, 0]
    ctx = [0, int(rng.integers(5, 50)), int(rng.integers(0, 60)), 0, 0]
    T = sum(q_lens) + 3  # padding tokens at the end must come out as zeros
    c = paged_case(rng, q_lens, ctx, hq=hq, hkv=hkv, d=d, bs=bs, dtype=dtype, num_tokens=T)
    feats = attention_features(rng, hq, alibi, cap)
    args = [c[k] for k in ("q", "k_cache", "v_cache", "positions", "query_start_loc", "seq_lens", "block_tables")]
    out = ragged_paged_attention_pallas(
        *args, scale=d**-0.5, sliding_window=window, block_m=block_m, blocks_per_iter=bpi,
        heads_fastest=bpi == 1, prefetch=prefetch, flat_gather=flat_gather, interpret=True, **feats,
    )
    ref = ragged_paged_attention_reference(*args, scale=d**-0.5, sliding_window=window, **feats)
    assert out.shape == c["q"].shape and out.dtype == c["q"].dtype
    assert rel_err(out, ref) < TOL[dtype]
    np.testing.assert_array_equal(np.asarray(out[-3:], np.float32), 0.0)


@pytest.mark.parametrize("case", RAGGED_CASES[:4], ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-bs{c[3]}-{jnp.dtype(c[4]).name}")
def test_split_decode_rows_matches_reference_interpret(case):
    """Mixed steps with the single-token rows on the decode kernel give the reference's output,
    including a one-token prefill chunk that is not at its sequence's last key."""
    hq, hkv, d, bs, dtype, window, alibi, cap, _, _ = case
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()) + 1)
    q_lens = [1, int(rng.integers(9, 30)), 1, 1, int(rng.integers(2, 9)), 0]
    ctx = [int(rng.integers(0, 60)), 0, int(rng.integers(0, 60)), 5, int(rng.integers(5, 40)), 0]
    T = sum(q_lens) + 3
    c = paged_case(rng, q_lens, ctx, hq=hq, hkv=hkv, d=d, bs=bs, dtype=dtype, num_tokens=T)
    # Sequence 3's one token sits at position 2 of 6 cached keys: it must see keys 0..2 only, so
    # it is not a decode row (the decode kernel would read all 6).
    t3 = int(c["query_start_loc"][3])
    c["positions"] = c["positions"].at[t3].set(2)
    feats = attention_features(rng, hq, alibi, cap)
    args = [c[k] for k in ("q", "k_cache", "v_cache", "positions", "query_start_loc", "seq_lens", "block_tables")]
    ref = ragged_paged_attention_reference(*args, scale=d**-0.5, sliding_window=window, **feats)
    out = ragged_paged_attention(*args, scale=d**-0.5, sliding_window=window, backend="pallas",
                                 split_decode_rows=True, interpret=True, **feats)
    assert rel_err(out, ref) < TOL[dtype]
    np.testing.assert_array_equal(np.asarray(out[-3:], np.float32), 0.0)


def test_dispatch_decode_only_uses_decode_kernel_and_matches():
    rng = np.random.default_rng(7)
    c = paged_case(rng, [1, 1, 1], [5, 40, 17], hq=4, hkv=2, d=32, bs=8, dtype=F32)
    args = [c[k] for k in ("q", "k_cache", "v_cache", "positions", "query_start_loc", "seq_lens", "block_tables")]
    ref = ragged_paged_attention(*args, scale=0.2)
    for decode_only in (False, True):
        out = ragged_paged_attention(*args, scale=0.2, backend="pallas", decode_only=decode_only, interpret=True)
        assert rel_err(out, ref) < 1e-5
    jaxpr = str(jax.make_jaxpr(
        lambda *a: ragged_paged_attention(*a, scale=0.2, backend="pallas", decode_only=True, interpret=True)
    )(*args))
    assert "paged_attention_decode" in jaxpr and "ragged_paged_attention" not in jaxpr.replace("pjit", "")


def test_reference_in_token_groups_matches_all_at_once(monkeypatch):
    # The oracle goes through the tokens in groups bounded by REFERENCE_CHUNK_BYTES (a long prompt's
    # all-at-once gather does not fit an 80 GB card); every feature must see the same tokens.
    import pallas_kernels.ragged_paged_attention as rpa

    rng = np.random.default_rng(11)
    c = paged_case(rng, [40, 1, 9, 0], [30, 65, 0, 0], hq=4, hkv=2, d=32, bs=8, dtype=F32, num_tokens=56)
    args = [c[k] for k in ("q", "k_cache", "v_cache", "positions", "query_start_loc", "seq_lens", "block_tables")]
    kw = dict(scale=0.2, sliding_window=24, alibi_slopes=jnp.array([0.5, 0.25, 0.125, 0.0625]), logits_soft_cap=30.0)
    whole = rpa.ragged_paged_attention_reference(*args, **kw)
    keys = c["block_tables"].shape[1] * 8
    monkeypatch.setattr(rpa, "REFERENCE_CHUNK_BYTES", 7 * keys * 2 * 32 * 4)  # 7 tokens a group, 8 groups
    grouped = rpa.ragged_paged_attention_reference(*args, **kw)
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(whole), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(grouped[50:]), 0.0)  # padding tokens stay zero


def test_validation_errors_name_the_field():
    rng = np.random.default_rng(3)
    c = paged_case(rng, [3, 1], [4, 9], hq=4, hkv=2, d=32, bs=8, dtype=F32)
    args = [c[k] for k in ("q", "k_cache", "v_cache", "positions", "query_start_loc", "seq_lens", "block_tables")]
    with pytest.raises(ValueError, match="backend 'cudnn' is not available; allowed: 'reference', 'pallas', 'mosaic'"):
        ragged_paged_attention(*args, scale=1.0, backend="cudnn")
    with pytest.raises(ValueError, match="decode_only"):
        ragged_paged_attention(*args, scale=1.0, backend="pallas", decode_only=True)
    with pytest.raises(ValueError, match="alibi_slopes"):
        ragged_paged_attention(*args, scale=1.0, alibi_slopes=jnp.ones(3))
    bad = [a.astype(jnp.int8) if i in (0, 1, 2) else a for i, a in enumerate(args)]
    with pytest.raises(ValueError, match="dtype"):
        ragged_paged_attention(*bad, scale=1.0, backend="pallas")
    with pytest.raises(ValueError, match="block_size 12"):
        kc = jnp.zeros((4, 12, 2, 32), F32)
        paged_attention_decode(c["q"][:2], kc, kc, c["seq_lens"], c["block_tables"], scale=1.0)
    with pytest.raises(ValueError, match="blocks_per_iter"):
        paged_attention_decode(c["q"][:2], c["k_cache"], c["v_cache"], c["seq_lens"], c["block_tables"],
                               scale=1.0, blocks_per_iter=3)


def test_engine_args_allow_exactly_the_kernel_backends():
    """engine_args validates against the kernels' own (JAX-free) list, not a copy."""
    from jaxpaged.engine_args import ATTENTION_BACKENDS as ENGINE_BACKENDS
    from pallas_kernels.backends import ATTENTION_BACKENDS

    assert ENGINE_BACKENDS is ATTENTION_BACKENDS


def test_default_backend():
    assert default_attention_backend("cpu") == "reference"
    assert default_attention_backend("gpu") == "pallas"
    assert default_attention_backend() == ("pallas" if ON_GPU else "reference")


def test_attention_backend_refused_where_it_cannot_run():
    from pallas_kernels import check_attention_backend

    check_attention_backend("reference", "cpu")
    check_attention_backend("pallas", "gpu", "8.0")
    check_attention_backend("mosaic", "gpu", "9.0")
    for backend in ("pallas", "mosaic"):
        with pytest.raises(ValueError, match=f"attention_backend='{backend}' needs an NVIDIA GPU"):
            check_attention_backend(backend, "cpu")
    with pytest.raises(ValueError, match="attention_backend='mosaic' needs a Hopper GPU .*'8.6'"):
        check_attention_backend("mosaic", "gpu", "8.6")


def _kv_write_case(rng, dtype=F32, hkv=3, d=24):
    kc = jnp.asarray(rng.standard_normal((10, 4, hkv, d)), dtype)
    vc = jnp.asarray(rng.standard_normal((10, 4, hkv, d)), dtype)
    k = jnp.asarray(rng.standard_normal((7, hkv, d)), dtype)
    v = jnp.asarray(rng.standard_normal((7, hkv, d)), dtype)
    slots = jnp.asarray(rng.permutation(40)[:7].astype(np.int32)).at[jnp.array([1, 5])].set(-1)
    return kc, vc, k, v, slots


def test_kv_write_pallas_matches_scatter_interpret():
    rng = np.random.default_rng(11)
    kc, vc, k, v, slots = _kv_write_case(rng)
    ref = write_kv_reference(kc, vc, k, v, slots)
    out = write_kv(kc, vc, k, v, slots, backend="pallas", interpret=True)
    for o, r in zip(out, ref):
        np.testing.assert_array_equal(np.asarray(o), np.asarray(r))
    flat = np.asarray(ref[0]).reshape(40, 3, 24)
    for t, s in enumerate(np.asarray(slots)):
        if s >= 0:
            np.testing.assert_array_equal(flat[s], np.asarray(k[t]))


def _step_temp_bytes(backend: str, decode_only: bool, interpret: bool = False):
    """Compiles a donated write+attention step; returns (temp bytes, one cache's bytes)."""
    nb, bs, hkv, d, hq, S = 512, 16, 2, 64, 4, 4
    cache = jax.ShapeDtypeStruct((nb, bs, hkv, d), F32)
    md, pos = pack_attention_metadata(
        [1] * S, [10, 20, 30, 40], [[i * 4, i * 4 + 1, i * 4 + 2, i * 4 + 3] for i in range(S)], block_size=bs,
        decode_only=decode_only, attention_backend=backend,
    )

    def step(kc, vc, q, k, v):
        out, (kc, vc) = paged_attention(q, k, v, (kc, vc), jnp.asarray(pos), jax.tree.map(jnp.asarray, md), scale=0.1)
        return out, kc, vc

    qs = jax.ShapeDtypeStruct((S, hq, d), F32)
    kvs = jax.ShapeDtypeStruct((S, hkv, d), F32)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(cache, cache, qs, kvs, kvs).compile()
    mem = compiled.memory_analysis()
    return mem, nb * bs * hkv * d * 4


def test_jitted_step_updates_donated_cache_in_place():
    mem, cache_bytes = _step_temp_bytes("reference", decode_only=False)
    if mem is None:
        pytest.skip("this backend reports no memory analysis")
    # In place: the outputs alias the donated caches and no temporary holds a cache copy.
    assert mem.alias_size_in_bytes >= 2 * cache_bytes
    assert mem.temp_size_in_bytes < cache_bytes


# ---------------------------------------------------------------------------------------------
# GPU: the compiled Triton kernels.

GPU_DECODE = [
    (32, 8, 128, 16, BF16, None, False, None),
    (32, 32, 128, 16, BF16, None, False, None),
    (16, 2, 80, 8, BF16, 100, False, None),
    (8, 8, 96, 32, F16, None, True, None),
    (8, 1, 256, 16, BF16, None, False, 30.0),
    (8, 2, 64, 16, F32, None, False, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_DECODE, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-bs{c[3]}-{jnp.dtype(c[4]).name}")
def test_decode_kernel_gpu(case):
    hq, hkv, d, bs, dtype, window, alibi, cap = case
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    ctx = [int(x) for x in rng.integers(0, 3000, 11)] + [0, 2047, 1]
    c = paged_case(rng, [1] * 14 + [0], ctx + [0], hq=hq, hkv=hkv, d=d, bs=bs, dtype=dtype, num_tokens=15)
    feats = attention_features(rng, hq, alibi, cap)
    args = (c["q"], c["k_cache"], c["v_cache"], c["seq_lens"], c["block_tables"])
    ref = paged_attention_decode_reference(*args, scale=d**-0.5, sliding_window=window, **feats)
    for splits in (None, 1, 5):
        out = paged_attention_decode(
            *args, scale=d**-0.5, sliding_window=window, num_splits=splits, **feats
        )
        assert rel_err(out, ref) < TOL[dtype], splits
        np.testing.assert_array_equal(np.asarray(out[14], np.float32), 0.0)


GPU_RAGGED = [
    (32, 8, 128, 16, BF16, None, False),
    (32, 32, 128, 16, BF16, None, False),
    (16, 2, 80, 8, BF16, 200, False),
    (8, 8, 96, 32, F16, None, True),
    (8, 1, 256, 16, BF16, None, False),
    (8, 2, 64, 16, F32, None, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["plain", "prefetch", "split_decode_rows"])
@pytest.mark.parametrize("case", GPU_RAGGED, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-bs{c[3]}-{jnp.dtype(c[4]).name}")
def test_ragged_kernel_gpu(case, variant):
    hq, hkv, d, bs, dtype, window, alibi = case
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    q_lens = [700, 129, 1, 1, 64, 1, 0]
    ctx = [0, 900, 1500, 3, 0, 0, 0]
    c = paged_case(rng, q_lens, ctx, hq=hq, hkv=hkv, d=d, bs=bs, dtype=dtype, num_tokens=sum(q_lens) + 5)
    feats = attention_features(rng, hq, alibi, None)
    args = [c[k] for k in ("q", "k_cache", "v_cache", "positions", "query_start_loc", "seq_lens", "block_tables")]
    ref = ragged_paged_attention_reference(*args, scale=d**-0.5, sliding_window=window, **feats)
    if variant == "split_decode_rows":
        out = ragged_paged_attention(*args, scale=d**-0.5, sliding_window=window, backend="pallas",
                                     split_decode_rows=True, **feats)
    else:
        out = ragged_paged_attention_pallas(*args, scale=d**-0.5, sliding_window=window,
                                            prefetch=variant == "prefetch", **feats)
    assert rel_err(out, ref) < TOL[dtype]
    np.testing.assert_array_equal(np.asarray(out[-5:], np.float32), 0.0)


@pytest.mark.gpu
def test_kv_write_pallas_gpu():
    rng = np.random.default_rng(5)
    for dtype, hkv, d in ((BF16, 8, 128), (F16, 3, 80)):
        kc, vc, k, v, slots = _kv_write_case(rng, dtype, hkv, d)
        ref = write_kv_reference(kc, vc, k, v, slots)
        out = write_kv(kc, vc, k, v, slots, backend="pallas")
        for o, r in zip(out, ref):
            np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(r, np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("decode_only", [False, True])
def test_jitted_step_in_place_gpu(decode_only):
    mem, cache_bytes = _step_temp_bytes("pallas", decode_only=decode_only)
    assert mem.alias_size_in_bytes >= 2 * cache_bytes
    assert mem.temp_size_in_bytes < cache_bytes
