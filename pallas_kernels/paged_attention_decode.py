"""Decode paged attention: one query token per sequence, KV read through block tables.

Cache layout (per layer, fixed by the engine): ``k_cache``/``v_cache`` ``[num_blocks, block_size,
num_kv_heads, head_dim]``. Sequence s has one query token at position ``seq_lens[s] - 1`` and
attends to keys ``[0, seq_lens[s])`` (``[seq_lens[s] - sliding_window, seq_lens[s])`` with a
window) of its blocks ``block_tables[s]``. ``seq_lens[s] == 0`` marks a padding sequence; its
output is zero.

Kernel design (Pallas, Triton lowering): one program per (sequence, KV head, split). The program
holds all query heads of its GQA group as the rows of one tile (padded to >= 16 for the matrix
unit), so each KV block is read from memory once per step. Each loop iteration gathers
``blocks_per_iter`` block ids from the table and loads ``[blocks_per_iter * block_size, head_dim]``
K and V tiles with masked loads (nothing outside the sequence's valid keys is read), accumulating
in float32 with an online (base-2) softmax. Small batches split the context across programs
(``num_splits``); a second Pallas kernel (one launch, one program per query head) merges the
partial results, because XLA compiles the same merge into several kernels whose launches cost as
much as the attention itself at batch 1 (benchmarks/RESULTS.md, decode).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.kernel_shapes import (
    MASK_VALUE,
    group_slopes,
    load_tile_as,
    validate_decode_shapes,
    validate_kernel_inputs,
)
from pallas_kernels.online_softmax import log2_logits, online_softmax_step, tile_loop
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference
from pallas_kernels.sizes import cdiv, next_pow2

DEFAULT_NUM_SMS = 132  # H100/H200 SXM; only steers the split heuristic
MAX_SPLITS = 64  # chosen splits: the merge holds a query head's partials in registers


def paged_attention_decode_reference(
    q: jnp.ndarray,
    k_cache: jnp.ndarray,
    v_cache: jnp.ndarray,
    seq_lens: jnp.ndarray,
    block_tables: jnp.ndarray,
    *,
    scale: float,
    sliding_window: int | None = None,
    alibi_slopes: jnp.ndarray | None = None,
    logits_soft_cap: float | None = None,
) -> jnp.ndarray:
    """Plain-jnp oracle: the ragged reference with one token per sequence at seq_len - 1."""
    S = q.shape[0]
    positions = seq_lens.astype(jnp.int32) - 1
    query_start_loc = jnp.arange(S + 1, dtype=jnp.int32)
    return ragged_paged_attention_reference(
        q, k_cache, v_cache, positions, query_start_loc, seq_lens, block_tables,
        scale=scale, sliding_window=sliding_window, alibi_slopes=alibi_slopes,
        logits_soft_cap=logits_soft_cap,
    )


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_blocks: int, block_size: int, blocks_per_iter: int,
    num_sms: int = DEFAULT_NUM_SMS,
) -> int:
    """Splits the context when there are fewer than two (sequence, KV head) programs per SM:
    then about four programs per SM, each split at least one loop step (64 keys) long, at most
    ``MAX_SPLITS``. Set from the device-time split sweep on the H200 (benchmarks/HISTORY.md, fifth
    session); from 64 x 8 programs up one split already streams at the memory bandwidth."""
    base = num_seqs * num_kv_heads
    if base >= 2 * num_sms:
        return 1
    want = min(cdiv(4 * num_sms, base), MAX_SPLITS)
    min_blocks = max(blocks_per_iter, 64 // block_size)
    return max(1, min(want, cdiv(max_blocks, min_blocks)))


def _decode_kernel(
    q_ref, k_ref, v_ref, bt_ref, sl_ref, *rest,
    block_size: int, blocks_per_iter: int, blocks_per_split: int, num_splits: int,
    head_dim: int, scale: float, sliding_window: int | None, soft_cap: float | None,
    has_alibi: bool, exact_dot: bool, group_pad: int, head_dim_pad: int,
):
    if has_alibi:
        slopes_ref, *out_refs = rest
    else:
        slopes_ref, out_refs = None, list(rest)
    s, h = pl.program_id(0), pl.program_id(1)
    split = pl.program_id(2)
    bs, bpi = block_size, blocks_per_iter
    n = bpi * bs
    gp, dp = group_pad, head_dim_pad
    group = q_ref.shape[2]
    pad_d = dp != head_dim
    max_blocks = bt_ref.shape[1]

    seq_len = sl_ref[s]
    num_blocks = (seq_len + bs - 1) // bs
    lo = split * blocks_per_split
    hi = jnp.minimum(lo + blocks_per_split, num_blocks)
    start_tok = jnp.int32(0)
    if sliding_window is not None:
        start_tok = jnp.maximum(seq_len - sliding_window, 0)
        lo = jnp.maximum(lo, start_tok // bs)
    end_tok = jnp.minimum(seq_len, hi * bs)
    num_iters = (jnp.maximum(hi - lo, 0) + bpi - 1) // bpi

    # q [S, Hkv, G, D] and the output are read and written in place with masks, not padded by
    # XLA: at batch 1 the extra pad / slice kernels cost as much as the attention itself.
    qrow = jax.lax.broadcasted_iota(jnp.int32, (gp, dp), 0)
    qcol = jax.lax.broadcasted_iota(jnp.int32, (gp, dp), 1)
    qmask = (qrow < group) & (qcol < head_dim)
    q = plgpu.load(q_ref.at[s, h, qrow, qcol], mask=qmask, other=0)
    precision = jax.lax.Precision.HIGHEST if exact_dot else None
    if has_alibi:
        slopes = slopes_ref[...]  # [gp] float32
    # A tile's keys with one block id per key: a 2-D [keys, D] gather with no reshape after it,
    # which Triton's pipeliner turns into asynchronous copies (cp.async).
    key = jax.lax.broadcasted_iota(jnp.int32, (n,), 0)
    rowk = jax.lax.broadcasted_iota(jnp.int32, (n, dp), 0) % bs
    dcol = jax.lax.broadcasted_iota(jnp.int32, (n, dp), 1)

    def load_tile(ref, ids, valid):
        # Every index is a full-shape array: the same gather lowers on Triton and in interpret mode.
        bid = jnp.broadcast_to(ids[:, None], rowk.shape)
        mask = jnp.broadcast_to(valid[:, None], rowk.shape)
        if pad_d:
            mask = mask & (dcol < head_dim)
        # An fp8 cache's tile converts to q's dtype here, in registers (a no-op otherwise).
        return load_tile_as(ref.at[bid, rowk, h, dcol], mask, q_ref.dtype)

    def tile_keys(i):
        tok = (lo + i * bpi) * bs + key  # token positions [n]
        valid = tok < end_tok
        if sliding_window is not None:
            valid = valid & (tok >= start_tok)
        return tok, valid

    def fetch(i):
        _, valid = tile_keys(i)
        # Masked instead of a padded table: tiles past the end (window overhang) read none.
        col = lo + i * bpi + key // bs
        ids = plgpu.load(bt_ref.at[s, col], mask=col < max_blocks, other=0)
        return load_tile(k_ref, ids, valid), load_tile(v_ref, ids, valid)

    def attend(i, k, v, acc, m_prev, l_prev):
        tok, valid = tile_keys(i)
        logits = plgpu.dot(q, k, trans_b=True, precision=precision)  # [gp, n] f32

        def alibi():
            rel = (tok - (seq_len - 1)).astype(jnp.float32)
            return slopes[:, None] * rel[None, :]

        logits = log2_logits(logits, scale=scale, soft_cap=soft_cap, bias=alibi if has_alibi else None)
        logits = jnp.where(valid[None, :], logits, MASK_VALUE)
        return online_softmax_step(logits, v, acc, m_prev, l_prev, precision=precision)

    state = (jnp.zeros((gp, dp), jnp.float32), jnp.full((gp,), MASK_VALUE, jnp.float32), jnp.zeros((gp,), jnp.float32))
    (acc, m, l), _ = tile_loop(0, num_iters, fetch, lambda i, kv, st: attend(i, *kv, *st), state)

    if num_splits == 1:
        (o_ref,) = out_refs
        safe_l = jnp.where(l > 0, l, 1.0)
        out = jnp.where(l[:, None] > 0, acc / safe_l[:, None], 0.0).astype(o_ref.dtype)
        plgpu.store(o_ref.at[s, h, qrow, qcol], out, mask=qmask)
    else:
        o_ref, m_ref, l_ref = out_refs
        o_ref[...] = acc
        m_ref[...] = m
        l_ref[...] = l


def _merge_kernel(o_ref, m_ref, l_ref, out_ref, *, num_splits: int, group: int, head_dim: int,
                  splits_pad: int, head_dim_pad: int):
    s, r = pl.program_id(0), pl.program_id(1)  # sequence, query head
    h, g = r // group, r % group
    c = jax.lax.broadcasted_iota(jnp.int32, (splits_pad,), 0)
    c2 = jax.lax.broadcasted_iota(jnp.int32, (splits_pad, head_dim_pad), 0)
    d2 = jax.lax.broadcasted_iota(jnp.int32, (splits_pad, head_dim_pad), 1)
    m = plgpu.load(m_ref.at[s, h, c, g], mask=c < num_splits, other=MASK_VALUE)
    l = plgpu.load(l_ref.at[s, h, c, g], mask=c < num_splits, other=0)
    o = plgpu.load(o_ref.at[s, h, c2, g, d2], mask=(c2 < num_splits) & (d2 < head_dim), other=0)
    w = jnp.exp2(m - jnp.max(m))
    l_all = jnp.sum(l * w)
    o_all = jnp.sum(o * w[:, None], axis=0)
    out = jnp.where(l_all > 0, o_all / jnp.where(l_all > 0, l_all, 1.0), 0.0)
    d = jax.lax.broadcasted_iota(jnp.int32, (head_dim_pad,), 0)
    plgpu.store(out_ref.at[s, r, d], out.astype(out_ref.dtype), mask=d < head_dim)


def merge_splits_pallas(o, m, l, *, num_q_heads: int, head_dim: int, dtype, interpret: bool = False):
    """The split merge as one Pallas launch: partials o [S, Hkv, splits, Gp, Dp], m/l [S, Hkv,
    splits, Gp] (log2 domain, padded rows and columns ignored) -> [S, Hq, head_dim] in ``dtype``."""
    if o.ndim != 5 or m.shape != o.shape[:4] or l.shape != o.shape[:4]:
        raise ValueError(f"o {o.shape}, m {m.shape}, l {l.shape}: expected [S, Hkv, splits, Gp, Dp] and [S, Hkv, splits, Gp]")
    S, hkv, splits, gp, dp = o.shape
    if num_q_heads % hkv or num_q_heads // hkv > gp or head_dim > dp:
        raise ValueError(f"num_q_heads {num_q_heads}, head_dim {head_dim}: expected a multiple of Hkv {hkv} with "
                         f"at most {gp} per KV head, and head_dim <= {dp}")
    kernel = functools.partial(
        _merge_kernel, num_splits=splits, group=num_q_heads // hkv, head_dim=head_dim,
        splits_pad=next_pow2(splits), head_dim_pad=dp,
    )
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)  # noqa: E731
    out_shape = jax.ShapeDtypeStruct((S, num_q_heads, head_dim), dtype)
    return pl.pallas_call(
        kernel,
        grid=(S, num_q_heads),
        in_specs=[whole(o), whole(m), whole(l)],
        out_specs=whole(out_shape),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="paged_attention_decode_merge",
    )(o, m, l)


def merge_splits(o: jnp.ndarray, m: jnp.ndarray, l: jnp.ndarray) -> jnp.ndarray:
    """Merges split partials o [..., splits, G, D], m/l [..., splits, G] (log2 domain) -> [..., G, D].
    The jnp form: the reference for :func:`merge_splits_pallas`, and the Triton ablation's merge."""
    m_all = jnp.max(m, axis=-2, keepdims=True)
    w = jnp.exp2(m - m_all)
    l_all = jnp.sum(l * w, axis=-2)
    o_all = jnp.sum(o * w[..., None], axis=-3)
    safe = jnp.where(l_all > 0, l_all, 1.0)
    return jnp.where(l_all[..., None] > 0, o_all / safe[..., None], 0.0)


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale", "sliding_window", "logits_soft_cap", "blocks_per_iter", "num_splits",
        "num_warps", "num_stages", "interpret",
    ),
)
def _decode_call(
    q, k_cache, v_cache, seq_lens, block_tables, alibi_slopes, *,
    scale, sliding_window, logits_soft_cap, blocks_per_iter, num_splits, num_warps, num_stages, interpret,
):
    S, Hq, D = q.shape
    _, bs, hkv, _ = k_cache.shape
    G = Hq // hkv
    gp = max(16, next_pow2(G))
    dp = next_pow2(D)
    mb = block_tables.shape[1]
    bpi = blocks_per_iter
    blocks_per_split = cdiv(cdiv(mb, num_splits), bpi) * bpi
    bt = block_tables.astype(jnp.int32)
    qg = q.reshape(S, hkv, G, D)
    has_alibi = alibi_slopes is not None

    kernel = functools.partial(
        _decode_kernel, block_size=bs, blocks_per_iter=bpi, blocks_per_split=blocks_per_split,
        num_splits=num_splits, head_dim=D, scale=scale, sliding_window=sliding_window,
        soft_cap=logits_soft_cap, has_alibi=has_alibi, exact_dot=q.dtype == jnp.float32,
        group_pad=gp, head_dim_pad=dp,
    )
    # Grid (sequence, KV head, split), sequences first: launching a sequence's KV heads next to
    # each other measured slower (benchmarks/HISTORY.md, first session).
    grid = (S, hkv, num_splits)
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)  # noqa: E731
    in_specs = [
        whole(qg), whole(k_cache), whole(v_cache), whole(bt), whole(seq_lens),
    ]
    args = [qg, k_cache, v_cache, bt, seq_lens.astype(jnp.int32)]
    if has_alibi:
        in_specs.append(pl.BlockSpec((None, gp), lambda s, h, c: (h, 0)))
        args.append(group_slopes(alibi_slopes, hkv, gp))
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((S, hkv, G, D), q.dtype)]
        out_specs = [whole(out_shape[0])]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((S, hkv, num_splits, gp, dp), jnp.float32),
            jax.ShapeDtypeStruct((S, hkv, num_splits, gp), jnp.float32),
            jax.ShapeDtypeStruct((S, hkv, num_splits, gp), jnp.float32),
        ]
        out_specs = [
            pl.BlockSpec((None, None, None, gp, dp), lambda s, h, c: (s, h, c, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda s, h, c: (s, h, c, 0)),
            pl.BlockSpec((None, None, None, gp), lambda s, h, c: (s, h, c, 0)),
        ]
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_attention_decode",
    )(*args)
    if num_splits == 1:
        return outs[0].reshape(S, Hq, D)
    return merge_splits_pallas(*outs, num_q_heads=Hq, head_dim=D, dtype=q.dtype, interpret=interpret)


def paged_attention_decode(
    q: jnp.ndarray,
    k_cache: jnp.ndarray,
    v_cache: jnp.ndarray,
    seq_lens: jnp.ndarray,
    block_tables: jnp.ndarray,
    *,
    scale: float,
    sliding_window: int | None = None,
    alibi_slopes: jnp.ndarray | None = None,
    logits_soft_cap: float | None = None,
    blocks_per_iter: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
) -> jnp.ndarray:
    """Decode attention: q [S, Hq, D] (one token per sequence) over the paged caches -> [S, Hq, D].

    Tuning knobs (defaults measured best on the H200, benchmarks/RESULTS.md): ``blocks_per_iter``
    (KV blocks loaded per loop step; default: 64 keys a step, 32 when a key row is wider than 256
    bytes, so that three stages fit in shared memory), ``num_splits`` (context splits; default:
    :func:`choose_num_splits`), ``num_warps``, ``num_stages``. The loop is the flat per-key gather
    that Triton pipelines with ``cp.async``; the loops it replaced (register prefetch, block ids a
    step ahead, a head-major cache layout, KV heads launched first) measured slower or no faster
    and are recorded in benchmarks/HISTORY.md.
    """
    S, Hq, D, bs, hkv = validate_decode_shapes(q, k_cache, v_cache, seq_lens, block_tables)
    if alibi_slopes is not None and alibi_slopes.shape != (Hq,):
        raise ValueError(f"alibi_slopes {alibi_slopes.shape}: expected ({Hq},)")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window {sliding_window}: expected >= 1 or None")
    validate_kernel_inputs(q, k_cache, v_cache)
    row_bytes = next_pow2(D) * jnp.dtype(k_cache.dtype).itemsize
    bpi = blocks_per_iter or max(1, (64 if row_bytes <= 256 else 32) // bs)
    if bpi < 1 or bpi & (bpi - 1) or bpi * bs < 16:
        raise ValueError(f"blocks_per_iter {bpi}: expected a power of two with blocks_per_iter * block_size >= 16")
    mb = block_tables.shape[1]
    splits = num_splits or choose_num_splits(S, hkv, mb, bs, bpi)
    if splits < 1:
        raise ValueError(f"num_splits {splits}: expected >= 1")
    return _decode_call(
        q, k_cache, v_cache, seq_lens, block_tables, alibi_slopes,
        scale=float(scale), sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
        blocks_per_iter=bpi, num_splits=splits, num_warps=num_warps, num_stages=num_stages,
        interpret=interpret,
    )
