"""A mixed step (decode tokens and prefill chunks) split across kernels by sequence kind.

Single-token sequences (a decode token at position ``seq_len - 1``) go to the decode kernel; the
others to a prefill kernel: the Pallas ragged kernel, or on Hopper the Mosaic GPU one. Each
kernel sees the other kernels' sequences with ``seq_lens == 0`` (no KV read, zero output), and
the outputs are merged per token.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.kernel_shapes import token_seq_ids

# Measured on the H200 (benchmarks/RESULTS.md, fifth session): a lone prefill runs faster on the
# Mosaic kernel from 2k tokens (4k: 0.374 vs 0.527 ms), and so does a mixed step's chunk alone
# (3,841 tokens among 256 sequences: 0.447 vs 0.665 ms), but the whole mixed step of 255 decodes
# and that chunk still ran slower on the Mosaic route than on the decode + Pallas split (MHA 1.378
# vs 1.182 ms; 2048 tokens 0.895 vs 0.825), by more than its parts differ: the route's own
# overhead (~0.2 ms) is not found yet. So at this threshold a prefill-only step gains and a step
# carrying 255 decodes loses; the threshold stays where the fourth session put it (the backend is
# opt-in, "pallas" is the GPU default) until a rule by sequence count is measured.
MOSAIC_MIN_TOKENS = 4096


def _sequence_kinds(q, positions, query_start_loc, seq_lens):
    T = q.shape[0]
    qsl = query_start_loc.astype(jnp.int32)
    first = jnp.minimum(qsl[:-1], T - 1)  # each sequence's first query token
    single = (qsl[1:] - qsl[:-1] == 1) & (positions[first] == seq_lens - 1)  # [S]
    t = jnp.arange(T, dtype=jnp.int32)
    tok_seq = token_seq_ids(qsl, T)
    return qsl, first, single, tok_seq, t < qsl[-1]


def split_decode_rows(q, k_cache, v_cache, positions, query_start_loc, seq_lens, block_tables, *, interpret, **kwargs):
    """Decode kernel for single-token sequences, Pallas ragged kernel for the rest."""
    from pallas_kernels.paged_attention_decode import paged_attention_decode
    from pallas_kernels.ragged_paged_attention import ragged_paged_attention_pallas

    qsl, first, single, tok_seq, valid = _sequence_kinds(q, positions, query_start_loc, seq_lens)
    out_dec = paged_attention_decode(
        q[first], k_cache, v_cache, jnp.where(single, seq_lens, 0), block_tables, interpret=interpret, **kwargs
    )
    out_rag = ragged_paged_attention_pallas(
        q, k_cache, v_cache, positions, qsl, jnp.where(single, 0, seq_lens), block_tables,
        interpret=interpret, **kwargs,
    )
    return jnp.where((single[tok_seq] & valid)[:, None, None], out_dec[tok_seq], out_rag)


def mosaic_prefill_applies(q, k_cache, *, sliding_window, alibi_slopes, logits_soft_cap) -> bool:
    """Whether a mixed step of this (static) shape and these features can use the Mosaic kernel."""
    from pallas_kernels.kernel_shapes import MOSAIC_DTYPES
    from pallas_kernels.ragged_paged_attention_mosaic import MOSAIC_BLOCK_SIZES, MOSAIC_HEAD_DIMS

    return (
        sliding_window is None and alibi_slopes is None and logits_soft_cap is None
        and jnp.dtype(q.dtype) in MOSAIC_DTYPES and q.dtype == k_cache.dtype
        and q.shape[-1] in MOSAIC_HEAD_DIMS
        and k_cache.shape[1] in MOSAIC_BLOCK_SIZES and q.shape[0] >= MOSAIC_MIN_TOKENS
    )


def mosaic_mixed_step(q, k_cache, v_cache, positions, query_start_loc, seq_lens, block_tables, *, scale, interpret):
    """Decode kernel for single-token sequences, the Mosaic GPU kernel for every prefill chunk.

    The Mosaic kernel takes all of the step's sequences (``max_seqs = S``): its tile-major output
    buffer then holds up to ``(T + 7 S) / 128 + S + 1`` tiles of 128 rows (about 320 MB at 4096
    tokens x 256 sequences x 32 heads x 128, bf16). The alternative, a cap of 16 sequences with a
    Pallas ragged call for any beyond, launched that call on every step with more than 16
    sequences, mostly empty (one program per 128-token tile and KV head, 8,736 at 2048 tokens x 256
    sequences): the likely cause of the 0.1 ms by which such a step measured slower on the H200
    than the decode + Pallas split (RESULTS.md, mixed step; not timed separately)."""
    from pallas_kernels.paged_attention_decode import paged_attention_decode
    from pallas_kernels.ragged_paged_attention_mosaic import ragged_paged_attention_mosaic

    qsl, first, single, tok_seq, valid = _sequence_kinds(q, positions, query_start_loc, seq_lens)
    out_dec = paged_attention_decode(
        q[first], k_cache, v_cache, jnp.where(single, seq_lens, 0), block_tables, scale=scale, interpret=interpret
    )
    out, _ = ragged_paged_attention_mosaic(
        q, k_cache, v_cache, qsl, jnp.where(single, 0, seq_lens), block_tables, scale=scale, interpret=interpret,
    )
    return jnp.where((single[tok_seq] & valid)[:, None, None], out_dec[tok_seq], out)
