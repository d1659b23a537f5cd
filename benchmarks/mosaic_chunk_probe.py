"""The Mosaic prefill kernel's call on one prefill chunk, four ways, on the GPU: within a mixed
step of 256 sequences (the other 255 given no keys), the same with ``max_seqs=1``, the chunk
alone as a one-sequence call over the same cache, and alone over a compact cache of its blocks.
Found (fifth session, RESULTS.md) that the call's cost depended on the step's sequence count, not
on the cache; the cause, jnp.searchsorted's while loop over ``query_start_loc``, was confirmed by
the mixed-step benchmark after the change (the chunk's Mosaic call 0.53 -> 0.18 ms).

    JAX_PLATFORMS=cuda PYTHONPATH=. python3 benchmarks/mosaic_chunk_probe.py
"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.kernels import bench, make_mixed_inputs  # noqa: E402
from pallas_kernels.ragged_paged_attention_mosaic import ragged_paged_attention_mosaic as M  # noqa: E402

d = 128
for T, hq, hkv in ((2048, 32, 8), (4096, 32, 32)):
    q, kc, vc, pos, qsl, sl, bt = make_mixed_inputs(256, 512, T, hq, hkv, d)
    single = (qsl[1:] - qsl[:-1]) == 1
    slz = jnp.where(single, 0, sl)
    f = jax.jit(lambda q, kc, vc, qsl, sl, bt, ms=None: M(q, kc, vc, qsl, sl, bt, scale=d**-0.5, max_seqs=ms)[0], static_argnames="ms")
    res = {}
    res["all_seqs"] = bench(f, [(q, kc, vc, qsl, slz, bt)])[0]
    res["max_seqs1"] = bench(lambda *a: f(*a, ms=1), [(q, kc, vc, qsl, slz, bt)])[0]
    a0 = 248
    q1 = q[a0:]
    qsl1 = jnp.asarray([255 - a0, T - a0], jnp.int32)
    res["one_seq_same_cache"] = bench(f, [(q1, kc, vc, qsl1, sl[-1:], bt[-1:])])[0]
    # same chunk, compact cache holding only its blocks
    nblk = bt.shape[1]
    kc1, vc1 = kc[bt[-1]], vc[bt[-1]]
    res["one_seq_compact_cache"] = bench(f, [(q1, kc1, vc1, qsl1, sl[-1:], jnp.arange(nblk, dtype=jnp.int32)[None])])[0]
    print(T, hq, hkv, {k: round(v * 1e3, 3) for k, v in res.items()}, flush=True)
