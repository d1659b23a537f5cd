"""Ragged paged attention for prefill chunks on Hopper through Pallas Mosaic GPU: warp-specialised
(FlashAttention-3 style) with KV read through block tables by one TMA copy per block.

Same semantics as :func:`pallas_kernels.ragged_paged_attention.ragged_paged_attention_reference`
for the sequences it is given, under the engine's contract that a sequence's query tokens are
its last ``q_len`` positions (``positions[qsl[s] + i] == seq_lens[s] - q_len + i``); no sliding
window, ALiBi or soft cap.

Work split: the query tokens of each sequence are cut into tiles of 128 rows starting at an
8-aligned token (a tile's first rows may belong to the previous sequence: they are computed and
dropped). One CUDA block holds three warpgroups: two compute warpgroups with 64 query rows each
(one query head) and a memory warpgroup that streams the sequence's K and V tiles of
``block_kv`` keys into a ring of ``num_stages`` shared-memory slots, one TMA copy per KV block
(``k_cache[block_id, :, kv_head, :]``). The compute warpgroups run ``S = Q K^T`` and ``O += P V``
on wgmma with an online base-2 softmax, taking turns on the tensor cores (a schedule barrier) so
that one's softmax overlaps the other's matrix products. KV tiles wholly visible to every row of
a warpgroup skip the mask. Blocks are persistent over tiles (tile ``g``, ``g + grid``, ...), heavy
tiles first. Output rows land in a tile-major buffer, gathered back to token order by XLA.

Keys past a sequence's end may hold anything (NaN included): their logits are masked, and the V
rows past the end are zeroed in shared memory before ``P V`` on the tile's last KV step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.kernel_shapes import LOG2E, MASK_VALUE, searchsorted_right, token_seq_ids, validate_mosaic_dtypes
from pallas_kernels.sizes import cdiv

ROWS = 64  # query rows per compute warpgroup (wgmma M)
TILE = 2 * ROWS  # query rows per block: two compute warpgroups
ALIGN = 8  # a tile's first row: the query TMA lands in (8-row) tiled shared memory
MOSAIC_HEAD_DIMS = (64, 128, 256)
MOSAIC_BLOCK_SIZES = (8, 16, 32, 64)


def _tile_plan(query_start_loc, seq_lens, num_tokens: int, max_seqs: int, num_tiles: int):
    """Tiles of the (at most ``max_seqs``) sequences with query tokens and keys, heaviest first.

    Returns per tile (sorted): first query row read (8-aligned), position of that row, the
    sequence's KV length (0: no tile), its sequence; the number of real tiles; and per token its
    row in the tile-major output (-1: not computed here)."""
    S = seq_lens.shape[0]
    qsl = query_start_loc.astype(jnp.int32)
    q_len = qsl[1:] - qsl[:-1]
    sl = seq_lens.astype(jnp.int32)
    active = (q_len > 0) & (sl > 0)
    take = active & (jnp.cumsum(active) <= max_seqs)
    a0 = qsl[:-1] // ALIGN * ALIGN
    n_t = jnp.where(take, (qsl[1:] - a0 + TILE - 1) // TILE, 0)
    cum = jnp.cumsum(n_t)
    total = cum[-1]
    i = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.minimum(searchsorted_right(cum, i).astype(jnp.int32), S - 1)
    real = i < total
    j = i - (cum[seq] - n_t[seq])
    row0 = a0[seq] + j * TILE
    pos0 = (sl[seq] - q_len[seq]) + (row0 - qsl[seq])  # position of row0 (< 0: rows of the previous sequence)
    kv_len = jnp.where(real, sl[seq], 0)
    work = jnp.where(real, jnp.minimum(pos0 + TILE, kv_len), -1)
    order = jnp.argsort(-work, stable=True).astype(jnp.int32)  # heavy tiles first, empty ones last
    inv = jnp.zeros_like(order).at[order].set(i)
    # Token t of a taken sequence sits in tile (first + (t - a0) // TILE), row (t - a0) % TILE.
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    tok_seq = token_seq_ids(qsl, num_tokens)
    off = t - a0[tok_seq]
    orig = cum[tok_seq] - n_t[tok_seq] + off // TILE
    tok_row = jnp.where(take[tok_seq] & (t < qsl[-1]), inv[jnp.clip(orig, 0, num_tiles - 1)] * TILE + off % TILE, -1)
    tiles = jnp.stack([row0[order], pos0[order], kv_len[order], seq[order]])
    return tiles, total.reshape(1), tok_row, take


def _kernel(
    tiles_ref, total_ref, q_ref, k_ref, v_ref, bt_ref, o_ref, *scratch,
    hq: int, hkv: int, block_size: int, block_kv: int, num_stages: int, scale: float,
    num_programs: int, interpret: bool,
):
    (qo_smem2, k_smem, v_smem, *p_smem2), (k_bar, v_bar, q_bar), (k_used, v_used), sched = scratch
    p_smem2 = p_smem2[0] if p_smem2 else None
    h, prog = lax.axis_index("heads"), lax.axis_index("progs")
    wg = lax.axis_index("wg")
    group = hq // hkv
    kv_head = h // group
    bs, bkv = block_size, block_kv
    bps = bkv // bs
    mb = bt_ref.shape[1]
    d = q_ref.shape[-1]
    dtype = q_ref.dtype
    total = total_ref[0]
    my_tiles = jnp.maximum(total - prog + num_programs - 1, 0) // num_programs

    def tile_info(it):
        tile = prog + it * num_programs
        row0, pos0, kv_len, seq = (tiles_ref[r, tile] for r in range(4))
        steps = jnp.where(kv_len > 0, (jnp.minimum(pos0 + TILE, kv_len) + bkv - 1) // bkv, 0)
        return tile, row0, pos0, kv_len, seq, steps

    def sync():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    @pl.when(wg < 2)
    def _compute():
        if not interpret:
            plgpu.set_max_registers(232, action="increase")
        qo_smem = qo_smem2.at[wg]
        p_smem = None if p_smem2 is None else p_smem2.at[wg]

        def tile_body(it, base):
            tile, row0, pos0, kv_len, _, total_steps = tile_info(it)
            first = pos0 + wg * ROWS  # position of this warpgroup's first row
            kv_end = jnp.clip(jnp.minimum(first + ROWS, kv_len), 0, None)
            steps = jnp.where(total_steps > 0, (kv_end + bkv - 1) // bkv, 0)
            full = jnp.clip(jnp.minimum(first + 1, kv_len) // bkv, 0, steps)
            plgpu.copy_gmem_to_smem(
                q_ref.at[pl.ds(pl.multiple_of(row0 + wg * ROWS, ALIGN), ROWS), h], qo_smem, q_bar.at[wg]
            )
            plgpu.barrier_wait(q_bar.at[wg])
            m_i = plgpu.layout_cast(jnp.full((ROWS,), MASK_VALUE, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l_i = plgpu.layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((ROWS, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)

            @pl.when(steps > 0)
            def _():
                plgpu.barrier_wait(k_bar.at[lax.rem(base, num_stages)])

            pl.when(wg == 1)(sync)

            def step(j, carry, masked: bool):
                acc, m_i, l_i = carry
                slot = lax.rem(base + j, num_stages)

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                    sync()
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((ROWS, bkv), jnp.float32))
                plgpu.barrier_arrive(k_used.at[slot])
                s = s * (scale * LOG2E)
                if masked:
                    row = plgpu.broadcasted_iota(jnp.int32, (ROWS, bkv), 0, layout=plgpu.Layout.WGMMA)
                    key = plgpu.broadcasted_iota(jnp.int32, (ROWS, bkv), 1, layout=plgpu.Layout.WGMMA) + j * bkv
                    s = jnp.where((key <= row + first) & (key < kv_len), s, MASK_VALUE)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                plgpu.barrier_arrive(sched)  # softmax done
                plgpu.barrier_wait(v_bar.at[slot])
                if masked:
                    # The tile's last step may hold keys past the end (unwritten slots: any bits).
                    @pl.when((j + 1) * bkv > kv_len)
                    def _zero_v_tail():
                        v_slot = v_smem.at[slot]
                        vrow = plgpu.broadcasted_iota(jnp.int32, (bkv, d), 0, layout=plgpu.Layout.WGMMA) + j * bkv
                        v_slot[...] = jnp.where(vrow < kv_len, v_slot[...], 0).astype(dtype)
                        plgpu.commit_smem()

                plgpu.barrier_wait(sched)  # the tensor cores are ours
                if p_smem is not None:
                    p_smem[...] = p16
                    plgpu.commit_smem()
                    p16 = p_smem

                def wait_next():
                    @pl.when(j + 1 < steps)
                    def _():
                        plgpu.barrier_wait(k_bar.at[lax.rem(base + j + 1, num_stages)])

                if interpret:  # the interpreter runs wgmma on fresh accumulator refs only
                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                        wait_next()
                        return acc_ref[...]

                    acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS, d), jnp.float32))
                else:
                    def pv(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                        wait_next()

                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_used.at[slot])
                return acc, m_new, l_i

            def drain(j, _):
                # Steps past this warpgroup's causal range: keep the barriers' phases in step.
                slot = lax.rem(base + j, num_stages)
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_arrive(k_used.at[slot])
                sync()
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_arrive(v_used.at[slot])
                sync()
                return None

            carry = lax.fori_loop(0, full, functools.partial(step, masked=False), (acc, m_i, l_i))
            acc, m_i, l_i = lax.fori_loop(full, steps, functools.partial(step, masked=True), carry)
            lax.fori_loop(steps, total_steps, drain, None)
            pl.when(wg == 0)(sync)

            live = l_i > 0
            inv_l = 1.0 / jnp.where(live, l_i, 1.0)
            qo_smem[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[pl.ds(pl.multiple_of(tile * TILE + wg * ROWS, ROWS), ROWS), h])
            # The next tile's query copy reuses the buffer.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            return base + total_steps

        lax.fori_loop(0, my_tiles, tile_body, jnp.int32(0))

    @pl.when(wg == 2)
    def _memory():
        if not interpret:
            plgpu.set_max_registers(40, action="decrease")

        def tile_body(it, base):
            _, _, _, kv_len, seq, total_steps = tile_info(it)
            num_blocks = (kv_len + bs - 1) // bs

            def issue(j, _):
                g = base + j
                slot = lax.rem(g, num_stages)
                for ref, smem, bar, used in ((k_ref, k_smem, k_bar, k_used), (v_ref, v_smem, v_bar, v_used)):
                    @pl.when(g >= num_stages)
                    def _():
                        plgpu.barrier_wait(used.at[slot])

                    for b in range(bps):
                        blk = j * bps + b
                        live = blk < num_blocks
                        bid = bt_ref[seq, jnp.minimum(blk, mb - 1)]

                        @pl.when(live)
                        def _copy():
                            plgpu.copy_gmem_to_smem(
                                ref.at[bid, :, kv_head, :], smem.at[slot, pl.ds(b * bs, bs)], bar.at[slot]
                            )

                        # A block past the end arrives without a copy (its rows are masked/zeroed).
                        pl.when(jnp.logical_not(live))(functools.partial(plgpu.barrier_arrive, bar.at[slot]))
                return None

            lax.fori_loop(0, total_steps, issue, None)
            return base + total_steps

        lax.fori_loop(0, my_tiles, tile_body, jnp.int32(0))


@functools.partial(
    jax.jit, static_argnames=("scale", "block_kv", "num_stages", "max_seqs", "num_programs", "interpret")
)
def _ragged_call(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, *, scale, block_kv, num_stages,
                 max_seqs, num_programs, interpret):
    T, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    # Each taken sequence adds at most one partial tile and 7 alignment rows.
    num_tiles = (T + (ALIGN - 1) * max_seqs) // TILE + max_seqs + 1
    tiles, total, tok_row, take = _tile_plan(query_start_loc, seq_lens, T, max_seqs, num_tiles)
    if T % ALIGN:  # the query TMA tiles q's token axis by 8 rows (the engine's buckets need no pad)
        q = jnp.pad(q, ((0, ALIGN - T % ALIGN), (0, 0), (0, 0)))
    progs = num_programs or min(num_tiles, max(1, cdiv(T, TILE)))
    tile = plgpu.TilingTransform((8, 128 // q.dtype.itemsize))
    swizzle = plgpu.SwizzleTransform(128)
    kv_smem = plgpu.SMEM((num_stages, block_kv, d), q.dtype, transforms=(tile, swizzle))
    buffers = [plgpu.SMEM((2, ROWS, d), q.dtype, transforms=(tile, swizzle)), kv_smem, kv_smem]
    if interpret:
        buffers.append(plgpu.SMEM((2, ROWS, block_kv), q.dtype, transforms=(tile, swizzle)))
    bps = block_kv // bs
    kernel = functools.partial(
        _kernel, hq=hq, hkv=hkv, block_size=bs, block_kv=block_kv, num_stages=num_stages, scale=scale,
        num_programs=progs, interpret=bool(interpret),
    )

    def entry(*refs):
        pl.run_scoped(
            lambda *scratch: kernel(*refs, *scratch),
            buffers,
            (
                plgpu.Barrier(num_arrivals=bps, num_barriers=num_stages),
                plgpu.Barrier(num_arrivals=bps, num_barriers=num_stages),
                plgpu.Barrier(num_barriers=2),
            ),
            (plgpu.Barrier(num_arrivals=2, num_barriers=num_stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    extra = {} if not interpret else {"interpret": interpret}
    out = plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((num_tiles * TILE, hq, d), q.dtype),
        grid=(hq, progs),
        grid_names=("heads", "progs"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **extra,
    )(tiles, total, q, k_cache, v_cache, block_tables.astype(jnp.int32))
    res = jnp.where((tok_row >= 0)[:, None, None], out[jnp.maximum(tok_row, 0)], 0)
    return res.astype(q.dtype), take


def ragged_paged_attention_mosaic(
    q: jnp.ndarray,
    k_cache: jnp.ndarray,
    v_cache: jnp.ndarray,
    query_start_loc: jnp.ndarray,
    seq_lens: jnp.ndarray,
    block_tables: jnp.ndarray,
    *,
    scale: float,
    block_kv: int | None = None,
    num_stages: int = 2,
    max_seqs: int | None = None,
    num_programs: int | None = None,
    interpret: bool | plgpu.InterpretGPUParams = False,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Causal ragged attention of prefill chunks (shapes as the ragged reference, positions implied:
    each sequence's query tokens are its last ``q_len`` positions) -> (out [T, Hq, D], taken [S]).

    Only the first ``max_seqs`` sequences with query tokens and ``seq_lens > 0`` are computed
    (``taken``); every other token's output is zero, for the caller to fill from another kernel.
    ``block_kv`` keys per pipeline step (default 128, 64 for head_dim 256), ``num_stages``
    shared-memory slots, ``num_programs`` blocks per query head (default one per 128 tokens).
    bf16/fp16, head_dim 64/128/256, block_size 8-64. ``interpret`` runs Mosaic GPU's CPU
    interpreter (probabilities staged through shared memory, fresh accumulators).
    """
    if q.ndim != 3 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q {q.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape}: bad ranks")
    T, hq, d = q.shape
    _, bs, hkv, dk = k_cache.shape
    validate_mosaic_dtypes(q, k_cache, v_cache)
    if d != dk or d not in MOSAIC_HEAD_DIMS:
        raise ValueError(f"head_dim {d} (cache {dk}) is not supported by the mosaic kernel; allowed: {MOSAIC_HEAD_DIMS}")
    if bs not in MOSAIC_BLOCK_SIZES:
        raise ValueError(f"block_size {bs} is not supported by the mosaic kernel; allowed: {MOSAIC_BLOCK_SIZES}")
    if hq % hkv:
        raise ValueError(f"num_q_heads {hq} is not a multiple of num_kv_heads {hkv}")
    S = seq_lens.shape[0]
    if query_start_loc.shape != (S + 1,) or block_tables.ndim != 2 or block_tables.shape[0] != S:
        raise ValueError(
            f"query_start_loc {query_start_loc.shape}, seq_lens {seq_lens.shape}, block_tables "
            f"{block_tables.shape}: expected [S+1], [S], [S, max_blocks]"
        )
    bkv = block_kv or (64 if d > 128 else 128)
    if bkv % 64 or bkv % bs:
        raise ValueError(f"block_kv {bkv}: expected a multiple of 64 and of block_size {bs}")
    if num_stages < 2:
        raise ValueError(f"num_stages {num_stages}: expected >= 2")
    if interpret is True:
        interpret = plgpu.InterpretGPUParams()
    return _ragged_call(
        q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale=float(scale), block_kv=bkv,
        num_stages=num_stages, max_seqs=min(S, max_seqs or S), num_programs=num_programs, interpret=interpret or None,
    )
