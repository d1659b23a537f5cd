"""Decode paged attention on Hopper through Pallas Mosaic GPU (TMA + wgmma): an ablation of the
Triton-lowered kernel in :mod:`pallas_kernels.paged_attention_decode`, with the same semantics.
It measured slower than that kernel at every shape on the H200, so the engine does not use it; it
stays here to be re-measured (``benchmarks/kernels.py --ablations mosaic``; figures in
benchmarks/HISTORY.md, third session).

One program (one warpgroup) per (KV head, sequence, context split). The query heads of the GQA
group are the rows of a 64-row wgmma tile: the kernel copies 64 consecutive rows of the flattened
``q [S * Hq, D]`` starting at the group's first row, so the padding rows are other heads' queries
(each output row depends only on its own query row, and only the group's rows are stored). Each
loop step gathers ``keys_per_step // block_size`` KV blocks with one TMA copy per block
(``k_cache[block_id, :, kv_head, :]``, a strided ``[block_size, head_dim]`` box) into a ring of
``num_stages`` shared-memory slots, so later steps' copies are in flight while a step computes
``S = Q K^T`` and ``O += P V`` with wgmma and an online base-2 softmax in float32.

Keys past the sequence end may hold anything (NaN included): their logits are masked, and on the
final step of a program the V rows past the end are zeroed in shared memory before ``P V``
(``0 * NaN`` would otherwise poison the accumulator). Blocks wholly past the end are not copied.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.kernel_shapes import LOG2E, MASK_VALUE, validate_decode_shapes, validate_mosaic_dtypes
from pallas_kernels.paged_attention_decode import choose_num_splits
from pallas_kernels.sizes import cdiv

ROWS = 64  # wgmma M: the GQA group is padded to one 64-row tile
Q_ALIGN = 8  # rows of the (8, 128 bytes) shared-memory tile the query window is copied into
MOSAIC_HEAD_DIMS = (64, 128)
MOSAIC_BLOCK_SIZES = (16, 32)
MOSAIC_KEYS_PER_STEP = (64, 128)
SMEM_BYTES = 227 * 1024  # Hopper's per-block shared memory (opt-in maximum)
SMEM_ALIGN = 1024  # Pallas starts every shared-memory scratch buffer on a 1024-byte boundary


def _query_window(num_rows: int, hq: int, group: int, s, h, xnp=jnp):
    """First row of the group, and the start of the 64-row window copied for it.

    The window starts on a multiple of ``Q_ALIGN`` rows: the TMA copy lands in a tiled shared-memory
    buffer, and Mosaic GPU only lowers a dynamic GMEM slice into it when the start is a provable
    multiple of the tile's rows. It is clamped so the copy never leaves ``q`` (the wrapper pads
    ``q`` to ``num_rows >= 64``, a multiple of ``Q_ALIGN``). ``xnp=np`` gives the wrapper the same
    windows as static arrays."""
    row0 = s * hq + h * group
    start = xnp.minimum(row0 // Q_ALIGN * Q_ALIGN, num_rows - ROWS)
    return row0, start


def _max_window_offset(group: int) -> int:
    """Largest ``row0 - start`` over all programs: ``row0`` is a multiple of ``group``, so its
    remainder mod ``Q_ALIGN`` is a multiple of ``gcd(group, Q_ALIGN)``."""
    return Q_ALIGN - math.gcd(group, Q_ALIGN)


def _decode_kernel(
    q_ref, k_ref, v_ref, bt_ref, sl_ref, *out_and_scratch,
    hq: int, hkv: int, block_size: int, keys_per_step: int, blocks_per_split: int,
    num_splits: int, num_stages: int, scale: float, p_in_smem: bool,
):
    if num_splits == 1:
        o_ref, lse_ref = out_and_scratch[0], None
        scratch = out_and_scratch[1:]
    else:
        o_ref, lse_ref = out_and_scratch[:2]
        scratch = out_and_scratch[2:]
    q_smem, k_smem, v_smem, o_smem, q_bar, k_bar, v_bar, *rest = scratch
    p_smem = rest.pop(0) if p_in_smem else None
    lse_smem = rest.pop(0) if lse_ref is not None else None
    h, s, c = lax.axis_index("h"), lax.axis_index("s"), lax.axis_index("c")
    bs, n = block_size, keys_per_step
    bps = n // bs  # blocks per step
    group = hq // hkv
    num_rows, d = q_ref.shape
    mb = bt_ref.shape[1]

    seq_len = sl_ref[s]
    num_blocks = (seq_len + bs - 1) // bs
    lo = c * blocks_per_split
    hi = jnp.minimum(lo + blocks_per_split, num_blocks)
    end_tok = jnp.minimum(seq_len, hi * bs)
    steps = (jnp.maximum(hi - lo, 0) + bps - 1) // bps

    row0, start = _query_window(num_rows, hq, group, s, h)
    plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(pl.multiple_of(start, Q_ALIGN), ROWS)], q_smem, q_bar)

    def issue(step):
        slot = lax.rem(step, num_stages)
        for j in range(bps):
            blk = lo + step * bps + j
            live = blk < hi
            bid = bt_ref[s, jnp.minimum(blk, mb - 1)]
            dst = pl.ds(j * bs, bs)

            @pl.when(live)
            def _copy():
                plgpu.copy_gmem_to_smem(k_ref.at[bid, :, h, :], k_smem.at[slot, dst], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[bid, :, h, :], v_smem.at[slot, dst], v_bar.at[slot])

            # The slot's barriers count bps arrivals a step; a block past the end arrives without
            # a copy. (Not ``copy_gmem_to_smem(predicate=...)``: the interpreter rejects it.)
            @pl.when(jnp.logical_not(live))
            def _skip():
                plgpu.barrier_arrive(k_bar.at[slot])
                plgpu.barrier_arrive(v_bar.at[slot])

    for i in range(num_stages):
        pl.when(i < steps)(functools.partial(issue, i))

    plgpu.barrier_wait(q_bar)
    m_i = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l_i = plgpu.layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc = plgpu.layout_cast(jnp.full((ROWS, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)
    key_col = plgpu.broadcasted_iota(jnp.int32, (ROWS, n), 1, layout=plgpu.Layout.WGMMA)
    key_row = plgpu.broadcasted_iota(jnp.int32, (n, d), 0, layout=plgpu.Layout.WGMMA)
    qk_scale = scale * LOG2E

    def step_body(step, carry):
        acc, m_i, l_i = carry
        slot = lax.rem(step, num_stages)
        first_tok = (lo + step * bps) * bs
        plgpu.barrier_wait(k_bar.at[slot])

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
            return acc_ref[...]

        logits = pl.run_scoped(qk, plgpu.ACC((ROWS, n), jnp.float32)) * qk_scale
        logits = jnp.where(key_col + first_tok < end_tok, logits, -jnp.inf)
        m_new = jnp.maximum(m_i, logits.max(axis=1))
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(logits - lax.broadcast_in_dim(m_new, logits.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        plgpu.barrier_wait(v_bar.at[slot])

        @pl.when(first_tok + n > end_tok)
        def _zero_v_tail():
            v_slot = v_smem.at[slot]
            v_slot[...] = jnp.where(key_row + first_tok < end_tok, v_slot[...], 0).astype(v_slot.dtype)
            plgpu.commit_smem()

        p16 = p.astype(v_smem.dtype)
        if p_smem is not None:
            p_smem[...] = p16
            plgpu.commit_smem()
            p16 = p_smem

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
            return acc_ref[...]

        # A fresh accumulator rather than run_state(ACC.init(acc)): the interpreter only runs
        # wgmma on accumulator refs; the extra [64, D] add per step is register work.
        acc = acc + pl.run_scoped(pv, plgpu.ACC((ROWS, acc.shape[1]), jnp.float32))
        # The slot's wgmma reads are complete (the accumulator was read back): refill it.
        pl.when(step + num_stages < steps)(functools.partial(issue, step + num_stages))
        return acc, m_new, l_i

    acc, m_i, l_i = lax.fori_loop(0, steps, step_body, (acc, m_i, l_i))

    # An empty program (padding sequence, or a split past the end) has acc == 0 and l == 0.
    live_rows = l_i > 0
    inv_l = 1.0 / jnp.where(live_rows, l_i, 1.0)
    o_smem[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(o_smem.dtype)
    if lse_ref is not None:
        lse_smem[...] = jnp.where(live_rows, m_i + jnp.log(jnp.where(live_rows, l_i, 1.0)) * LOG2E, MASK_VALUE)
    plgpu.commit_smem()
    if lse_ref is None:
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(row0 - start, group)], o_ref.at[pl.ds(row0, group)])
    else:
        prog = s * hkv + h
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[c, prog])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[c, prog])
    plgpu.wait_smem_to_gmem(0)


def _smem_bytes(d: int, itemsize: int, keys_per_step: int, num_stages: int, num_splits: int, p_in_smem: bool) -> int:
    """Shared memory as Mosaic GPU lays it out: the scratch buffers (each 1024-byte aligned), then
    Pallas' reduction scratch, then the barriers (q, and a K and a V barrier per stage)."""
    buffers = [ROWS * d * itemsize, *[num_stages * keys_per_step * d * itemsize] * 2]
    buffers.append(ROWS * d * itemsize if num_splits == 1 else ROWS * d * 4)
    if p_in_smem:
        buffers.append(ROWS * keys_per_step * itemsize)
    if num_splits > 1:
        buffers.append(ROWS * 4)
    total = 0
    for b in buffers:
        total = cdiv(total, SMEM_ALIGN) * SMEM_ALIGN + b
    total = cdiv(total, SMEM_ALIGN) * SMEM_ALIGN + plgpu.CompilerParams().reduction_scratch_bytes
    return total + 8 * (1 + 2 * num_stages)


def _merge_splits(o_part: jnp.ndarray, lse_part: jnp.ndarray, offsets: np.ndarray, group: int) -> jnp.ndarray:
    """o_part [C, P, 64, D] (normalised), lse_part [C, P, 64] (log2) -> [P, G, D] float32, taking
    rows ``offsets[p] .. offsets[p] + G`` of each program's window."""
    rows = jnp.asarray(offsets[:, None] + np.arange(group)[None, :])  # [P, G]
    o = jnp.take_along_axis(o_part, rows[None, :, :, None], axis=2)
    lse = jnp.take_along_axis(lse_part, rows[None], axis=2)
    m = lse.max(axis=0)
    w = jnp.exp2(lse - m[None])  # an empty split has lse = MASK_VALUE and weight ~0 (or o == 0)
    return (o * w[..., None]).sum(axis=0) / w.sum(axis=0)[..., None]


@functools.partial(jax.jit, static_argnames=("scale", "keys_per_step", "num_splits", "num_stages", "p_in_smem", "interpret"))
def _decode_call(
    q, k_cache, v_cache, seq_lens, block_tables, *, scale, keys_per_step, num_splits, num_stages, p_in_smem, interpret,
):
    S, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    group = hq // hkv
    bps = keys_per_step // bs
    mb = block_tables.shape[1]
    blocks_per_split = cdiv(cdiv(mb, num_splits), bps) * bps
    q2 = q.reshape(S * hq, d)
    num_rows = max(ROWS, cdiv(S * hq, Q_ALIGN) * Q_ALIGN)  # see _query_window
    if num_rows > S * hq:
        q2 = jnp.pad(q2, ((0, num_rows - S * hq), (0, 0)))

    tile = plgpu.TilingTransform((8, 128 // q.dtype.itemsize))
    swizzle = plgpu.SwizzleTransform(128)
    kv_smem = plgpu.SMEM((num_stages, keys_per_step, d), q.dtype, transforms=(tile, swizzle))
    if num_splits == 1:
        out_type = jax.ShapeDtypeStruct((S * hq, d), q.dtype)
        o_smem, lse_smem = plgpu.SMEM((ROWS, d), q.dtype), None
    else:
        out_type = (
            jax.ShapeDtypeStruct((num_splits, S * hkv, ROWS, d), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, S * hkv, ROWS), jnp.float32),
        )
        o_smem, lse_smem = plgpu.SMEM((ROWS, d), jnp.float32), plgpu.SMEM((ROWS,), jnp.float32)
    scratch = [
        plgpu.SMEM((ROWS, d), q.dtype, transforms=(tile, swizzle)), kv_smem, kv_smem, o_smem,
        plgpu.Barrier(),
        plgpu.Barrier(num_arrivals=bps, num_barriers=num_stages),
        plgpu.Barrier(num_arrivals=bps, num_barriers=num_stages),
        # No placeholder when P stays in registers: even a tiny buffer takes a 1024-byte-aligned
        # slot, which pushes keys_per_step 128 x num_stages 3 past the limit.
        *([plgpu.SMEM((ROWS, keys_per_step), q.dtype, transforms=(tile, swizzle))] if p_in_smem else []),
        *([] if lse_smem is None else [lse_smem]),
    ]
    kernel = functools.partial(
        _decode_kernel, hq=hq, hkv=hkv, block_size=bs, keys_per_step=keys_per_step,
        blocks_per_split=blocks_per_split, num_splits=num_splits, num_stages=num_stages, scale=scale,
        p_in_smem=p_in_smem,
    )
    extra = {} if interpret is None else {"interpret": interpret}
    out = plgpu.kernel(
        kernel, out_type=out_type, scratch_types=scratch, grid=(hkv, S, num_splits), grid_names=("h", "s", "c"),
        compiler_params=plgpu.CompilerParams(approx_math=True), **extra,
    )(q2, k_cache, v_cache, block_tables.astype(jnp.int32), seq_lens.astype(jnp.int32))
    if num_splits == 1:
        return out.reshape(S, hq, d)
    sh = np.arange(S * hkv)
    row0, start = _query_window(num_rows, hq, group, sh // hkv, sh % hkv, xnp=np)
    offsets = row0 - start
    return _merge_splits(*out, offsets, group).reshape(S, hq, d).astype(q.dtype)


def paged_attention_decode_mosaic(
    q: jnp.ndarray,
    k_cache: jnp.ndarray,
    v_cache: jnp.ndarray,
    seq_lens: jnp.ndarray,
    block_tables: jnp.ndarray,
    *,
    scale: float,
    keys_per_step: int = 64,
    num_stages: int = 2,
    num_splits: int | None = None,
    p_in_smem: bool = False,
    interpret: bool | plgpu.InterpretGPUParams = False,
) -> jnp.ndarray:
    """Decode attention on Hopper (Mosaic GPU): q [S, Hq, D] over the paged caches -> [S, Hq, D].

    Same semantics as :func:`pallas_kernels.paged_attention_decode.paged_attention_decode` without
    sliding window, ALiBi or soft cap; bf16/fp16, head_dim 64 or 128, block_size 16 or 32, at most
    64 query heads per KV head. Knobs: ``keys_per_step`` (keys per wgmma step, 64 or 128),
    ``num_stages`` (shared-memory ring depth: steps whose copies are in flight) and ``num_splits``
    (context splits; default :func:`choose_num_splits`) and ``p_in_smem`` (stage the
    probabilities in shared memory for ``P V`` instead of feeding wgmma from registers).
    Defaults: the fastest of the H200 probe (2 stages of 64 keys; 3 or 4 stages and 128 keys were
    slower). Even so this kernel measured slower than the Triton-lowered one at every decode
    shape (benchmarks/RESULTS.md), so the engine does not use it.
    ``interpret`` runs Mosaic GPU's CPU interpreter (True, or an ``InterpretGPUParams``), which
    needs ``p_in_smem`` and turns it on.
    """
    S, hq, d, bs, hkv = validate_decode_shapes(q, k_cache, v_cache, seq_lens, block_tables)
    validate_mosaic_dtypes(q, k_cache, v_cache)
    if d not in MOSAIC_HEAD_DIMS:
        raise ValueError(f"head_dim {d} is not supported by the mosaic kernel; allowed: {MOSAIC_HEAD_DIMS}")
    if bs not in MOSAIC_BLOCK_SIZES:
        raise ValueError(f"block_size {bs} is not supported by the mosaic kernel; allowed: {MOSAIC_BLOCK_SIZES}")
    if hq // hkv + _max_window_offset(hq // hkv) > ROWS:
        raise ValueError(
            f"num_q_heads {hq} / num_kv_heads {hkv}: expected a multiple with at most {ROWS} query heads per KV head "
            f"(and not 59, 61, 62 or 63: the group's rows must fit an {Q_ALIGN}-row-aligned {ROWS}-row window)"
        )
    if keys_per_step not in MOSAIC_KEYS_PER_STEP:
        raise ValueError(f"keys_per_step {keys_per_step} is not supported; allowed: {MOSAIC_KEYS_PER_STEP}")
    if num_stages < 1:
        raise ValueError(f"num_stages {num_stages}: expected >= 1")
    splits = num_splits or choose_num_splits(S, hkv, block_tables.shape[1], bs, keys_per_step // bs)
    if splits < 1:
        raise ValueError(f"num_splits {splits}: expected >= 1")
    itemsize = jnp.dtype(q.dtype).itemsize
    p_in_smem = bool(p_in_smem or interpret)
    smem = _smem_bytes(d, itemsize, keys_per_step, num_stages, splits, p_in_smem)
    if smem > SMEM_BYTES:
        raise ValueError(
            f"num_stages {num_stages} x keys_per_step {keys_per_step} needs {smem} bytes of shared memory "
            f"(> {SMEM_BYTES}); lower num_stages or keys_per_step"
        )
    if interpret is True:
        interpret = plgpu.InterpretGPUParams()
    return _decode_call(
        q, k_cache, v_cache, seq_lens, block_tables, scale=float(scale), keys_per_step=keys_per_step,
        num_splits=splits, num_stages=num_stages, p_in_smem=p_in_smem, interpret=interpret or None,
    )
