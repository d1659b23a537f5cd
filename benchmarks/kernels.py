"""Kernel benchmarks on the GPU: paged decode attention, ragged (prefill) attention, KV write.

Run on the GPU machine from the repository root::

    PYTHONPATH=. python3 benchmarks/kernels.py --out $OUT [--sweep] [--quick] [--ablations triton,mosaic]

Ceilings are measured in the same run: device-to-device copy bandwidth (bytes read + written) and
the bf16 matmul rate. Decode is reported as achieved bandwidth (KV bytes read + q + out) next to
JAX's own ``jax.experimental.pallas.ops.gpu.paged_attention`` on the same data (its layout is
``[num_kv_heads, num_blocks, block_size, head_dim]``: the cache is transposed once for it, outside
the timing). Prefill is reported as TFLOP/s of causal attention (4 * D * Hq * sum of visible keys).
Timing: warm-up, then the median over ``reps`` of a loop of ``n`` calls with one sync per loop;
inputs rotate over disjoint block sets so that small cases do not run from L2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.engine_args import KV_CACHE_DTYPES
from jaxpaged.kv_cache import resolve_kv_cache_dtype
from pallas_kernels import attention_router
from pallas_kernels.kv_cache_write import write_kv
from pallas_kernels.paged_attention_decode import choose_num_splits, paged_attention_decode
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_pallas
from pallas_kernels.ragged_paged_attention_mosaic import ragged_paged_attention_mosaic
from pallas_kernels.sizes import cdiv

L2_BYTES = 50 * 2**20
# Decode-kernel tuning variants (the default: 64 keys a step, 3 stages, 4 warps).
DECODE_VARIANTS = [dict(), dict(num_stages=4), dict(num_stages=2), dict(blocks_per_iter=8)]
# On an fp8 cache a 64-key step moves half the bytes of a bf16 one: also wider steps and more warps.
FP8_DECODE_VARIANTS = [dict(blocks_per_iter=8, num_stages=4), dict(blocks_per_iter=16), dict(blocks_per_iter=8, num_warps=8)]
CEILINGS: dict = {}


def variant_name(prefix: str, variant: dict) -> str:
    """``prefix[k=v,...]`` for a tuning variant's result keys (just ``prefix`` for the default)."""
    return prefix + ("" if not variant else "[" + ",".join(f"{k}={x}" for k, x in variant.items()) + "]")


def bench(fn, arg_sets, *, target_s=0.02, reps=15, warmup=2):
    """Median seconds per call of fn(*args) rotating over arg_sets."""
    for i in range(warmup):
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))
    one = max(time.perf_counter() - t0, 1e-6)
    n = int(min(200, max(1, target_s / one)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for i in range(n):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times), (min(times), max(times))


def measure_ceilings():
    x = [jax.random.normal(jax.random.key(i), (2 * 2**30 // 2,), jnp.bfloat16) for i in range(2)]
    bws = {}
    # Device-to-device copy, counted as bytes read + bytes written; two ways, the faster counts.
    for name, f in (("copy_add1", lambda a: a + jnp.bfloat16(1)), ("copy_op", lambda a: jnp.copy(a))):
        t, _ = bench(jax.jit(f), [(a,) for a in x], reps=10)
        bws[name] = 2 * x[0].nbytes / t
    t, _ = bench(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), [(a,) for a in x], reps=10)
    bws["read_sum"] = x[0].nbytes / t
    print({k: f"{v / 1e12:.3f} TB/s" for k, v in bws.items()}, flush=True)
    copy_bw = max(bws["copy_add1"], bws["copy_op"])
    CEILINGS.update(bws)
    del x
    n = 8192
    a = [jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in range(4)]
    mm = jax.jit(lambda p, q: p @ q)
    t, _ = bench(mm, [(a[0], a[1]), (a[2], a[3])], reps=10)
    mm_rate = 2 * n**3 / t
    return copy_bw, mm_rate


def make_decode_inputs(key, S, ctx, hq, hkv, d, bs, dtype=jnp.bfloat16, kv_dtype=None):
    """``kv_dtype``: the cache's element type when it differs from ``dtype`` (an fp8 cache: the
    keys and values drawn in ``dtype``, then cast; N(0, 1) values need no saturation)."""
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    mb = ctx // bs
    kv_bytes = 2 * S * ctx * hkv * d * jnp.dtype(kv_dtype).itemsize
    n_rot = int(min(8, max(1, math.ceil(4 * L2_BYTES / kv_bytes))))
    nb = S * mb * n_rot
    k1, k2, k3 = jax.random.split(key, 3)
    kc = jax.random.normal(k1, (nb, bs, hkv, d), dtype).astype(kv_dtype)
    vc = jax.random.normal(k2, (nb, bs, hkv, d), dtype).astype(kv_dtype)
    q = jax.random.normal(k3, (S, hq, d), dtype)
    perm = np.random.default_rng(0).permutation(nb).astype(np.int32).reshape(n_rot, S, mb)
    tables = [jnp.asarray(p) for p in perm]
    seq_lens = jnp.full((S,), ctx, jnp.int32)
    return q, kc, vc, seq_lens, tables, kv_bytes


def ablation_kernel(name: str):
    """The decode-kernel ablations beside the shipped Pallas (Triton lowering) kernel: the same
    algorithm in the Triton language through jax-triton, and the Mosaic GPU (TMA + wgmma) one."""
    if name == "triton":
        from benchmarks.ablations.paged_attention_decode_triton import paged_attention_decode_triton  # noqa: PLC0415

        return paged_attention_decode_triton
    if name == "mosaic":
        from benchmarks.ablations.paged_attention_decode_mosaic import paged_attention_decode_mosaic  # noqa: PLC0415

        return paged_attention_decode_mosaic
    raise ValueError(f"ablation {name!r}: allowed 'triton', 'mosaic'")


def time_ablation(name, row, ref, inputs, moved, d):
    q, kc, vc, sl, tables = inputs
    try:
        kern = ablation_kernel(name)
        fn = jax.jit(lambda q, kc, vc, sl, bts: [kern(q, kc, vc, sl, bt, scale=d**-0.5) for bt in bts])
        out = fn(q, kc, vc, sl, tables)[0]
        err = float(jnp.linalg.norm((out - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
        t, _ = bench(fn, [(q, kc, vc, sl, tables)])
        t /= len(tables)
        row.update({f"{name}_ms": t * 1e3, f"{name}_TBps": moved / t / 1e12, f"{name}_rel_diff": err})
    except Exception as e:  # noqa: BLE001
        row[f"{name}_skipped"] = f"{type(e).__name__}: {str(e)[:300]}"


def run_decode(copy_bw, args, results, sweep):
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_pa  # noqa: PLC0415

    batches = [1, 8, 64, 256]
    ctxs = [512, 2048, 8192]
    heads = [(32, 32), (32, 8)]
    if args.quick:
        batches, ctxs = [1, 64], [2048]
    d, bs = 128, 16
    # With --sweep: the default against its pipeline depth and keys per step.
    variants = DECODE_VARIANTS if sweep else [dict()]
    if sweep and args.kv_cache_dtype != "auto":
        variants = variants + FP8_DECODE_VARIANTS
    for hq, hkv in heads:
        for S in batches:
            for ctx in ctxs:
                if S * ctx * hkv * d * 4 > 40 * 2**30:
                    results.append(dict(kind="decode_skipped", batch=S, ctx=ctx, hq=hq, hkv=hkv, why="KV > 40 GiB"))
                    continue
                q, kc, vc, sl, tables, kv_bytes = make_decode_inputs(jax.random.key(S + ctx), S, ctx, hq, hkv, d, bs,
                                                                     kv_dtype=resolve_kv_cache_dtype(args.kv_cache_dtype, jnp.bfloat16))
                moved = kv_bytes + 2 * q.nbytes
                row = dict(kind="decode", batch=S, ctx=ctx, hq=hq, hkv=hkv, d=d, block_size=bs, bytes=moved,
                           kv_cache_dtype=args.kv_cache_dtype)
                ref = None
                for v in (variants if (sweep and (args.sweep_all or (S == 64 and ctx == 2048))) else [dict()]):
                    # One jit runs the kernel once per rotated table: no host dispatch per call.
                    fn = jax.jit(lambda q, kc, vc, sl, bts, v=v: [
                        paged_attention_decode(q, kc, vc, sl, bt, scale=d**-0.5, **v) for bt in bts])
                    if ref is None:
                        ref = fn(q, kc, vc, sl, tables)[0]
                    t, spread = bench(fn, [(q, kc, vc, sl, tables)])
                    t /= len(tables)
                    name = variant_name("pallas", v)
                    row[name + "_ms"] = t * 1e3
                    row[name + "_TBps"] = moved / t / 1e12
                    row[name + "_frac_copy"] = moved / t / copy_bw
                row["splits"] = choose_num_splits(S, hkv, ctx // bs, bs, 4)
                # JAX's own kernel: [Hkv, NB, bs, D] layout, same data.
                try:
                    kt = jnp.transpose(kc, (2, 0, 1, 3))
                    vt = jnp.transpose(vc, (2, 0, 1, 3))
                    # JAX's kernel applies no softmax scale: fold it into q.
                    qs = (q.astype(jnp.float32) * d**-0.5).astype(q.dtype)
                    jfn = jax.jit(lambda q, kt, vt, sl, bts: [jax_pa.paged_attention(q, kt, vt, bt, sl) for bt in bts])
                    jout = jfn(qs, kt, vt, sl, tables)[0]
                    err = float(jnp.linalg.norm((jout - ref).astype(jnp.float32)) / jnp.linalg.norm(ref.astype(jnp.float32)))
                    t, _ = bench(jfn, [(qs, kt, vt, sl, tables)])
                    t /= len(tables)
                    row["jax_ms"] = t * 1e3
                    row["jax_TBps"] = moved / t / 1e12
                    row["speedup_vs_jax"] = row["jax_ms"] / row["pallas_ms"]
                    row["rel_diff_vs_jax"] = err
                    del kt, vt
                except Exception as e:  # noqa: BLE001
                    row["jax_skipped"] = f"{type(e).__name__}: {str(e)[:200]}"
                for name in args.ablations:
                    time_ablation(name, row, ref, (q, kc, vc, sl, tables), moved, d)
                results.append(row)
                print(json.dumps(row), flush=True)
                del q, kc, vc, tables


def run_decode_variants(copy_bw, args, results):
    """Decode-kernel tuning variants at the shapes where the KV read dominates, then the
    context-split count at the small batches where one program per (sequence, KV head) cannot
    fill the GPU."""
    d = 128
    variants = DECODE_VARIANTS
    shapes = [(64, 2048, 32, 32), (256, 512, 32, 32), (64, 2048, 32, 8), (8, 8192, 32, 8), (64, 8192, 32, 32),
              (256, 8192, 32, 32), (8, 8192, 32, 32)]
    split_shapes = [(1, 512, 32, 32), (1, 2048, 32, 32), (1, 8192, 32, 32), (1, 512, 32, 8), (1, 2048, 32, 8),
                    (1, 8192, 32, 8), (8, 512, 32, 8), (8, 2048, 32, 32), (8, 8192, 32, 32), (8, 8192, 32, 8)]
    if args.quick:
        shapes, split_shapes = shapes[:1], split_shapes[:2]
    plan = [] if args.sweep_all else [(sh, variants) for sh in shapes]  # --sweep-all: the decode table has them
    plan += [(sh, [dict(num_splits=k) for k in (1, 2, 4, 8, 16, 32, 64) if k <= sh[1] // 32]) for sh in split_shapes]
    bs = 16
    for (S, ctx, hq, hkv), vs in plan:
        q, kc, vc, sl, tables, kv_bytes = make_decode_inputs(jax.random.key(S + ctx), S, ctx, hq, hkv, d, bs)
        moved = kv_bytes + 2 * q.nbytes
        ref = None
        for v in vs:
            fn = jax.jit(lambda q, kc, vc, sl, bts, v=v: [
                paged_attention_decode(q, kc, vc, sl, bt, scale=d**-0.5, **v) for bt in bts])
            row = dict(kind="decode_variant", batch=S, ctx=ctx, hq=hq, hkv=hkv, block_size=bs, variant=v)
            try:
                out = fn(q, kc, vc, sl, tables)[0]
                ref = out if ref is None else ref
                t, _ = bench(fn, [(q, kc, vc, sl, tables)])
                t /= len(tables)
                row.update(ms=t * 1e3, TBps=moved / t / 1e12, frac_copy=moved / t / copy_bw,
                           max_abs_diff=float(jnp.max(jnp.abs((out - ref).astype(jnp.float32)))))
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            results.append(row)
            print(json.dumps(row), flush=True)
        del q, kc, vc, tables


def make_mixed_inputs(S: int, ctx: int, T: int, hq: int, hkv: int, d: int, bs: int = 16):
    """A mixed step: S - 1 decode tokens at ``ctx`` keys and one prefill chunk from position 0
    filling the T-token step; blocks shuffled. Returns the ragged kernels' positional inputs."""
    q_lens = [1] * (S - 1) + [T - (S - 1)]
    seq_lens = np.asarray([ctx] * (S - 1) + [T - (S - 1)], np.int32)
    nblk = [cdiv(int(n), bs) for n in seq_lens]
    nb = sum(nblk)
    perm = np.random.default_rng(0).permutation(nb).astype(np.int32)
    tables = np.zeros((S, max(nblk)), np.int32)
    a = 0
    for i, n in enumerate(nblk):
        tables[i, :n] = perm[a : a + n]
        a += n
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    positions = np.concatenate([[ctx - 1] * (S - 1), np.arange(T - (S - 1))]).astype(np.int32)
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    kc = jax.random.normal(k1, (nb, bs, hkv, d), jnp.bfloat16)
    vc = jax.random.normal(k2, (nb, bs, hkv, d), jnp.bfloat16)
    q = jax.random.normal(k3, (T, hq, d), jnp.bfloat16)
    return q, kc, vc, jnp.asarray(positions), jnp.asarray(qsl), jnp.asarray(seq_lens), jnp.asarray(tables)


def run_mixed(args, results, *, S=256, ctx=512, T=2048, heads=((32, 32), (32, 8)), d=128, interpret=False):
    """A mixed step's attention (255 decodes at 512 keys + one prefill chunk filling a T-token
    step, T = 2048 the engine's default bucket): the ragged kernel alone vs single-token rows on
    the decode kernel, vs backend "mosaic"."""
    ragged_paged_attention = attention_router.ragged_paged_attention
    for hq, hkv in heads:
        inputs = make_mixed_inputs(S, ctx, T, hq, hkv, d)
        row = dict(kind="mixed", hq=hq, hkv=hkv, decodes=S - 1, ctx=ctx, prefill_tokens=T - (S - 1), tokens=T)
        outs = {}
        for split in (False, True):
            fn = jax.jit(lambda *x, split=split: ragged_paged_attention(
                *x, scale=d**-0.5, backend="pallas", split_decode_rows=split, interpret=interpret))
            outs[split] = fn(*inputs)
            t, _ = bench(fn, [inputs])
            row[f"split{int(split)}_ms"] = t * 1e3
        row["max_abs_diff"] = float(jnp.max(jnp.abs((outs[True] - outs[False]).astype(jnp.float32))))
        # The split route's parts, each alone on the same inputs: the decode rows on the decode
        # kernel, the prefill chunk on the Pallas ragged kernel and (on Hopper) on the Mosaic one.
        q, kc, vc, pos, qsl, sl, bt = inputs
        single = (qsl[1:] - qsl[:-1]) == 1
        first = jnp.minimum(qsl[:-1], T - 1)
        parts = {"decode_part": (jax.jit(lambda q, kc, vc, sl, bt: paged_attention_decode(q, kc, vc, sl, bt, scale=d**-0.5, interpret=interpret)),
                                 (q[first], kc, vc, jnp.where(single, sl, 0), bt)),
                 "pallas_prefill_part": (jax.jit(lambda *x: ragged_paged_attention_pallas(*x, scale=d**-0.5, interpret=interpret)),
                                         (q, kc, vc, pos, qsl, jnp.where(single, 0, sl), bt))}
        if not interpret:
            parts["mosaic_prefill_part"] = (
                jax.jit(lambda q, kc, vc, qsl, sl, bt: ragged_paged_attention_mosaic(q, kc, vc, qsl, sl, bt, scale=d**-0.5)[0]),
                (q, kc, vc, qsl, jnp.where(single, 0, sl), bt))
        for name, (fn, x) in parts.items():
            t, _ = bench(fn, [x])
            row[name + "_ms"] = t * 1e3
        if not interpret:  # backend "mosaic": decode rows on the decode kernel, the chunk on Mosaic GPU
            # Timed with the token threshold lowered to this step's size, so that the figure is the
            # Mosaic route's even below the threshold (the measurement that sets the threshold).
            threshold = attention_router.MOSAIC_MIN_TOKENS
            row["mosaic_min_tokens"] = threshold
            try:
                attention_router.MOSAIC_MIN_TOKENS = min(threshold, T)
                fn = jax.jit(lambda *x: ragged_paged_attention(*x, scale=d**-0.5, backend="mosaic"))
                out = fn(*inputs)
                t, _ = bench(fn, [inputs])
                row["mosaic_ms"] = t * 1e3
                row["mosaic_max_abs_diff"] = float(jnp.max(jnp.abs((out - outs[False]).astype(jnp.float32))))
            except Exception as e:  # noqa: BLE001
                row["mosaic_skipped"] = f"{type(e).__name__}: {str(e)[:300]}"
            finally:
                attention_router.MOSAIC_MIN_TOKENS = threshold
        results.append(row)
        print(json.dumps(row), flush=True)


def run_prefill(mm_rate, args, results, sweep):
    d, bs = 128, 16
    variants = [dict()]
    if sweep:
        # The default (flat [keys, D] gather, 128 keys a step) against the per-block gather, the
        # pipeline depth, 64 keys a step and register prefetch.
        variants = [dict(), dict(flat_gather=False), dict(num_stages=2), dict(blocks_per_iter=4), dict(prefetch=True)]
    for hq, hkv in [(32, 32), (32, 8)]:
        for T in ([4096] if args.quick else [1024, 2048, 4096, 8192]):
            mb = T // bs
            key = jax.random.key(T)
            k1, k2, k3 = jax.random.split(key, 3)
            nb = mb * 2
            kc = jax.random.normal(k1, (nb, bs, hkv, d), jnp.bfloat16)
            vc = jax.random.normal(k2, (nb, bs, hkv, d), jnp.bfloat16)
            q = jax.random.normal(k3, (T, hq, d), jnp.bfloat16)
            perm = np.random.default_rng(1).permutation(nb).astype(np.int32).reshape(2, 1, mb)
            tables = [jnp.asarray(p) for p in perm]
            pos = jnp.arange(T, dtype=jnp.int32)
            qsl = jnp.asarray([0, T], jnp.int32)
            sl = jnp.asarray([T], jnp.int32)
            flops = 4 * d * hq * T * (T + 1) / 2
            row = dict(kind="prefill", tokens=T, hq=hq, hkv=hkv, d=d, block_size=bs, flops=flops)
            for v in (variants if (sweep and T == 4096) else [dict()]):
                fn = jax.jit(lambda q, kc, vc, pos, qsl, sl, bt, v=v: ragged_paged_attention_pallas(
                    q, kc, vc, pos, qsl, sl, bt, scale=d**-0.5, **v))
                t, _ = bench(fn, [(q, kc, vc, pos, qsl, sl, bt) for bt in tables])
                name = variant_name("pallas", v)
                row[name + "_ms"] = t * 1e3
                row[name + "_TFLOPs"] = flops / t / 1e12
                row[name + "_frac_mm"] = flops / t / mm_rate
            # The Mosaic GPU (warp-specialised, TMA per block) kernel on the same paged data.
            mosaic_variants = [dict()]
            if sweep and T == 4096:
                mosaic_variants += [dict(block_kv=64), dict(block_kv=64, num_stages=3), dict(num_stages=3)]
            for v in mosaic_variants:
                name = variant_name("mosaic", v)
                try:
                    mfn = jax.jit(lambda q, kc, vc, qsl, sl, bt, v=v: ragged_paged_attention_mosaic(
                        q, kc, vc, qsl, sl, bt, scale=d**-0.5, **v)[0])
                    mout = mfn(q, kc, vc, qsl, sl, tables[0])
                    pout = ragged_paged_attention_pallas(q, kc, vc, pos, qsl, sl, tables[0], scale=d**-0.5)
                    row[name + "_rel_diff"] = float(jnp.linalg.norm((mout - pout).astype(jnp.float32))
                                                    / jnp.linalg.norm(pout.astype(jnp.float32)))
                    t, _ = bench(mfn, [(q, kc, vc, qsl, sl, bt) for bt in tables])
                    row[name + "_ms"] = t * 1e3
                    row[name + "_TFLOPs"] = flops / t / 1e12
                    row[name + "_frac_mm"] = flops / t / mm_rate
                except Exception as e:  # noqa: BLE001
                    row[name + "_skipped"] = f"{type(e).__name__}: {str(e)[:400]}"
            if sweep and T == 4096:
                # What paging costs the Mosaic kernel: the same kernel over blocks of 64 keys (2 TMA
                # copies a 128-key step instead of 8), shuffled, and over blocks of 16 in order.
                for v in (dict(block_size=64), dict(block_size=16, in_order=True)):
                    name = variant_name("mosaic", v)
                    try:
                        vbs = v["block_size"]
                        vnb = nb * bs // vbs
                        kv = [x.reshape(vnb, vbs, hkv, d) for x in (kc, vc)]  # the same bytes, other blocks
                        order = np.arange(vnb) if v.get("in_order") else np.random.default_rng(2).permutation(vnb)
                        vtables = [jnp.asarray(order[i * (vnb // 2):(i + 1) * (vnb // 2)].astype(np.int32)[None])
                                   for i in range(2)]
                        mfn = jax.jit(lambda q, kc, vc, qsl, sl, bt: ragged_paged_attention_mosaic(
                            q, kc, vc, qsl, sl, bt, scale=d**-0.5)[0])
                        t, _ = bench(mfn, [(q, *kv, qsl, sl, bt) for bt in vtables])
                        row[name + "_ms"] = t * 1e3
                        row[name + "_TFLOPs"] = flops / t / 1e12
                    except Exception as e:  # noqa: BLE001
                        row[name + "_skipped"] = f"{type(e).__name__}: {str(e)[:400]}"
            # Reference point: cuDNN flash attention on contiguous (unpaged) K/V, same data volume.
            try:
                kk = jax.random.normal(k1, (1, T, hkv, d), jnp.bfloat16)
                vv = jax.random.normal(k2, (1, T, hkv, d), jnp.bfloat16)
                cfn = jax.jit(lambda q, kk, vv: jax.nn.dot_product_attention(
                    q[None], kk, vv, is_causal=True, implementation="cudnn"))
                t, _ = bench(cfn, [(q, kk, vv)])
                row["cudnn_contiguous_ms"] = t * 1e3
                row["cudnn_contiguous_TFLOPs"] = flops / t / 1e12
            except Exception as e:  # noqa: BLE001
                row["cudnn_skipped"] = f"{type(e).__name__}: {str(e)[:200]}"
            # Second reference point: JAX's own FlashAttention-3 in Mosaic GPU (warp-specialised,
            # TMA + wgmma), contiguous K/V; its scratch buffers are float16, so it runs in float16.
            for block_kv in (128, 64):
                try:
                    from jax.experimental.pallas.ops.gpu import attention_mgpu as fa3

                    cfg = fa3.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=True)
                    q16, k16, v16 = (x.astype(jnp.float16) for x in (q[None], kk, vv))
                    ffn = jax.jit(lambda q, k, v, cfg=cfg: fa3.attention(q, k, v, cfg))
                    t, _ = bench(ffn, [(q16, k16, v16)])
                    row[f"fa3_mgpu_contiguous_kv{block_kv}_ms"] = t * 1e3
                    row[f"fa3_mgpu_contiguous_kv{block_kv}_TFLOPs"] = flops / t / 1e12
                except Exception as e:  # noqa: BLE001
                    row[f"fa3_mgpu_kv{block_kv}_skipped"] = f"{type(e).__name__}: {str(e)[:300]}"
            results.append(row)
            print(json.dumps(row), flush=True)


def run_kv_write(copy_bw, results):
    nb, bs, hkv, d = 16384, 16, 8, 128
    for T in (256, 4096):
        kc = jax.random.normal(jax.random.key(0), (nb, bs, hkv, d), jnp.bfloat16)
        vc = jax.random.normal(jax.random.key(1), (nb, bs, hkv, d), jnp.bfloat16)
        k = jax.random.normal(jax.random.key(2), (T, hkv, d), jnp.bfloat16)
        slots = jnp.asarray(np.random.default_rng(0).permutation(nb * bs)[:T].astype(np.int32))
        row = dict(kind="kv_write", tokens=T, hkv=hkv, d=d, block_size=bs, bytes=4 * k.nbytes)
        for backend in ("reference", "pallas"):
            fn = jax.jit(lambda kc, vc, k, s, b=backend: write_kv(kc, vc, k, k, s, backend=b), donate_argnums=(0, 1))
            mem = fn.lower(kc, vc, k, slots).compile().memory_analysis()
            state = [kc, vc]

            def call(state=state, fn=fn):
                state[0], state[1] = fn(state[0], state[1], k, slots)
                return state[0]

            t, _ = bench(call, [()])
            row[backend + "_us"] = t * 1e6
            row[backend + "_temp_MiB"] = mem.temp_size_in_bytes / 2**20 if mem else None
            row[backend + "_alias_MiB"] = mem.alias_size_in_bytes / 2**20 if mem else None
            kc, vc = state
        row["cache_MiB"] = kc.nbytes / 2**20
        results.append(row)
        print(json.dumps(row), flush=True)


def _cache_dtypes(results) -> str:
    names = {r.get("kv_cache_dtype", "auto") for r in results if r["kind"] == "decode"}
    return "/".join(sorted("bf16" if n == "auto" else n for n in names)) or "bf16"


def table(results, copy_bw, mm_rate):
    lines = [f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (read+write), read-only {CEILINGS.get('read_sum', 0) / 1e12:.2f} TB/s, "
             f"bf16 matmul {mm_rate / 1e12:.0f} TFLOP/s",
             f"decode (bf16 queries, {_cache_dtypes(results)} cache, D=128, bs=16): batch ctx heads | ours ms TB/s %copy "
             "| jax ms TB/s | speedup"]
    ablations = [a for a in ("triton", "mosaic")
                 if any(f"{a}_ms" in r or f"{a}_skipped" in r for r in results if r["kind"] == "decode")]
    if ablations:
        lines[-1] += "".join(f" | {a} ms TB/s" for a in ablations)
    for r in results:
        if r["kind"] == "decode":
            lines.append(
                f"  {r['batch']:>4} {r['ctx']:>5} {r['hq']}:{r['hkv']:<3}| {r['pallas_ms']:8.3f} {r['pallas_TBps']:5.2f} "
                f"{100 * r['pallas_frac_copy']:5.1f}% | " + (
                    f"{r['jax_ms']:8.3f} {r['jax_TBps']:5.2f} | {r['speedup_vs_jax']:5.2f}x" if "jax_ms" in r else "jax skipped")
                + "".join(f" | {r[a + '_ms']:8.3f} {r[a + '_TBps']:5.2f}" if f"{a}_ms" in r else " | failed"
                          for a in ablations)
            )
    lines.append("prefill (one causal sequence, bf16, D=128, bs=16): tokens heads | pallas ms TFLOP/s %mm | "
                 "mosaic ms TFLOP/s %mm | contiguous TFLOP/s: cudnn, jax fa3")
    for r in results:
        if r["kind"] == "prefill":
            mos = (f"{r['mosaic_ms']:8.3f} {r['mosaic_TFLOPs']:6.1f} {100 * r['mosaic_frac_mm']:5.1f}%"
                   if "mosaic_ms" in r else "  mosaic skipped")
            lines.append(
                f"  {r['tokens']:>5} {r['hq']}:{r['hkv']:<3}| {r['pallas_ms']:8.3f} {r['pallas_TFLOPs']:6.1f} "
                f"{100 * r['pallas_frac_mm']:5.1f}% | {mos} | "
                + " ".join(f"{r[k]:6.1f}" if k in r else "  -   " for k in ("cudnn_contiguous_TFLOPs",
                                                                        "fa3_mgpu_contiguous_kv128_TFLOPs"))
            )
    for r in results:
        if r["kind"] == "kv_write":
            lines.append(f"kv write T={r['tokens']}: xla scatter {r['reference_us']:.1f} us, pallas {r['pallas_us']:.1f} us, "
                         f"temp MiB {r['reference_temp_MiB']} / {r['pallas_temp_MiB']} (cache {r['cache_MiB']:.0f} MiB each)")
    for r in results:
        if r["kind"] == "mixed":
            lines.append(f"mixed step {r['hq']}:{r['hkv']} ({r['decodes']} decodes x {r['ctx']} + {r['prefill_tokens']}-token "
                         f"prefill): ragged only {r['split0_ms']:.3f} ms, decode rows split off {r['split1_ms']:.3f} ms, "
                         + (f"mosaic {r['mosaic_ms']:.3f} ms" if "mosaic_ms" in r else "mosaic skipped")
                         + "; parts alone: " + ", ".join(f"{k[:-3]} {r[k]:.3f}" for k in r if k.endswith("_part_ms")))
    sweeps = [(r, k) for r in results for k in r if k.startswith(("pallas[", "mosaic[")) and k.endswith("_ms")]
    if sweeps:
        lines.append("sweep (ms):")
        for r, k in sweeps:
            tag = f"decode b{r['batch']} {r['hq']}:{r['hkv']}" if r["kind"] == "decode" else f"prefill {r['tokens']} {r['hq']}:{r['hkv']}"
            base = k.split("[")[0] + "_ms"
            lines.append(f"  {tag} {k[:-3]} {r[k]:.3f} (default {r.get(base, float('nan')):.3f})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--sweep", action="store_true", help="also time tuning variants at key shapes")
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--sweep-all", action="store_true", help="with --sweep: decode variants at every shape, not only 64 x 2048")
    p.add_argument("--only", default="decode,prefill,kv_write")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="decode: the cache in bf16 (auto) or fp8 (the kernel dequantizes in registers); "
                        "bytes and TB/s count the cache at its own width")
    p.add_argument("--ablations", default="", help="also time these decode kernels: triton (needs jax-triton), mosaic")
    args = p.parse_args()
    args.ablations = [a for a in args.ablations.split(",") if a]
    warnings.simplefilter("ignore")
    print(jax.devices(), jax.__version__, flush=True)
    copy_bw, mm_rate = measure_ceilings()
    print(f"copy {copy_bw / 1e12:.3f} TB/s, matmul {mm_rate / 1e12:.1f} TFLOP/s", flush=True)
    results = []
    only = args.only.split(",")
    t0 = time.time()
    if "kv_write" in only:
        run_kv_write(copy_bw, results)
    if "prefill" in only:
        run_prefill(mm_rate, args, results, args.sweep)
    if "decode" in only:
        run_decode(copy_bw, args, results, args.sweep)
    if "mixed" in only:
        for tokens in (2048, 4096):
            run_mixed(args, results, T=tokens)
    if "decode_variants" in only:
        run_decode_variants(copy_bw, args, results)
    txt = table(results, copy_bw, mm_rate)
    try:
        from jax._src.lib import cuda_versions

        cuda_runtime = cuda_versions.cuda_runtime_get_version() if cuda_versions else None
    except Exception:  # noqa: BLE001
        cuda_runtime = None
    meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, argv=sys.argv, cuda_runtime=cuda_runtime,
                copy_TBps=copy_bw / 1e12, matmul_TFLOPs=mm_rate / 1e12, seconds=time.time() - t0,
                bandwidths_TBps={k: v / 1e12 for k, v in CEILINGS.items()})
    with open(os.path.join(args.out, "kernels.json"), "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    with open(os.path.join(args.out, "kernels.md"), "w") as f:
        f.write("```\n" + txt + "\n```\n")
    print(txt)


if __name__ == "__main__":
    main()
