"""Writing new keys/values into their slots of the paged KV cache.

Cache layout (per layer): ``[num_blocks, block_size, num_kv_heads, head_dim]``; slot
``b * block_size + i`` is row i of block b. Slots < 0 mark padding tokens and are dropped.
"""

from __future__ import annotations

import jax.numpy as jnp


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
    # An out-of-range index is dropped by mode="drop"; negative ones would wrap, so remap them.
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)
    kc = k_cache.reshape(num_slots, h, d).at[slots].set(k.astype(k_cache.dtype), mode="drop")
    vc = v_cache.reshape(num_slots, h, d).at[slots].set(v.astype(v_cache.dtype), mode="drop")
    return kc.reshape(nb, bs, h, d), vc.reshape(nb, bs, h, d)


def write_kv(
    k_cache: jnp.ndarray,
    v_cache: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    slot_mapping: jnp.ndarray,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Public entry point: validates shapes, then writes (XLA scatter, in place when donated)."""
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {k_cache.shape} / v_cache {v_cache.shape}: expected equal 4-D shapes")
    if k.shape != v.shape or k.ndim != 3 or k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"k {k.shape} / v {v.shape}: expected [T, {k_cache.shape[2]}, {k_cache.shape[3]}]"
        )
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping {slot_mapping.shape}: expected ({k.shape[0]},)")
    return write_kv_reference(k_cache, v_cache, k, v, slot_mapping)
