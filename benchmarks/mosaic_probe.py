"""H200 probe for the Mosaic GPU decode kernel: correctness vs the reference, time, KV bandwidth.

JAX_PLATFORMS=cuda PYTHONPATH=. python3 benchmarks/mosaic_probe.py $OUT/mosaic.json [budget_s]

Compares the Mosaic kernel's knobs with each other (and with the shipped Pallas kernel, variant
"triton" = Pallas' Triton lowering). Each timing is one host-dispatched call followed by a sync, so
the absolute times carry ~0.1-0.3 ms of dispatch; the like-for-like comparison with JAX's kernel is
``benchmarks/kernels.py --ablations triton,mosaic``.
"""

from __future__ import annotations

import json
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.paged_attention_decode import paged_attention_decode, paged_attention_decode_reference
from pallas_kernels.paged_attention_decode_mosaic import paged_attention_decode_mosaic

OUT = sys.argv[1] if len(sys.argv) > 1 else "mosaic.json"
BUDGET_S = float(sys.argv[2]) if len(sys.argv) > 2 else 140.0
T0 = time.time()
BS, D, DT = 16, 128, jnp.bfloat16

# (name, S, context length, Hq, Hkv)
SHAPES = [
    ("64x2048_mha", 64, 2048, 32, 32),
    ("64x2048_gqa", 64, 2048, 32, 8),
    ("256x512_mha", 256, 512, 32, 32),
    ("8x8192_gqa", 8, 8192, 32, 8),
]
# (variant name, kwargs); "triton" is the existing kernel, for comparison.
VARIANTS = [
    ("mosaic_k64_s3", dict(keys_per_step=64, num_stages=3)),
    ("mosaic_k64_s4", dict(keys_per_step=64, num_stages=4)),
    ("mosaic_k64_s2", dict(keys_per_step=64, num_stages=2)),
    ("mosaic_k128_s2", dict(keys_per_step=128, num_stages=2)),
    ("mosaic_k128_s3", dict(keys_per_step=128, num_stages=3)),
    ("mosaic_k64_s3_psmem", dict(keys_per_step=64, num_stages=3, p_in_smem=True)),
    ("mosaic_k64_s3_nosplit", dict(keys_per_step=64, num_stages=3, num_splits=1)),
    ("triton", None),
]


def make_case(S, L, hq, hkv, seed=0):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    mb = -(-L // BS)
    nb = S * mb + 4
    kc = jax.random.normal(k1, (nb, BS, hkv, D), DT)
    vc = jax.random.normal(k2, (nb, BS, hkv, D), DT)
    q = jax.random.normal(k3, (S, hq, D), DT)
    bt = jax.random.permutation(k4, nb)[: S * mb].reshape(S, mb).astype(jnp.int32)
    sl = jnp.full((S,), L, jnp.int32)
    return q, kc, vc, sl, bt


def timed(fn, args, reps=15):
    out = fn(*args)
    out.block_until_ready()
    for _ in range(2):
        fn(*args).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(*args).block_until_ready()
        ts.append(time.perf_counter() - t)
    return out, float(np.median(ts))


def main():
    print(jax.__version__, jax.devices(), flush=True)
    results = []
    for name, S, L, hq, hkv in SHAPES:
        if time.time() - T0 > BUDGET_S:  # not even the case and reference once over budget
            results.append(dict(shape=name, error="skipped: time budget"))
            continue
        try:
            args = make_case(S, L, hq, hkv)
            scale = D ** -0.5
            ref = jax.jit(lambda *a: paged_attention_decode_reference(*a, scale=scale))(*args).astype(jnp.float32)
            ref_max = float(jnp.max(jnp.abs(ref)))
        except Exception:
            results.append(dict(shape=name, error=traceback.format_exc()[-3000:]))
            print(name, "reference failed", flush=True)
            continue
        nbytes = S * L * hkv * D * 2 * 2 + 2 * S * hq * D * 2
        for vname, kw in VARIANTS:
            if time.time() - T0 > BUDGET_S:
                results.append(dict(shape=name, variant=vname, error="skipped: time budget"))
                continue
            rec = dict(shape=name, variant=vname, S=S, L=L, hq=hq, hkv=hkv, D=D, block_size=BS, kwargs=kw)
            try:
                if kw is None:
                    fn = jax.jit(lambda *a: paged_attention_decode(*a, scale=scale))
                else:
                    fn = jax.jit(lambda *a, kw=kw: paged_attention_decode_mosaic(*a, scale=scale, **kw))
                t = time.time()
                out, sec = timed(fn, args)
                err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) / ref_max
                rec.update(
                    max_rel_err=err, has_nan=bool(jnp.isnan(out.astype(jnp.float32)).any()),
                    median_us=sec * 1e6, gbps=nbytes / sec / 1e9, bytes=nbytes, wall_s=time.time() - t,
                )
                print(f"{name:12s} {vname:24s} err={err:.2e} {sec * 1e6:9.1f} us {nbytes / sec / 1e9:7.1f} GB/s", flush=True)
            except Exception:
                rec["error"] = traceback.format_exc()[-3000:]
                print(f"{name:12s} {vname:24s} FAILED: {rec['error'][-300:]}", flush=True)
            results.append(rec)
        del args, ref
        with open(OUT, "w") as f:
            json.dump(dict(jax=jax.__version__, results=results), f, indent=1)
    with open(OUT, "w") as f:
        json.dump(dict(jax=jax.__version__, results=results, total_s=time.time() - T0), f, indent=1)
    print("total", time.time() - T0, flush=True)


if __name__ == "__main__":
    main()
