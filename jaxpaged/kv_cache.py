"""The device KV pool (one ``(k, v)`` pair per layer) and its host-side swap pool, with the
block-level operations the scheduler asks for: copy (copy-on-write), swap out, swap in.

Every operation is a jit-compiled function of padded block-index arrays (padded to a power of two,
padding indices point past the pool and are dropped), so a fixed set of programs serves any
request mix; the device pool is donated and updated in place.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.buckets import geometric_range
from pallas_kernels.sizes import next_pow2

KVCaches = list[tuple[jax.Array, jax.Array]]


@functools.partial(jax.jit, donate_argnums=(0,))
def _copy_blocks(caches: KVCaches, src: jax.Array, dst: jax.Array) -> KVCaches:
    return [(k.at[dst].set(k[src], mode="drop"), v.at[dst].set(v[src], mode="drop")) for k, v in caches]


@jax.jit
def _gather_blocks(caches: KVCaches, idx: jax.Array) -> jax.Array:
    # [layers, 2, n, block_size, heads, head_dim]
    return jnp.stack([jnp.stack([k[idx], v[idx]]) for k, v in caches])


@functools.partial(jax.jit, donate_argnums=(0,))
def _scatter_blocks(caches: KVCaches, idx: jax.Array, data: jax.Array) -> KVCaches:
    return [
        (k.at[idx].set(data[i, 0].astype(k.dtype), mode="drop"), v.at[idx].set(data[i, 1].astype(v.dtype), mode="drop"))
        for i, (k, v) in enumerate(caches)
    ]


class KVCache:
    """Owns the device pool and the host swap pool; ``caches`` is replaced after every donation."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        num_host_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: Any,
        on_trace: Callable[[], None] | None = None,
    ):
        self.num_blocks = num_blocks
        self.num_host_blocks = num_host_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.caches: KVCaches = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers)]
        host_shape = (num_layers, 2, num_host_blocks, block_size, num_kv_heads, head_dim)
        self.host = np.zeros(host_shape, dtype=np.dtype(dtype)) if num_host_blocks else None

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: Any) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * np.dtype(dtype).itemsize

    def _pad(self, idx: list[int], fill: int) -> np.ndarray:
        out = np.full(next_pow2(len(idx)), fill, np.int32)
        out[: len(idx)] = idx
        return out

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        """Copies device blocks src → dst (copy-on-write)."""
        if not pairs:
            return
        src = self._pad([s for s, _ in pairs], 0)
        dst = self._pad([d for _, d in pairs], self.num_blocks)  # past the pool: dropped
        self.caches = _copy_blocks(self.caches, src, dst)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copies device blocks to host blocks: (device block, host block) pairs."""
        if not pairs:
            return
        idx = self._pad([d for d, _ in pairs], 0)
        data = np.asarray(_gather_blocks(self.caches, idx))
        self.host[:, :, [h for _, h in pairs]] = data[:, :, : len(pairs)]

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copies host blocks back to device blocks: (host block, device block) pairs."""
        if not pairs:
            return
        n = next_pow2(len(pairs))
        data = np.zeros(self.host.shape[:2] + (n,) + self.host.shape[3:], self.host.dtype)
        data[:, :, : len(pairs)] = self.host[:, :, [h for h, _ in pairs]]
        idx = self._pad([d for _, d in pairs], self.num_blocks)
        self.caches = _scatter_blocks(self.caches, idx, data)

    def warm_up(self, max_pairs: int) -> None:
        """Compiles the block programs for every padded size up to ``max_pairs``."""
        for n in geometric_range(1, next_pow2(max_pairs)):
            # Destinations past the pool: the programs compile and run, nothing changes.
            # NumPy inputs, as in serving: a jnp.asarray would compile a staging program per shape.
            src = self._pad([0] * n, 0)
            dst = self._pad([self.num_blocks] * n, self.num_blocks)
            self.caches = _copy_blocks(self.caches, src, dst)
            if self.host is not None:
                data = np.asarray(_gather_blocks(self.caches, src))
                self.caches = _scatter_blocks(self.caches, dst, data)
