"""The public attention entry point: validates a step's shapes and routes it to a backend's kernels.

``backend``: "reference" (plain jnp: ``blockwise_attention``, which reads keys only up to the
longest sequence of the step; ``ragged_paged_attention_reference`` is the all-at-once oracle the
kernels are tested against), "pallas" (Triton-lowered kernels; ``interpret=True`` runs them
in the Pallas interpreter, e.g. on CPU) or "mosaic" ("pallas", with the Mosaic GPU prefill kernel
for large mixed steps on Hopper). On the kernel backends:

- a decode-only step (static ``decode_only``: one query token per sequence) runs the decode kernel;
- a mixed step runs the Pallas ragged kernel, or — ``split_decode_rows`` — its single-token
  sequences through the decode kernel and the rest through the ragged kernel, each kernel seeing
  the other's sequences with ``seq_lens == 0`` and the outputs merged per token. By default the
  split is taken when every query head has its own KV head: the run that set the rule measured it
  slower for GQA, whose ragged query tiles already carry a whole group per KV read; the latest run
  measured it faster there too, so the GQA rule awaits a deciding run (benchmarks/RESULTS.md, mixed
  step);
- with "mosaic", a mixed step of at least ``MOSAIC_MIN_TOKENS`` tokens sends its prefill chunks to
  the Mosaic GPU kernel (decode rows still to the decode kernel) when the model needs none of
  sliding window, ALiBi or soft cap and the dtype, head_dim and block size are ones it supports.
  The lone prefill gains from that size; a step that also carries hundreds of decodes measured
  slower, so the backend is opt-in and "pallas" the GPU default (RESULTS.md, mixed step). The
  Mosaic path relies on the engine's contract that a sequence's query tokens are its last
  ``q_len`` positions. The Mosaic decode kernel measured slower than the Pallas one and is not
  used (an ablation under benchmarks/ablations/).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.backends import ATTENTION_BACKENDS
from pallas_kernels.kernel_shapes import MOSAIC_DTYPES, token_seq_ids
from pallas_kernels.blockwise_attention import ragged_paged_attention_blockwise
from pallas_kernels.paged_attention_decode import paged_attention_decode
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_pallas
from pallas_kernels.ragged_paged_attention_mosaic import (
    MOSAIC_BLOCK_SIZES,
    MOSAIC_HEAD_DIMS,
    ragged_paged_attention_mosaic,
)

# Mixed steps from this many tokens take the Mosaic route under backend "mosaic" (see above).
MOSAIC_MIN_TOKENS = 4096


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
    decode_only: bool = False,
    split_decode_rows: bool | None = None,
    interpret: bool = False,
) -> jnp.ndarray:
    """Attention of a ragged step over the paged caches (shapes and semantics as
    :func:`~pallas_kernels.ragged_paged_attention.ragged_paged_attention_reference`), on ``backend``.

    ``decode_only`` (static) promises that every sequence has exactly one query token, token s
    belonging to sequence s at position ``seq_lens[s] - 1`` (T == S; padding sequences have
    ``seq_lens == 0``). ``split_decode_rows`` (static, kernel backends): route a mixed step's
    single-token sequences to the decode kernel; ``None`` = when the heads are MHA (module docstring).
    """
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
    if alibi_slopes is not None and alibi_slopes.shape != (q.shape[1],):
        raise ValueError(f"alibi_slopes {alibi_slopes.shape}: expected ({q.shape[1]},)")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window {sliding_window}: expected >= 1 or None")
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not available; allowed: {', '.join(map(repr, ATTENTION_BACKENDS))}")
    if decode_only and q.shape[0] != block_tables.shape[0]:
        raise ValueError(
            f"decode_only needs one token per sequence: num_tokens {q.shape[0]} != num_seqs {block_tables.shape[0]}"
        )
    kwargs = dict(
        scale=scale, sliding_window=sliding_window, alibi_slopes=alibi_slopes,
        logits_soft_cap=logits_soft_cap,
    )
    if backend == "reference":
        return ragged_paged_attention_blockwise(
            q, k_cache, v_cache, positions, query_start_loc, seq_lens, block_tables, **kwargs
        )
    if backend == "mosaic" and not decode_only:
        if mosaic_prefill_applies(q, k_cache, sliding_window=sliding_window, alibi_slopes=alibi_slopes,
                                  logits_soft_cap=logits_soft_cap):
            return mosaic_mixed_step(
                q, k_cache, v_cache, positions, query_start_loc, seq_lens, block_tables, scale=scale,
                interpret=interpret,
            )
    if decode_only:
        return paged_attention_decode(q, k_cache, v_cache, seq_lens, block_tables, interpret=interpret, **kwargs)
    if split_decode_rows is None:
        split_decode_rows = q.shape[1] == k_cache.shape[2]
    if split_decode_rows:
        return decode_rows_split(
            q, k_cache, v_cache, positions, query_start_loc, seq_lens, block_tables, interpret=interpret, **kwargs
        )
    return ragged_paged_attention_pallas(
        q, k_cache, v_cache, positions, query_start_loc, seq_lens, block_tables,
        interpret=interpret, **kwargs,
    )


def _sequence_kinds(q, positions, query_start_loc, seq_lens):
    T = q.shape[0]
    qsl = query_start_loc.astype(jnp.int32)
    first = jnp.minimum(qsl[:-1], T - 1)  # each sequence's first query token
    single = (qsl[1:] - qsl[:-1] == 1) & (positions[first] == seq_lens - 1)  # [S]
    t = jnp.arange(T, dtype=jnp.int32)
    tok_seq = token_seq_ids(qsl, T)
    return qsl, first, single, tok_seq, t < qsl[-1]


def decode_rows_split(q, k_cache, v_cache, positions, query_start_loc, seq_lens, block_tables, *, interpret, **kwargs):
    """Decode kernel for single-token sequences, Pallas ragged kernel for the rest."""
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
    return (
        sliding_window is None and alibi_slopes is None and logits_soft_cap is None
        and jnp.dtype(q.dtype) in MOSAIC_DTYPES and q.dtype == k_cache.dtype
        and q.shape[-1] in MOSAIC_HEAD_DIMS
        and k_cache.shape[1] in MOSAIC_BLOCK_SIZES and q.shape[0] >= MOSAIC_MIN_TOKENS
    )


def mosaic_mixed_step(q, k_cache, v_cache, positions, query_start_loc, seq_lens, block_tables, *, scale, interpret):
    """Decode kernel for single-token sequences, the Mosaic GPU kernel for every prefill chunk.

    The Mosaic kernel takes all of the step's sequences (``max_seqs = S``), so no Pallas call runs
    beside it for sequences beyond a cap; its tile-major output buffer then holds up to
    ``(T + 7 S) / 128 + S + 1`` tiles of 128 rows (about 320 MB at 4096 tokens x 256 sequences x 32
    heads x 128, bf16)."""
    qsl, first, single, tok_seq, valid = _sequence_kinds(q, positions, query_start_loc, seq_lens)
    out_dec = paged_attention_decode(
        q[first], k_cache, v_cache, jnp.where(single, seq_lens, 0), block_tables, scale=scale, interpret=interpret
    )
    out, _ = ragged_paged_attention_mosaic(
        q, k_cache, v_cache, qsl, jnp.where(single, 0, seq_lens), block_tables, scale=scale, interpret=interpret,
    )
    return jnp.where((single[tok_seq] & valid)[:, None, None], out_dec[tok_seq], out)
