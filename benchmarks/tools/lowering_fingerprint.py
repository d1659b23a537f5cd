"""Fingerprints of the attention kernels' GPU programs, computed on a machine without a GPU.

Each configuration (backend, shapes, dtype, features, decode-kernel knobs) is lowered for CUDA
(``jit(...).trace(...).lower(lowering_platforms=("cuda",))``, Hopper as the target) and hashed: the
StableHLO around the kernels plus each kernel's Triton or Mosaic GPU module printed without source
locations (the serialized kernels embed file names and line numbers, which a refactor moves). Two
checkouts that print the same fingerprints compile to the same GPU programs, so a refactor that
keeps them keeps every figure in benchmarks/RESULTS.md:

    PYTHONPATH=. python benchmarks/tools/lowering_fingerprint.py --out /tmp/after.txt
    (cd /other/checkout && PYTHONPATH=. python /path/to/lowering_fingerprint.py --out /tmp/before.txt)
    diff /tmp/before.txt /tmp/after.txt

It reaches into JAX's private lowering modules (jax 0.11) to capture the kernels' modules before
they are serialized, and pretends the device is an H200; it runs nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import re

import jax
import jax.numpy as jnp
from jax._src.pallas.mosaic_gpu import pallas_call_registration as mosaic_registration
from jax._src.pallas.triton import gpu_info
from jax._src.pallas.triton import pallas_call_registration as triton_registration

KERNELS: list[str] = []


def _capture_kernel_modules() -> None:
    """Records every Triton / Mosaic GPU kernel module lowered from now on (locations stripped)."""
    gpu_info.get_gpu_info = lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200)
    lower_triton = triton_registration.lowering.lower_jaxpr_to_triton_module

    def triton(*args, **kwargs):
        result = lower_triton(*args, **kwargs)
        KERNELS.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    triton_registration.lowering.lower_jaxpr_to_triton_module = triton
    emit_mosaic = mosaic_registration._emit_mosaic_gpu_custom_call

    def mosaic(ctx, args, lowering_result, *rest, **kwargs):
        KERNELS.append(lowering_result.module.operation.get_asm(enable_debug_info=False))
        return emit_mosaic(ctx, args, lowering_result, *rest, **kwargs)

    mosaic_registration._emit_mosaic_gpu_custom_call = mosaic


def fingerprint(fn, *args) -> str:
    KERNELS.clear()
    jax.clear_caches()
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    text = re.sub(r'ir = "[^"]*"', 'ir = ""', text)  # serialized Triton kernels (captured above)
    text = re.sub(r'"[^"]{2000,}"', '""', text)  # serialized Mosaic GPU kernels (captured above)
    text = re.sub(r'kernel_hash = "[^"]*"', 'kernel_hash = ""', text)
    text = "\n".join([text, *KERNELS])
    text = re.sub(r"loc\([^()]*(\([^()]*\))*[^()]*\)", "loc()", text)
    text = re.sub(r"#loc[0-9]* = .*\n", "", text)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def configurations():
    """(name, function, abstract arguments) for the router on every backend and the decode kernel."""
    try:
        from pallas_kernels.attention_router import ragged_paged_attention
    except ImportError:  # a checkout from before the router had its own module
        from pallas_kernels.ragged_paged_attention import ragged_paged_attention
    from pallas_kernels.paged_attention_decode import paged_attention_decode

    def sds(*shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype)

    def i32(*shape):
        return sds(*shape, dtype=jnp.int32)

    num_blocks, block_size, max_blocks = 64, 16, 8
    for hq, hkv, d, dtype in ((8, 2, 128, jnp.bfloat16), (4, 4, 64, jnp.float32), (8, 1, 80, jnp.float16)):
        for S, T in ((4, 4), (4, 64), (16, 256)):
            q, cache = sds(T, hq, d, dtype=dtype), sds(num_blocks, block_size, hkv, d, dtype=dtype)
            step = [q, cache, cache, i32(T), i32(S + 1), i32(S), i32(S, max_blocks)]
            for backend in ("reference", "pallas", "mosaic"):
                for decode_only in (False, True) if S == T else (False,):
                    for feature in ("none", "sliding_window", "alibi", "soft_cap"):
                        kw = dict(scale=0.125, backend=backend, decode_only=decode_only)
                        kw.update({"sliding_window": dict(sliding_window=7), "soft_cap": dict(logits_soft_cap=30.0)}.get(feature, {}))
                        args = step + ([sds(hq, dtype=jnp.float32)] if feature == "alibi" else [])

                        def fn(*a, kw=kw, alibi=feature == "alibi"):
                            return ragged_paged_attention(*a[:7], alibi_slopes=a[7] if alibi else None, **kw)

                        name = f"router {backend} {hq}x{hkv}x{d} {jnp.dtype(dtype).name} S{S} T{T} decode_only={decode_only} {feature}"
                        yield name, fn, args
            if S == T:
                for knobs in (dict(), dict(num_splits=1), dict(num_splits=5), dict(blocks_per_iter=2),
                              dict(num_warps=8, num_stages=2)):
                    def fn(q, k, v, sl, bt, knobs=knobs):
                        return paged_attention_decode(q, k, v, sl, bt, scale=0.125, **knobs)

                    yield f"decode {hq}x{hkv}x{d} {jnp.dtype(dtype).name} S{S} {knobs}", fn, [q, cache, cache, i32(S), i32(S, max_blocks)]
    for hq, hkv in ((8, 8), (8, 2)):  # a step large enough for the Mosaic route
        T, S = 4096, 16
        q, cache = sds(T, hq, 128), sds(1024, 16, hkv, 128)

        def fn(*a):
            return ragged_paged_attention(*a, scale=0.125, backend="mosaic")

        yield f"router mosaic {hq}x{hkv}x128 T{T}", fn, [q, cache, cache, i32(T), i32(S + 1), i32(S), i32(S, 300)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="file for one 'configuration fingerprint' line each")
    args = p.parse_args()
    _capture_kernel_modules()
    lines = []
    for name, fn, fn_args in configurations():
        try:
            lines.append(f"{name} {fingerprint(fn, *fn_args)}")
        except Exception as e:  # noqa: BLE001 - a configuration that cannot lower is a fingerprint too
            lines.append(f"{name} error {type(e).__name__}: {str(e)[:120]}")
    with open(args.out, "w") as fh:
        fh.write("\n".join(sorted(lines)) + "\n")
    print(f"{len(lines)} configurations, {sum(' error ' in x for x in lines)} errors -> {args.out}")


if __name__ == "__main__":
    main()
