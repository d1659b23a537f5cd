"""Decode paged attention written in Triton itself and called through ``jax_triton.triton_call``.

An ablation beside the Pallas kernel (:mod:`pallas_kernels.paged_attention_decode`), with the same
semantics and the same design (the Pallas kernel now matches or beats it; figures in
benchmarks/HISTORY.md, third and fourth sessions; ``benchmarks/kernels.py --ablations triton``): one program per (sequence, KV head, split), the GQA group's query
rows as one M tile (padded to >= 16 for ``tl.dot``), ``keys_per_step`` keys (several blocks,
gathered through the block table) per loop step, masked K/V loads, a float32 base-2 online softmax.
Two things Pallas does not express directly are written out here: the next step's block ids and
K/V loads are issued before the current step's math (``prefetch``), and the context split writes
partial o/m/l that :func:`merge_splits` combines.

Neither ``triton`` nor ``jax_triton`` is imported at module import: CPU-only installs lack them.
:func:`get_triton_kernel` builds the ``@triton.jit`` kernel on first use, so it can also be run
under ``TRITON_INTERPRET=1`` on torch tensors without JAX.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.kernel_shapes import LOG2E, pad_group_queries, validate_decode_shapes, validate_kernel_inputs
from pallas_kernels.paged_attention_decode import choose_num_splits, merge_splits
from pallas_kernels.sizes import cdiv, is_pow2, next_pow2

MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 8, 32


@functools.cache
def get_triton_kernel() -> Any:
    """Returns the ``@triton.jit`` decode kernel (imports triton on the first call).

    Arguments: ``q [S, HKV, GP, DP]`` (padded group queries), ``k, v [num_blocks, BS, HKV, D]``,
    ``block_tables [S, MB]`` int32, ``seq_lens [S]`` int32, then the outputs ``o, m, l``: with
    ``NUM_SPLITS == 1`` ``o [S, HKV, GP, DP]`` in q's dtype (m, l unused placeholders), else float32
    partials ``o [S, HKV, NUM_SPLITS, GP, DP]``, ``m, l [S, HKV, NUM_SPLITS, GP]`` (log2 domain).
    Grid: ``(S, HKV, NUM_SPLITS)``. Every shape and option is a constexpr keyword.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def _fetch(k_ptr, v_ptr, bt_row, blk0, start_tok, end_tok, h, j, d,
               BS: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, MB: tl.constexpr,
               WINDOW: tl.constexpr):
        tok = blk0 * BS + j
        col = blk0 + j // BS
        valid = (tok < end_tok) & (col < MB)
        if WINDOW > 0:
            valid = valid & (tok >= start_tok)
        # Masked id loads: tiles past the sequence's end (prefetch, window overhang) touch nothing,
        # so the table needs no padding columns.
        ids = tl.load(bt_row + col, mask=valid, other=0).to(tl.int64)
        off = ((ids * BS + j % BS) * HKV + h) * D
        ptrs = off[:, None] + d[None, :]
        mask = valid[:, None] & (d < D)[None, :]
        k = tl.load(k_ptr + ptrs, mask=mask, other=0.0)
        v = tl.load(v_ptr + ptrs, mask=mask, other=0.0)
        return k, v, valid

    @triton.jit
    def _fold(q, k, v, valid, acc, m_i, l_i, SCALE_LOG2: tl.constexpr, EXACT: tl.constexpr):
        if EXACT:  # float32 inputs: no TF32 rounding, as the Pallas kernel's HIGHEST precision
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        # -1e30 (finite, as MASK_VALUE): a row whose keys are all hidden stays NaN-free.
        s = tl.where(valid[None, :], s * SCALE_LOG2, -1e30)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.where(valid[None, :], tl.exp2(s - m_new[:, None]), 0.0)
        l_new = l_i * alpha + tl.sum(p, 1)
        if EXACT:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        return acc * alpha[:, None] + pv, m_new, l_new

    # Triton's interpreter re-executes kernels against the module's globals (not the closure), and
    # needs triton.language visible there: publish the helpers before the kernel is first traced.
    globals().update(tl=tl, _fetch=_fetch, _fold=_fold)

    @triton.jit
    def paged_attention_decode_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr, o_ptr, m_ptr, l_ptr,
        HKV: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
        BS: tl.constexpr, BPI: tl.constexpr, MB: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr,
        NUM_SPLITS: tl.constexpr, SCALE_LOG2: tl.constexpr, WINDOW: tl.constexpr,
        PREFETCH: tl.constexpr, EXACT: tl.constexpr,
    ):
        s = tl.program_id(0)
        h = tl.program_id(1)
        c = tl.program_id(2)
        N: tl.constexpr = BPI * BS
        seq_len = tl.load(sl_ptr + s)
        num_blocks = (seq_len + BS - 1) // BS
        lo = c * BLOCKS_PER_SPLIT
        hi = tl.minimum(lo + BLOCKS_PER_SPLIT, num_blocks)
        start_tok = seq_len * 0
        if WINDOW > 0:
            start_tok = tl.maximum(seq_len - WINDOW, 0)
            lo = tl.maximum(lo, start_tok // BS)
        end_tok = tl.minimum(seq_len, hi * BS)
        num_iters = (tl.maximum(hi - lo, 0) + BPI - 1) // BPI

        g = tl.arange(0, GP)
        d = tl.arange(0, DP)
        j = tl.arange(0, N)
        row = (s * HKV + h).to(tl.int64)
        q = tl.load(q_ptr + (row * GP + g[:, None]) * DP + d[None, :])
        bt_row = bt_ptr + s.to(tl.int64) * MB
        acc = tl.zeros([GP, DP], dtype=tl.float32)
        m_i = tl.full([GP], -1e30, dtype=tl.float32)
        l_i = tl.zeros([GP], dtype=tl.float32)
        if PREFETCH:
            # Register double buffer: step i+1's gathers are in flight during step i's dots.
            k, v, valid = _fetch(k_ptr, v_ptr, bt_row, lo, start_tok, end_tok, h, j, d, BS, HKV, D, MB, WINDOW)
            for i in range(num_iters):
                k_n, v_n, valid_n = _fetch(k_ptr, v_ptr, bt_row, lo + (i + 1) * BPI, start_tok, end_tok,
                                           h, j, d, BS, HKV, D, MB, WINDOW)
                acc, m_i, l_i = _fold(q, k, v, valid, acc, m_i, l_i, SCALE_LOG2, EXACT)
                k, v, valid = k_n, v_n, valid_n
        else:
            for i in range(num_iters):
                k, v, valid = _fetch(k_ptr, v_ptr, bt_row, lo + i * BPI, start_tok, end_tok,
                                     h, j, d, BS, HKV, D, MB, WINDOW)
                acc, m_i, l_i = _fold(q, k, v, valid, acc, m_i, l_i, SCALE_LOG2, EXACT)

        if NUM_SPLITS == 1:
            safe_l = tl.where(l_i > 0, l_i, 1.0)
            o = tl.where(l_i[:, None] > 0, acc / safe_l[:, None], 0.0)
            tl.store(o_ptr + (row * GP + g[:, None]) * DP + d[None, :], o.to(o_ptr.dtype.element_ty))
        else:
            prow = row * NUM_SPLITS + c
            tl.store(o_ptr + (prow * GP + g[:, None]) * DP + d[None, :], acc)
            tl.store(m_ptr + prow * GP + g, m_i)
            tl.store(l_ptr + prow * GP + g, l_i)

    return paged_attention_decode_kernel


def kernel_meta(
    *, num_kv_heads: int, group: int, head_dim: int, block_size: int, max_blocks: int,
    keys_per_step: int, num_splits: int, scale: float, sliding_window: int | None,
    prefetch: bool, exact: bool,
) -> dict[str, Any]:
    """The kernel's constexpr keywords (shared by the JAX wrapper and the interpreter check)."""
    bpi = max(1, keys_per_step // block_size)
    return dict(
        HKV=num_kv_heads, GP=max(16, next_pow2(group)), D=head_dim, DP=next_pow2(head_dim),
        BS=block_size, BPI=bpi, MB=max_blocks,
        BLOCKS_PER_SPLIT=cdiv(cdiv(max_blocks, num_splits), bpi) * bpi, NUM_SPLITS=num_splits,
        SCALE_LOG2=float(scale) * LOG2E, WINDOW=int(sliding_window or 0),
        PREFETCH=int(bool(prefetch)), EXACT=int(bool(exact)),
    )


@functools.partial(
    jax.jit,
    static_argnames=("scale", "sliding_window", "num_splits", "keys_per_step", "num_warps", "num_stages", "prefetch"),
)
def _decode_call(q, k_cache, v_cache, seq_lens, block_tables, *, scale, sliding_window, num_splits,
                 keys_per_step, num_warps, num_stages, prefetch):
    import jax_triton as jt

    S, Hq, D = q.shape
    _, bs, hkv, _ = k_cache.shape
    G = Hq // hkv
    meta = kernel_meta(
        num_kv_heads=hkv, group=G, head_dim=D, block_size=bs, max_blocks=block_tables.shape[1],
        keys_per_step=keys_per_step, num_splits=num_splits, scale=scale,
        sliding_window=sliding_window, prefetch=prefetch, exact=q.dtype == jnp.float32,
    )
    gp, dp = meta["GP"], meta["DP"]
    qg = pad_group_queries(q, hkv, gp, dp)
    if num_splits == 1:
        # m/l are not written with one split; one-element placeholders keep a single signature.
        out_shape = [
            jax.ShapeDtypeStruct((S, hkv, gp, dp), q.dtype),
            jax.ShapeDtypeStruct((1,), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.float32),
        ]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((S, hkv, num_splits, gp, dp), jnp.float32),
            jax.ShapeDtypeStruct((S, hkv, num_splits, gp), jnp.float32),
            jax.ShapeDtypeStruct((S, hkv, num_splits, gp), jnp.float32),
        ]
    o, m, l = jt.triton_call(
        qg, k_cache, v_cache, block_tables.astype(jnp.int32), seq_lens.astype(jnp.int32),
        kernel=get_triton_kernel(), out_shape=out_shape, grid=(S, hkv, num_splits),
        num_warps=num_warps, num_stages=num_stages, name="paged_attention_decode_triton", **meta,
    )
    if num_splits > 1:
        o = merge_splits(o, m, l)
    return o[:, :, :G, :D].reshape(S, Hq, D).astype(q.dtype)


def paged_attention_decode_triton(
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
    num_splits: int | None = None,
    keys_per_step: int = 32,
    num_warps: int = 4,
    num_stages: int = 2,
    prefetch: bool = False,
) -> jnp.ndarray:
    """Decode attention: q [S, Hq, D] over the paged caches [num_blocks, block_size, Hkv, D] -> [S, Hq, D].

    Same semantics as :func:`pallas_kernels.paged_attention_decode.paged_attention_decode` for
    bf16/fp16/fp32, head_dim 16..256, block_size 8..32 (powers of two), GQA/MQA and an optional
    sliding window; ALiBi and the logit soft cap are not implemented (ValueError). Knobs:
    ``keys_per_step`` (keys per loop step, a power of two >= block_size and >= 16),
    ``num_splits`` (context splits; default :func:`choose_num_splits`), ``prefetch`` (issue the next
    step's loads before the current step's math; off by default: on the H200 it measured slower,
    64 x 2048 MHA 0.820 vs 0.647 ms, its double-buffered tiles take ~200 registers a thread),
    ``num_warps``, ``num_stages``.
    """
    if alibi_slopes is not None or logits_soft_cap is not None:
        raise ValueError("alibi_slopes / logits_soft_cap are not supported by the triton variant; use the pallas kernel")
    S, Hq, D, bs, hkv = validate_decode_shapes(q, k_cache, v_cache, seq_lens, block_tables)
    validate_kernel_inputs(q, k_cache, v_cache)
    if not is_pow2(bs) or not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE:
        raise ValueError(f"block_size {bs}: the triton variant allows 8, 16, 32")
    if not is_pow2(keys_per_step) or keys_per_step < max(16, bs):
        raise ValueError(f"keys_per_step {keys_per_step}: expected a power of two >= max(16, block_size={bs})")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window {sliding_window}: expected >= 1 or None")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits {num_splits}: expected >= 1 or None")
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps {num_warps}: allowed 1, 2, 4, 8, 16")
    if num_stages < 1:
        raise ValueError(f"num_stages {num_stages}: expected >= 1")
    try:
        import jax_triton  # noqa: F401
    except ImportError as e:
        raise RuntimeError("paged_attention_decode_triton needs the jax_triton package (and triton); "
                           "use pallas_kernels.paged_attention_decode on this install") from e
    mb = block_tables.shape[1]
    splits = num_splits or choose_num_splits(S, hkv, mb, bs, max(1, keys_per_step // bs))
    return _decode_call(
        q, k_cache, v_cache, seq_lens, block_tables, scale=float(scale), sliding_window=sliding_window,
        num_splits=splits, keys_per_step=keys_per_step, num_warps=num_warps, num_stages=num_stages,
        prefetch=bool(prefetch),
    )
