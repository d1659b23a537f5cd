"""Ragged paged attention: a mixed batch of prefill chunks and decode tokens reading KV through
block tables.

Query tokens are flattened on one axis; sequence s owns tokens
``query_start_loc[s]:query_start_loc[s+1]``, sits at KV positions ``positions[t]`` and attends to
KV positions ``[0, seq_lens[s])`` of its blocks ``block_tables[s]``, causally (key j is visible to
the token at position p iff j <= p), optionally within a sliding window (p - j < window) and with
ALiBi biases (slope_h * (j - p)). GQA/MQA: query head h reads KV head h // (Hq // Hkv).

Pallas kernel (Triton lowering), flash-attention style: the query tokens of each sequence are cut
into tiles of ``block_q`` tokens; one program handles one (tile, KV head) with all query heads of
the GQA group stacked into the tile's rows (``block_q * group`` rows), loops over KV tiles of
``blocks_per_iter`` blocks gathered through the block table, and skips KV tiles that the causal
mask (and sliding window) hides completely. Tiles wholly below the diagonal run without masks.
Heaviest tiles (last in their sequence) are launched first. Padding tokens get zero output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.blockwise_attention import masked_scores, ragged_paged_attention_blockwise
from pallas_kernels.kernel_shapes import (
    MASK_VALUE,
    load_tile_as,
    pad_block_tables,
    searchsorted_right,
    token_seq_ids,
    validate_kernel_inputs,
)
from pallas_kernels.online_softmax import log2_logits, online_softmax_step, tile_loop
from pallas_kernels.sizes import cdiv, next_pow2

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
    """Plain-jnp oracle. q [T, Hq, D]; caches [num_blocks, block_size, Hkv, D] → out [T, Hq, D].

    Each token reads its sequence's whole KV span at once ([L, Hkv, D] in float32); tokens go in
    groups of at most ``REFERENCE_CHUNK_BYTES`` of that, so a long prompt's oracle fits in memory
    (the tokens are independent: the result is the same at any group size)."""
    T, Hq, D = q.shape
    _, BS, Hkv, _ = k_cache.shape
    S, MB = block_tables.shape
    L = MB * BS
    t = jnp.arange(T, dtype=jnp.int32)
    tok_seq = token_seq_ids(query_start_loc, T)
    tok_valid = t < query_start_loc[-1]
    tok_len = jnp.where(tok_valid, seq_lens[tok_seq], 0)
    k_seq = k_cache[block_tables].reshape(S, L, Hkv, D)
    v_seq = v_cache[block_tables].reshape(S, L, Hkv, D)
    slopes = None if alibi_slopes is None else alibi_slopes.astype(jnp.float32).reshape(Hkv, Hq // Hkv)
    chunk = max(1, REFERENCE_CHUNK_BYTES // (L * Hkv * D * 4))
    outs = [
        _reference_tokens(q[a : a + chunk], k_seq, v_seq, tok_seq[a : a + chunk], positions[a : a + chunk],
                          tok_len[a : a + chunk], scale=scale, sliding_window=sliding_window, slopes=slopes,
                          logits_soft_cap=logits_soft_cap)
        for a in range(0, T, chunk)
    ]
    return (outs[0] if len(outs) == 1 else jnp.concatenate(outs)).astype(q.dtype)


REFERENCE_CHUNK_BYTES = 1 << 30  # float32 KV read by one group of the oracle's tokens


def _reference_tokens(q, k_seq, v_seq, tok_seq, positions, tok_len, *, scale, sliding_window, slopes,
                      logits_soft_cap):
    """The oracle for the tokens ``q`` [C, Hq, D] of sequences ``tok_seq``; float32 [C, Hq, D]."""
    C, Hq, D = q.shape
    _, L, Hkv, _ = k_seq.shape
    k = k_seq[tok_seq]  # [C, L, Hkv, D]
    v = v_seq[tok_seq]
    qg = q.reshape(C, Hkv, Hq // Hkv, D).astype(jnp.float32)
    kv_pos = jnp.arange(L, dtype=jnp.int32)[None, :]
    qpos = positions.astype(jnp.int32)[:, None]
    # masked with a finite value: all-masked padding rows stay NaN-free
    s, mask = masked_scores(qg, k.astype(jnp.float32), kv_pos, qpos, tok_len,
                            scale=scale, sliding_window=sliding_window, slopes=slopes, logits_soft_cap=logits_soft_cap)
    p = jax.nn.softmax(s, axis=-1)
    # Zero masked values too: unwritten slots may hold anything (NaN included) and 0 * NaN = NaN.
    v = jnp.where(mask[:, :, None, None], v.astype(jnp.float32), 0.0)
    out = jnp.einsum("thgl,tlhd->thgd", p, v)
    return out.reshape(C, Hq, D)


def _ragged_kernel(
    tile_q0_ref, tile_q1_ref, tile_seq_ref, tile_len_ref, q_ref, pos_ref, k_ref, v_ref, bt_ref,
    *rest,
    num_tiles: int, block_q: int, group: int, group_pad: int, head_dim: int, block_size: int,
    blocks_per_iter: int, scale: float, sliding_window: int | None, soft_cap: float | None,
    has_alibi: bool, exact_dot: bool, heads_fastest: bool, prefetch: bool, flat_gather: bool,
):
    if has_alibi:
        slopes_ref, o_ref = rest
    else:
        slopes_ref, (o_ref,) = None, rest
    tile_pid, h = pl.program_id(0), pl.program_id(1)
    if heads_fastest:
        tile_pid, h = h, tile_pid
    tile = num_tiles - 1 - tile_pid  # heavy (late) tiles first
    bs, bpi = block_size, blocks_per_iter
    bk = bs * bpi
    gp = group_pad
    m_rows = block_q * gp
    dp = next_pow2(head_dim)  # q and out stay unpadded in memory; the tile pads with masks
    pad_d = dp != head_dim
    precision = jax.lax.Precision.HIGHEST if exact_dot else None

    t0 = tile_q0_ref[tile]
    t1 = tile_q1_ref[tile]
    seq = tile_seq_ref[tile]
    seq_len = tile_len_ref[tile]

    r = jax.lax.broadcasted_iota(jnp.int32, (m_rows,), 0)
    tok = t0 + r // gp
    g = r % gp
    row_valid = (tok < t1) & (g < group)
    r2 = jax.lax.broadcasted_iota(jnp.int32, (m_rows, dp), 0)
    d2 = jax.lax.broadcasted_iota(jnp.int32, (m_rows, dp), 1)
    tok2 = t0 + r2 // gp
    g2 = r2 % gp
    io_mask = (tok2 < t1) & (g2 < group)
    if pad_d:
        io_mask = io_mask & (d2 < head_dim)
    q = plgpu.load(q_ref.at[tok2, h, g2, d2], mask=io_mask, other=0)  # [M, Dp]
    pos = plgpu.load(pos_ref.at[tok], mask=row_valid, other=0)
    big = jnp.int32(2**30)
    min_pos = jnp.min(jnp.where(row_valid, pos, big))
    max_pos = jnp.max(jnp.where(row_valid, pos, -1))
    kv_end = jnp.minimum(max_pos + 1, seq_len)  # exclusive; <= 0 when the tile is padding
    kv_start = jnp.int32(0)
    if sliding_window is not None:
        kv_start = jnp.maximum(min_pos - sliding_window + 1, 0)
    lo_tok = (kv_start // bs) * bs
    num_kv_tiles = (jnp.maximum(kv_end - lo_tok, 0) + bk - 1) // bk
    if sliding_window is None:
        # Tiles whose every key is visible to every row need no mask.
        full_end = jnp.minimum(min_pos + 1, seq_len)
        num_full = jnp.clip((full_end - lo_tok) // bk, 0, num_kv_tiles)
    else:
        num_full = jnp.int32(0)
    if has_alibi:
        slopes = plgpu.load(slopes_ref.at[h, g], mask=g < group, other=0.0)  # [M]

    # A KV tile as [blocks, block_size, D] (one id per block) or, with flat_gather, as [keys, D]
    # with one id per key: no reshape after the gather, the form Triton's pipeliner can turn into
    # asynchronous copies (see the decode kernel).
    kshape = (bk, dp) if flat_gather else (bpi, bs, dp)
    if flat_gather:
        kr = jax.lax.broadcasted_iota(jnp.int32, kshape, 0) % bs
        kd = jax.lax.broadcasted_iota(jnp.int32, kshape, 1)
    else:
        kb = jax.lax.broadcasted_iota(jnp.int32, kshape, 0)
        kr = jax.lax.broadcasted_iota(jnp.int32, kshape, 1)
        kd = jax.lax.broadcasted_iota(jnp.int32, kshape, 2)
    key_in_tile = jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)

    def load_kv(ref, ids, mask):
        bid = ids[:, None] if flat_gather else ids[:, None, None]
        idx = (jnp.broadcast_to(bid, kshape), kr, h, kd)
        if mask is None and pad_d:
            mask = kd < head_dim
        elif mask is not None and pad_d:
            mask = mask & (kd < head_dim)
        if mask is None:  # an fp8 cache's tile converts to q's dtype (a no-op otherwise)
            return plgpu.load(ref.at[idx]).reshape(bk, dp).astype(q_ref.dtype)
        return load_tile_as(ref.at[idx], mask, q_ref.dtype).reshape(bk, dp)

    def tile_mask(blk0):
        if flat_gather:
            key3 = jnp.broadcast_to((blk0 * bs + key_in_tile)[:, None], kshape)
        else:
            key3 = (blk0 + kb) * bs + kr
        ld_mask = key3 < kv_end
        if sliding_window is not None:
            ld_mask = ld_mask & (key3 >= kv_start)
        return ld_mask

    def fetch(j, masked=True):
        blk0 = lo_tok // bs + j * bpi
        if flat_gather:  # columns blk0 .. blk0 + bpi - 1, inside the padded table like pl.ds
            ids = plgpu.load(bt_ref.at[seq, blk0 + key_in_tile // bs])
        else:
            ids = bt_ref[seq, pl.ds(blk0, bpi)]
        mask = tile_mask(blk0) if masked else None
        return load_kv(k_ref, ids, mask), load_kv(v_ref, ids, mask)

    def attend(j, k, v, carry, masked):
        acc, m_prev, l_prev = carry
        key = lo_tok + j * bk + key_in_tile  # [bk]
        s = plgpu.dot(q, k, trans_b=True, precision=precision)  # [M, bk] f32

        def alibi():
            return slopes[:, None] * (key[None, :] - pos[:, None]).astype(jnp.float32)

        s = log2_logits(s, scale=scale, soft_cap=soft_cap, bias=alibi if has_alibi else None)
        vis = None
        if masked:
            vis = (key[None, :] <= pos[:, None]) & (key[None, :] < seq_len)
            if sliding_window is not None:
                vis = vis & (pos[:, None] - key[None, :] < sliding_window)
            s = jnp.where(vis, s, MASK_VALUE)
        # A row may see nothing in a masked tile yet (sliding window): keep it at zero weight.
        return online_softmax_step(s, v, acc, m_prev, l_prev, precision=precision, keep=vis)

    state = (
        jnp.zeros((m_rows, dp), jnp.float32),
        jnp.full((m_rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((m_rows,), jnp.float32),
    )
    fold = lambda masked: (lambda j, kv, st: attend(j, *kv, st, masked))  # noqa: E731
    if prefetch:
        # Every prefetch is masked to the keys that exist, so the tile fetched by the last
        # unmasked step is valid for the first masked one.
        state, tiles = tile_loop(0, num_full, fetch, fold(False), state, prefetch=1)
        (acc, _, l), _ = tile_loop(num_full, num_kv_tiles, fetch, fold(True), state, prefetch=1, ahead=tiles)
    else:
        state, _ = tile_loop(0, num_full, functools.partial(fetch, masked=False), fold(False), state)
        (acc, _, l), _ = tile_loop(num_full, num_kv_tiles, fetch, fold(True), state)

    safe_l = jnp.where(l > 0, l, 1.0)
    out = jnp.where(l[:, None] > 0, acc / safe_l[:, None], 0.0).astype(o_ref.dtype)
    # Rows of padding tiles are written too (zeros), so the whole output is defined.
    plgpu.store(o_ref.at[tok2, h, g2, d2], out, mask=io_mask)


def _tile_schedule(query_start_loc, seq_lens, num_tokens: int, block_q: int, num_tiles: int):
    """Maps each query tile to (first token, sequence end token, sequence, seq_len).

    Real tiles come first (sequence by sequence), then tiles covering the padding tokens after
    ``query_start_loc[-1]``, which attend to nothing and write zeros.
    """
    S = seq_lens.shape[0]
    qsl = query_start_loc.astype(jnp.int32)
    q_lens = qsl[1:] - qsl[:-1]
    n_tiles = (q_lens + block_q - 1) // block_q
    cum = jnp.cumsum(n_tiles)
    total = cum[-1]
    i = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = searchsorted_right(cum, i).astype(jnp.int32)
    real = seq < S
    seq_c = jnp.minimum(seq, S - 1)
    first = cum[seq_c] - n_tiles[seq_c]
    t0 = jnp.where(real, qsl[seq_c] + (i - first) * block_q, qsl[S] + (i - total) * block_q)
    t1 = jnp.where(real, qsl[seq_c + 1], num_tokens)
    seq_len = jnp.where(real, seq_lens.astype(jnp.int32)[seq_c], 0)
    return t0.astype(jnp.int32), t1.astype(jnp.int32), seq_c, seq_len


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale", "sliding_window", "logits_soft_cap", "block_q", "blocks_per_iter", "num_warps",
        "num_stages", "interpret", "heads_fastest", "prefetch", "flat_gather",
    ),
)
def _ragged_call(
    q, k_cache, v_cache, positions, query_start_loc, seq_lens, block_tables, alibi_slopes, *,
    scale, sliding_window, logits_soft_cap, block_q, blocks_per_iter, num_warps, num_stages,
    interpret, heads_fastest, prefetch, flat_gather,
):
    T, Hq, D = q.shape
    _, bs, hkv, _ = k_cache.shape
    G = Hq // hkv
    gp = next_pow2(G)
    S, mb = block_tables.shape
    bpi = blocks_per_iter
    num_tiles = cdiv(T, block_q) + S + 1
    t0, t1, tseq, tlen = _tile_schedule(query_start_loc, seq_lens, T, block_q, num_tiles)
    # + bpi: KV tiles start at a block, not at a tile boundary, so the last one may overhang;
    # prefetching reads one more tile of ids.
    bt = pad_block_tables(block_tables, cdiv(mb, bpi) * bpi + bpi * (1 + int(prefetch)))
    has_alibi = alibi_slopes is not None
    qg = q.reshape(T, hkv, G, D)
    kernel = functools.partial(
        _ragged_kernel, num_tiles=num_tiles, block_q=block_q, group=G, group_pad=gp, head_dim=D,
        block_size=bs, blocks_per_iter=bpi, scale=scale, sliding_window=sliding_window,
        soft_cap=logits_soft_cap, has_alibi=has_alibi, exact_dot=q.dtype == jnp.float32,
        heads_fastest=heads_fastest, prefetch=prefetch, flat_gather=flat_gather,
    )
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)  # noqa: E731
    args = [t0, t1, tseq, tlen, qg, positions.astype(jnp.int32), k_cache, v_cache, bt]
    if has_alibi:
        args.append(alibi_slopes.astype(jnp.float32).reshape(hkv, G))
    out = pl.pallas_call(
        kernel,
        grid=(hkv, num_tiles) if heads_fastest else (num_tiles, hkv),
        in_specs=[whole(a) for a in args],
        out_specs=whole(qg),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(*args)
    return out.reshape(T, Hq, D)


def ragged_paged_attention_pallas(
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
    block_m: int = 128,
    blocks_per_iter: int | None = None,
    num_warps: int = 8,
    num_stages: int | None = None,
    heads_fastest: bool = True,
    prefetch: bool = False,
    flat_gather: bool = True,
    interpret: bool = False,
) -> jnp.ndarray:
    """The Pallas kernel for a mixed step (shapes as the reference). Expects validated inputs
    (the router, :mod:`pallas_kernels.attention_router`, checks them).

    ``block_m`` is the number of (token, head) rows in a query tile (``block_q = block_m //
    group``); ``blocks_per_iter`` KV blocks are loaded per step (default: 128 keys a step, 64
    when head_dim > 128, where ``num_stages`` also drops to 2 to fit shared memory).
    ``heads_fastest`` launches the KV heads of one query tile next to each other; ``flat_gather``
    gathers a KV tile as [keys, D], one block id per key, with no reshape after the gather;
    ``prefetch`` issues the next KV tile's loads before the current tile's math. The defaults
    (heads first, flat gather, no prefetch) measured fastest on the H200; the figures are in
    benchmarks/RESULTS.md and benchmarks/HISTORY.md.
    """
    validate_kernel_inputs(q, k_cache, v_cache)
    G = q.shape[1] // k_cache.shape[2]
    bs = k_cache.shape[1]
    gp = next_pow2(G)
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m {block_m}: expected a power of two >= 16")
    block_q = max(1, block_m // gp)
    if block_q * gp < 16:
        raise ValueError(f"block_m {block_m} with group {G}: fewer than 16 rows a tile")
    wide = next_pow2(q.shape[-1]) > 128
    bpi = blocks_per_iter or max(1, (64 if wide else 128) // bs)
    num_stages = num_stages or (2 if wide else 3)
    if bpi & (bpi - 1) or bpi * bs < 16:
        raise ValueError(f"blocks_per_iter {bpi}: expected a power of two with blocks_per_iter * block_size >= 16")
    return _ragged_call(
        q, k_cache, v_cache, positions, query_start_loc, seq_lens, block_tables, alibi_slopes,
        scale=float(scale), sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
        block_q=block_q, blocks_per_iter=bpi, num_warps=num_warps, num_stages=num_stages,
        interpret=interpret, heads_fastest=heads_fastest, prefetch=prefetch, flat_gather=bool(flat_gather),
    )
