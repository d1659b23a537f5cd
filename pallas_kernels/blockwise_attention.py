"""Ragged paged attention in plain jnp, block by block: the "reference" backend's path (CPU).

Same contract and results as ``ragged_paged_attention_reference`` (the all-at-once oracle the
kernels are tested against), but it does not gather the whole block-table width per token: a
``fori_loop`` with a traced trip count walks the KV positions in chunks of about 128 keys, only
up to the longest sequence of the step (and from the first chunk a sliding window can see), with
an online softmax in float32. The oracle's cost grows with ``max_model_len`` (every token reads
``max_model_len`` keys of every layer, gigabytes per step at an 8k context); this one grows with
the context actually present, so CPU decode costs about what reading the weights does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.kernel_shapes import MASK_VALUE, token_seq_ids

KEYS_PER_CHUNK = 128


def masked_scores(qg, k, kv_pos, qpos, kv_len, *, scale: float, sliding_window: int | None,
                  slopes: jnp.ndarray | None, logits_soft_cap: float | None):
    """Scores [T, Hkv, G, L] of the grouped queries qg [T, Hkv, G, D] against each token's keys
    k [T, L, Hkv, D] at positions kv_pos [1, L] (soft cap, then ALiBi), hidden ones set to
    MASK_VALUE, and the visibility mask [T, L]: key j is visible to a token at qpos [T, 1] iff
    j < kv_len (its sequence's length; 0 for padding tokens), j <= qpos and j is in the window."""
    s = jnp.einsum("thgd,tlhd->thgl", qg, k) * scale
    if logits_soft_cap is not None:
        s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
    if slopes is not None:
        rel = (kv_pos - qpos).astype(jnp.float32)  # [T, L]
        s = s + slopes[None, :, :, None] * rel[:, None, None, :]
    mask = (kv_pos < kv_len[:, None]) & (kv_pos <= qpos)
    if sliding_window is not None:
        mask = mask & (qpos - kv_pos < sliding_window)
    return jnp.where(mask[:, None, None, :], s, MASK_VALUE), mask


def ragged_paged_attention_blockwise(
    q: jnp.ndarray,
    k_cache: jnp.ndarray,
    v_cache: jnp.ndarray,
    positions: jnp.ndarray,
    query_start_loc: jnp.ndarray,
    seq_lens: jnp.ndarray,
    block_tables: jnp.ndarray,
    *,
    scale: float,
    sliding_window: int | None = None,
    alibi_slopes: jnp.ndarray | None = None,
    logits_soft_cap: float | None = None,
    keys_per_chunk: int = KEYS_PER_CHUNK,
) -> jnp.ndarray:
    """q [T, Hq, D]; caches [num_blocks, block_size, Hkv, D] -> out [T, Hq, D] (padding tokens: 0)."""
    T, Hq, D = q.shape
    _, BS, Hkv, _ = k_cache.shape
    S, MB = block_tables.shape
    G = Hq // Hkv
    C = max(1, min(MB, keys_per_chunk // BS))  # blocks per chunk
    num_chunks = -(-MB // C)
    tables = jnp.pad(block_tables, ((0, 0), (0, num_chunks * C - MB)))
    t = jnp.arange(T, dtype=jnp.int32)
    tok_seq = token_seq_ids(query_start_loc, T)
    tok_valid = t < query_start_loc[-1]
    tok_len = jnp.where(tok_valid, seq_lens[tok_seq], 0)  # [T]
    qpos = positions.astype(jnp.int32)[:, None]
    qg = q.reshape(T, Hkv, G, D).astype(jnp.float32)
    slopes = None if alibi_slopes is None else alibi_slopes.astype(jnp.float32).reshape(Hkv, G)

    keys = C * BS
    stop = jnp.minimum((jnp.max(tok_len) + keys - 1) // keys, num_chunks)
    start = jnp.int32(0)
    if sliding_window is not None:  # chunks wholly before every token's window are skipped
        first = jnp.min(jnp.where(tok_valid, positions.astype(jnp.int32) - sliding_window + 1, 2**30))
        start = jnp.clip(first, 0, None) // keys

    def chunk(c, carry):
        m, l, acc = carry
        blocks = jax.lax.dynamic_slice_in_dim(tables, c * C, C, axis=1)  # [S, C]
        k = k_cache[blocks].reshape(S, keys, Hkv, D)[tok_seq].astype(jnp.float32)  # [T, keys, Hkv, D]
        v = v_cache[blocks].reshape(S, keys, Hkv, D)[tok_seq].astype(jnp.float32)
        kv_pos = c * keys + jnp.arange(keys, dtype=jnp.int32)[None, :]
        s, mask = masked_scores(qg, k, kv_pos, qpos, tok_len, scale=scale, sliding_window=sliding_window,
                                slopes=slopes, logits_soft_cap=logits_soft_cap)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        # unwritten slots may hold anything (NaN included) and 0 * NaN = NaN
        v = jnp.where(mask[:, :, None, None], v, 0.0)
        return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + jnp.einsum("thgl,tlhd->thgd", p, v)

    init = (jnp.full((T, Hkv, G), MASK_VALUE, jnp.float32), jnp.zeros((T, Hkv, G), jnp.float32),
            jnp.zeros((T, Hkv, G, D), jnp.float32))
    _, l, acc = jax.lax.fori_loop(start, jnp.maximum(stop, start), chunk, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    out = jnp.where(tok_valid[:, None, None, None], out, 0.0)
    return out.reshape(T, Hq, D).astype(q.dtype)
