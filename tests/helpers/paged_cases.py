"""Paged-attention test cases shared by the kernel tests: NaN-poisoned paged caches with shuffled
block tables, attention features, tolerances, and the error measure."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from models.attention_metadata import pack_attention_metadata
from pallas_kernels.sizes import cdiv

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
TOL = {F32: 1e-5, BF16: 1.5e-2, F16: 4e-3}

# (hq, hkv, head_dim, block_size, dtype, sliding_window, alibi, soft_cap, block_m, blocks_per_iter)
RAGGED_CASES = [
    (4, 2, 32, 8, F32, None, False, None, 16, 2),  # many q tiles, unmasked + masked KV tiles
    (4, 4, 64, 16, F32, None, False, None, 32, 2),
    (8, 1, 80, 8, F32, 9, False, None, 16, 2),  # MQA, window, padded head_dim
    (4, 2, 96, 32, F32, None, True, None, 16, 1),  # ALiBi, one block a KV tile
    (6, 2, 64, 8, F32, None, False, 20.0, 16, 2),  # group of 3 padded to 4, soft cap
    (4, 2, 64, 16, BF16, None, False, None, 32, 1),
    (4, 2, 64, 8, F16, 13, False, None, 16, 2),
]


def rel_err(out, ref) -> float:
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    assert not np.isnan(out).any(), "kernel output holds NaN (read outside the sequence's keys?)"
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def paged_case(rng, q_lens, ctx_lens, *, hq, hkv, d, bs, dtype, num_tokens=None, extra_blocks=3):
    """A NaN-poisoned paged cache holding ``ctx + q`` keys per sequence in shuffled blocks."""
    seq_lens = np.asarray(q_lens) + np.asarray(ctx_lens)
    nblocks = [cdiv(int(n), bs) for n in seq_lens]
    max_blocks = max(1, max(nblocks)) + 1  # a spare column: padding entries (0) must stay unread
    num_blocks = sum(nblocks) + extra_blocks
    perm = rng.permutation(num_blocks)
    kc = np.full((num_blocks, bs, hkv, d), np.nan, np.float32)
    vc = kc.copy()
    tables, c = [], 0
    for n, L in zip(nblocks, seq_lens):
        bt = [int(b) for b in perm[c : c + n]]
        c += n
        for j, b in enumerate(bt):
            rows = min(bs, int(L) - j * bs)
            kc[b, :rows] = rng.standard_normal((rows, hkv, d))
            vc[b, :rows] = rng.standard_normal((rows, hkv, d))
        tables.append(bt)
    md, positions = pack_attention_metadata(
        list(q_lens), list(ctx_lens), tables, block_size=bs, num_tokens=num_tokens, max_blocks_per_seq=max_blocks,
    )
    T = md.num_tokens
    q = rng.standard_normal((T, hq, d))
    return dict(
        q=jnp.asarray(q, dtype), k_cache=jnp.asarray(kc, dtype), v_cache=jnp.asarray(vc, dtype),
        positions=jnp.asarray(positions), query_start_loc=jnp.asarray(md.query_start_loc),
        seq_lens=jnp.asarray(md.seq_lens), block_tables=jnp.asarray(md.block_tables),
    )


def attention_features(rng, hq, alibi, soft_cap):
    return dict(
        alibi_slopes=jnp.asarray(rng.uniform(0.05, 1.0, hq), F32) if alibi else None,
        logits_soft_cap=soft_cap,
    )
