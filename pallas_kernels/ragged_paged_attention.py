"""Ragged paged attention: a mixed batch of prefill chunks and decode tokens reading KV through
block tables.

Query tokens are flattened on one axis; sequence s owns tokens
``query_start_loc[s]:query_start_loc[s+1]``, sits at KV positions ``positions[t]`` and attends to
KV positions ``[0, seq_lens[s])`` of its blocks ``block_tables[s]``, causally (key j is visible to
the token at position p iff j <= p), optionally within a sliding window (p - j < window) and with
ALiBi biases (slope_h * (j - p)). GQA/MQA: query head h reads KV head h // (Hq // Hkv).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASK_VALUE = -1e30  # finite, so fully-masked padding rows give garbage, not NaN


def ragged_paged_attention_reference(
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
) -> jnp.ndarray:
    """Plain-jnp oracle. q [T, Hq, D]; caches [num_blocks, block_size, Hkv, D] → out [T, Hq, D]."""
    T, Hq, D = q.shape
    _, BS, Hkv, _ = k_cache.shape
    S, MB = block_tables.shape
    G = Hq // Hkv
    L = MB * BS
    t = jnp.arange(T, dtype=jnp.int32)
    tok_seq = jnp.clip(jnp.searchsorted(query_start_loc, t, side="right").astype(jnp.int32) - 1, 0, S - 1)
    tok_valid = t < query_start_loc[-1]

    k = k_cache[block_tables].reshape(S, L, Hkv, D)[tok_seq]  # [T, L, Hkv, D]
    v = v_cache[block_tables].reshape(S, L, Hkv, D)[tok_seq]
    qg = q.reshape(T, Hkv, G, D).astype(jnp.float32)
    s = jnp.einsum("thgd,tlhd->thgl", qg, k.astype(jnp.float32)) * scale
    if logits_soft_cap is not None:
        s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
    kv_pos = jnp.arange(L, dtype=jnp.int32)[None, :]
    qpos = positions.astype(jnp.int32)[:, None]
    if alibi_slopes is not None:
        rel = (kv_pos - qpos).astype(jnp.float32)  # [T, L]
        slopes = alibi_slopes.astype(jnp.float32).reshape(Hkv, G)
        s = s + slopes[None, :, :, None] * rel[:, None, None, :]
    mask = (kv_pos < seq_lens[tok_seq][:, None]) & (kv_pos <= qpos) & tok_valid[:, None]
    if sliding_window is not None:
        mask = mask & (qpos - kv_pos < sliding_window)
    s = jnp.where(mask[:, None, None, :], s, _MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1)
    # Zero masked values too: unwritten slots may hold anything (NaN included) and 0 * NaN = NaN.
    v = jnp.where(mask[:, :, None, None], v.astype(jnp.float32), 0.0)
    out = jnp.einsum("thgl,tlhd->thgd", p, v)
    return out.reshape(T, Hq, D).astype(q.dtype)


def ragged_paged_attention(
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
    backend: str = "reference",
) -> jnp.ndarray:
    """Validated public entry point; ``backend`` picks the implementation."""
    if q.ndim != 3 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q {q.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape}: bad ranks")
    if q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(f"head_dim mismatch: q {q.shape[-1]} vs cache {k_cache.shape[-1]}")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"num_q_heads {q.shape[1]} is not a multiple of num_kv_heads {k_cache.shape[2]}")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"positions {positions.shape}: expected ({q.shape[0]},)")
    if query_start_loc.shape != (block_tables.shape[0] + 1,) or seq_lens.shape != (block_tables.shape[0],):
        raise ValueError(
            f"query_start_loc {query_start_loc.shape}, seq_lens {seq_lens.shape}, block_tables "
            f"{block_tables.shape}: expected [S+1], [S], [S, max_blocks]"
        )
    if backend != "reference":
        raise ValueError(f"attention backend {backend!r} is not available; allowed: 'reference'")
    return ragged_paged_attention_reference(
        q, k_cache, v_cache, positions, query_start_loc, seq_lens, block_tables,
        scale=scale, sliding_window=sliding_window, alibi_slopes=alibi_slopes,
        logits_soft_cap=logits_soft_cap,
    )
