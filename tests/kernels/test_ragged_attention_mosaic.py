"""Mosaic GPU (warp-specialised) prefill kernel vs the jnp reference: in the Mosaic GPU interpreter
on CPU, and compiled on a Hopper GPU (``gpu`` marker)."""

from __future__ import annotations

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention_mosaic import ragged_paged_attention_mosaic
from tests.helpers.paged_cases import paged_case, rel_err

BF16, F16 = jnp.bfloat16, jnp.float16


def _check(case, *, interpret):
    hq, hkv, d, bs, dtype, q_lens, ctx, kw = case
    rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
    # Padding tokens after the last sequence, as in the engine's buckets.
    c = paged_case(rng, q_lens, ctx, hq=hq, hkv=hkv, d=d, bs=bs, dtype=dtype, num_tokens=sum(q_lens) + 5)
    args = (c["q"], c["k_cache"], c["v_cache"], c["positions"], c["query_start_loc"], c["seq_lens"], c["block_tables"])
    ref = ragged_paged_attention_reference(*args, scale=d**-0.5)
    out, taken = ragged_paged_attention_mosaic(
        c["q"], c["k_cache"], c["v_cache"], c["query_start_loc"], c["seq_lens"], c["block_tables"],
        scale=d**-0.5, interpret=interpret, **kw,
    )
    assert out.shape == ref.shape and out.dtype == ref.dtype
    qsl = np.asarray(c["query_start_loc"])
    taken = np.asarray(taken)
    expect = np.cumsum(np.asarray(q_lens) > 0) <= kw.get("max_seqs", len(q_lens))
    np.testing.assert_array_equal(taken, expect & (np.asarray(q_lens) > 0))
    rows = np.zeros(out.shape[0], bool)
    for s in np.flatnonzero(taken):
        rows[qsl[s] : qsl[s + 1]] = True
    assert rel_err(out[rows], ref[rows]) < 2e-2
    # Tokens of sequences it did not take (and padding) are zero, for the caller to fill.
    assert not bool(jnp.any(out[~rows] != 0))


# (hq, hkv, head_dim, block_size, dtype, q_lens, ctx_lens, kwargs)
INTERPRET_CASES = [
    # Unaligned starts, a decode row, a chunk past 128 rows, a chunk after a cached prefix.
    (4, 2, 64, 16, BF16, [20, 1, 150, 37], [5, 30, 0, 100], {}),
    # One block per head for every tile (persistent loop), block_size 8.
    (2, 1, 64, 8, BF16, [200, 9], [40, 0], dict(num_programs=1)),
    # MHA, head_dim 128, 3 stages, and a sequence left to the caller (max_seqs).
    (2, 2, 128, 32, F16, [130, 3, 70], [0, 0, 300], dict(num_stages=3, max_seqs=2)),
    (2, 1, 256, 16, BF16, [64, 64], [0, 17], dict(num_programs=1)),  # head_dim 256 (64 keys a step)
]


@pytest.mark.parametrize("case", INTERPRET_CASES, ids=lambda c: f"{c[0]}:{c[1]}-d{c[2]}-bs{c[3]}-{len(c[5])}seqs")
def test_mosaic_prefill_matches_reference_interpret(case):
    _check(case, interpret=True)


def test_mosaic_prefill_validation_names_the_field():
    rng = np.random.default_rng(0)
    c = paged_case(rng, [5], [3], hq=4, hkv=2, d=64, bs=16, dtype=BF16)
    q, kc, vc, qsl, sl, bt = (c[k] for k in ("q", "k_cache", "v_cache", "query_start_loc", "seq_lens", "block_tables"))
    bad = {
        "dtype": ((q.astype(jnp.float32), kc.astype(jnp.float32), vc.astype(jnp.float32), qsl, sl, bt), {}),
        "head_dim": ((q[..., :32], kc[..., :32], vc[..., :32], qsl, sl, bt), {}),
        "block_size": ((q, kc[:, :4], vc[:, :4], qsl, sl, bt), {}),
        "num_q_heads": ((q[:, :3], kc, vc, qsl, sl, bt), {}),
        "block_kv": ((q, kc, vc, qsl, sl, bt), dict(block_kv=96)),
        "num_stages": ((q, kc, vc, qsl, sl, bt), dict(num_stages=1)),
        "query_start_loc": ((q, kc, vc, qsl[:1], sl, bt), {}),
    }
    for field, (a, kw) in bad.items():
        with pytest.raises(ValueError, match=field):
            ragged_paged_attention_mosaic(*a, scale=0.125, **kw)


GPU_CASES = [
    (32, 8, 128, 16, BF16, [1000, 1, 1, 300, 17], [0, 50, 3000, 2000, 5], {}),
    (4, 4, 128, 16, BF16, [2000], [0], {}),  # one long prompt (the reference holds [T, keys, H, D] in float32)
    (32, 8, 128, 32, F16, [129, 2, 700], [4000, 0, 1], dict(num_stages=2, block_kv=64)),
    (16, 2, 64, 16, BF16, [333, 64, 65], [0, 1, 1000], dict(num_programs=2)),
    (8, 1, 256, 16, BF16, [500, 40], [100, 0], {}),
    (8, 8, 128, 8, F16, [7] * 20 + [300], [100] * 20 + [0], dict(max_seqs=12)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}:{c[1]}-d{c[2]}-bs{c[3]}-{len(c[5])}seqs")
def test_mosaic_prefill_matches_reference_gpu(case):
    _check(case, interpret=False)


def test_mosaic_backend_routes_a_mixed_step_interpret(monkeypatch):
    """attention_backend "mosaic": a mixed step's prefill chunks reach the Mosaic kernel (all of
    them), its decode tokens the decode kernel; features the Mosaic kernel lacks keep the step on
    Pallas."""
    import pallas_kernels.attention_router as router

    ragged_paged_attention = router.ragged_paged_attention
    calls = []
    real = router.ragged_paged_attention_mosaic

    def spy(*a, **kw):
        out, taken = real(*a, **kw)
        calls.append(np.asarray(taken).tolist())
        return out, taken

    monkeypatch.setattr(router, "ragged_paged_attention_mosaic", spy)
    # The threshold is the module's constant; a smaller one keeps the interpreter quick.
    monkeypatch.setattr(router, "MOSAIC_MIN_TOKENS", 16)
    rng = np.random.default_rng(7)
    q_lens, ctx = [1, 40, 1, 9, 70, 1], [30, 0, 65, 20, 3, 0]
    c = paged_case(rng, q_lens, ctx, hq=4, hkv=2, d=64, bs=16, dtype=BF16, num_tokens=128)
    args = (c["q"], c["k_cache"], c["v_cache"], c["positions"], c["query_start_loc"], c["seq_lens"], c["block_tables"])
    ref = ragged_paged_attention_reference(*args, scale=0.125)
    out = ragged_paged_attention(*args, scale=0.125, backend="mosaic", interpret=True)
    # The three prefill chunks went to Mosaic (the decode rows reach it with seq_lens 0).
    assert calls == [[False, True, False, True, True, False]]
    assert rel_err(out, ref) < 2e-2
    assert not bool(jnp.any(out[sum(q_lens):] != 0))
    calls.clear()
    win = ragged_paged_attention(*args, scale=0.125, backend="mosaic", sliding_window=8, interpret=True)
    assert calls == []
    assert rel_err(win, ragged_paged_attention_reference(*args, scale=0.125, sliding_window=8)) < 2e-2
