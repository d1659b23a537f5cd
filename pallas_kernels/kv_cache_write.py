"""Writing new keys/values into their slots of the paged KV cache.

Cache layout (per layer): ``[num_blocks, block_size, num_kv_heads, head_dim]``; slot
``b * block_size + i`` is row i of block b. Slots < 0 mark padding tokens and are dropped.

An fp8 cache (``kv_cache_dtype="fp8"``) stores the values saturated to the format's range
(``to_cache_dtype``). Two implementations: XLA's scatter (``backend="reference"``; in place when the caches are donated
into the jitted step) and a Pallas kernel (``backend="pallas"``: one program per token, masked
stores into the caches aliased to the outputs with ``input_output_aliases``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.sizes import next_pow2

KV_WRITE_BACKENDS = ("reference", "pallas")


def to_cache_dtype(x: jnp.ndarray, dtype) -> jnp.ndarray:
    """``x`` in the cache's dtype; into an fp8 cache with saturation (scale 1.0, as vLLM without
    calibrated scales): a plain cast would turn values past the format's range into NaN."""
    dtype = jnp.dtype(dtype)
    if dtype.itemsize == 1 and jnp.issubdtype(dtype, jnp.floating):
        big = float(jnp.finfo(dtype).max)
        x = jnp.clip(x.astype(jnp.float32), -big, big)
    return x.astype(dtype)


def write_kv_reference(
    k_cache: jnp.ndarray,
    v_cache: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    slot_mapping: jnp.ndarray,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Scatters k, v [T, num_kv_heads, head_dim] into the caches at ``slot_mapping`` [T].

    Under jit with the caches donated, XLA performs the scatter in place.
    """
    nb, bs, h, d = k_cache.shape
    num_slots = nb * bs
    k, v = to_cache_dtype(k, k_cache.dtype), to_cache_dtype(v, v_cache.dtype)
    # An out-of-range index is dropped by mode="drop"; negative ones would wrap, so remap them.
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)
    kc = k_cache.reshape(num_slots, h, d).at[slots].set(k, mode="drop")
    vc = v_cache.reshape(num_slots, h, d).at[slots].set(v, mode="drop")
    return kc.reshape(nb, bs, h, d), vc.reshape(nb, bs, h, d)


def _write_kv_kernel(slot_ref, k_ref, v_ref, kc_in, vc_in, kc_ref, vc_ref, *, block_size: int):
    del kc_in, vc_in  # aliased to kc_ref / vc_ref
    t = pl.program_id(0)
    slot = slot_ref[t]
    blk = jnp.maximum(slot, 0) // block_size
    off = jnp.maximum(slot, 0) % block_size
    _, _, hkv, d = kc_ref.shape
    hp, dp = next_pow2(hkv), next_pow2(d)
    hh = jax.lax.broadcasted_iota(jnp.int32, (hp, dp), 0)
    dd = jax.lax.broadcasted_iota(jnp.int32, (hp, dp), 1)
    mask = (hh < hkv) & (dd < d) & (slot >= 0)
    tt = jnp.full((hp, dp), t, jnp.int32)
    for src, dst in ((k_ref, kc_ref), (v_ref, vc_ref)):
        x = plgpu.load(src.at[tt, hh, dd], mask=mask, other=0)
        plgpu.store(dst.at[blk, off, hh, dd], to_cache_dtype(x, dst.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("interpret",))
def write_kv_pallas(
    k_cache: jnp.ndarray,
    v_cache: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    slot_mapping: jnp.ndarray,
    *,
    interpret: bool = False,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Pallas KV write: the caches are aliased to the outputs (in place when donated)."""
    T = k.shape[0]
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)  # noqa: E731
    args = (slot_mapping.astype(jnp.int32), k, v, k_cache, v_cache)
    return pl.pallas_call(
        functools.partial(_write_kv_kernel, block_size=k_cache.shape[1]),
        grid=(T,),
        in_specs=[whole(a) for a in args],
        out_specs=[whole(k_cache), whole(v_cache)],
        out_shape=[jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype)] * 2,
        input_output_aliases={3: 0, 4: 1},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="write_kv",
    )(*args)


def write_kv(
    k_cache: jnp.ndarray,
    v_cache: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    slot_mapping: jnp.ndarray,
    *,
    backend: str = "reference",
    interpret: bool = False,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Public entry point: validates shapes, then writes (in place when the caches are donated).

    ``backend``: "reference" (XLA scatter) or "pallas" (the kernel above).
    """
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {k_cache.shape} / v_cache {v_cache.shape}: expected equal 4-D shapes")
    if k.shape != v.shape or k.ndim != 3 or k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"k {k.shape} / v {v.shape}: expected [T, {k_cache.shape[2]}, {k_cache.shape[3]}]"
        )
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping {slot_mapping.shape}: expected ({k.shape[0]},)")
    if backend not in KV_WRITE_BACKENDS:
        raise ValueError(f"kv write backend {backend!r}; allowed: {', '.join(map(repr, KV_WRITE_BACKENDS))}")
    if backend == "pallas":
        return write_kv_pallas(k_cache, v_cache, k, v, slot_mapping, interpret=interpret)
    return write_kv_reference(k_cache, v_cache, k, v, slot_mapping)
