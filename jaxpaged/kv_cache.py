"""The device KV pool (one ``(k, v)`` pair per layer) and its host-side swap pool, with the
block-level operations the scheduler asks for: copy (copy-on-write), swap out, swap in.

Every operation is a jit-compiled function of padded block-index arrays (padded to a power of two,
padding indices point past the pool and are dropped), so a fixed set of programs serves any
request mix; the device pool is donated and updated in place. ``warm_up`` compiles the sizes up to
``max_pairs_per_call``; a step that moves more pairs (several sequences swapped or forked at once)
runs in chunks of that size, so nothing compiles while serving.

Tensor parallelism: with a ``sharding`` the pool is split along its KV-head axis, each device
allocating only its slice, and the block programs keep that layout (their outputs are pinned to
it, so the step never sees a differently laid-out cache). The host swap pool has the global shape;
each process fills the head slices of its own devices.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec

from jaxpaged import tensor_parallel
from jaxpaged.buckets import geometric_range
from pallas_kernels.sizes import next_pow2

KVCaches = list[tuple[jax.Array, jax.Array]]
_FP8 = {"fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: Any) -> Any:
    """The pool's element type: the model's for "auto", else the fp8 format named (vLLM's names).

    fp8 blocks hold keys and values cast with a per-tensor scale of 1.0 (vLLM's default when no
    scales are calibrated), saturating at the format's largest finite value; attention reads them
    back in the model's dtype. Quality and speed: benchmarks/RESULTS.md (fp8 KV cache).
    """
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype not in _FP8:
        raise ValueError(f"kv_cache_dtype must be one of auto, {', '.join(_FP8)}, got {kv_cache_dtype!r}")
    return _FP8[kv_cache_dtype]


def _copy_blocks_impl(caches: KVCaches, src: jax.Array, dst: jax.Array) -> KVCaches:
    return [(k.at[dst].set(k[src], mode="drop"), v.at[dst].set(v[src], mode="drop")) for k, v in caches]


def _gather_blocks_impl(caches: KVCaches, idx: jax.Array) -> jax.Array:
    # [layers, 2, n, block_size, heads, head_dim]
    return jnp.stack([jnp.stack([k[idx], v[idx]]) for k, v in caches])


def _scatter_blocks_impl(caches: KVCaches, idx: jax.Array, data: jax.Array) -> KVCaches:
    return [
        (k.at[idx].set(data[i, 0].astype(k.dtype), mode="drop"), v.at[idx].set(data[i, 1].astype(v.dtype), mode="drop"))
        for i, (k, v) in enumerate(caches)
    ]


_copy_blocks = jax.jit(_copy_blocks_impl, donate_argnums=(0,))
_gather_blocks = jax.jit(_gather_blocks_impl)
_scatter_blocks = jax.jit(_scatter_blocks_impl, donate_argnums=(0,))


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
        sharding: NamedSharding | None = None,
    ):
        self.num_blocks = num_blocks
        self.num_host_blocks = num_host_blocks
        self.block_size = block_size
        self.sharding = sharding
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.caches: KVCaches = [self._zeros(shape, dtype) for _ in range(num_layers)]
        self._copy, self._gather, self._scatter = _copy_blocks, _gather_blocks, _scatter_blocks
        if sharding is not None:
            cache_sh = [(sharding, sharding)] * num_layers
            # Swapped blocks [layers, 2, n, block_size, heads, head_dim], split by head like the pool.
            self._blocks_sharding = NamedSharding(sharding.mesh, PartitionSpec(None, None, None, None, *sharding.spec[2:]))
            self._copy = jax.jit(_copy_blocks_impl, donate_argnums=(0,), out_shardings=cache_sh)
            self._gather = jax.jit(_gather_blocks_impl, out_shardings=self._blocks_sharding)
            self._scatter = jax.jit(_scatter_blocks_impl, donate_argnums=(0,), out_shardings=cache_sh)
        host_shape = (num_layers, 2, num_host_blocks, block_size, num_kv_heads, head_dim)
        self.host = np.zeros(host_shape, dtype=np.dtype(dtype)) if num_host_blocks else None
        self.max_pairs_per_call: int | None = None  # set by warm_up; None: any size (compiles on demand)

    def _chunks(self, pairs: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        size = self.max_pairs_per_call or max(1, len(pairs))
        return [pairs[i : i + size] for i in range(0, len(pairs), size)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: Any) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * np.dtype(dtype).itemsize

    def _pad(self, idx: list[int], fill: int) -> np.ndarray:
        out = np.full(next_pow2(len(idx)), fill, np.int32)
        out[: len(idx)] = idx
        return out

    def copy(self, pairs: list[tuple[int, int]]) -> None:
        """Copies device blocks src → dst (copy-on-write). Chunks are independent: a destination
        is a freshly taken block, never the source of another pair."""
        for chunk in self._chunks(pairs):
            src = self._pad([s for s, _ in chunk], 0)
            dst = self._pad([d for _, d in chunk], self.num_blocks)  # past the pool: dropped
            self.caches = self._copy(self.caches, src, dst)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copies device blocks to host blocks: (device block, host block) pairs."""
        for chunk in self._chunks(pairs):
            idx = self._pad([d for d, _ in chunk], 0)
            data = self._gather_to_host(idx)
            self.host[:, :, [h for _, h in chunk]] = data[:, :, : len(chunk)]

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copies host blocks back to device blocks: (host block, device block) pairs."""
        for chunk in self._chunks(pairs):
            n = next_pow2(len(chunk))
            data = np.zeros(self.host.shape[:2] + (n,) + self.host.shape[3:], self.host.dtype)
            data[:, :, : len(chunk)] = self.host[:, :, [h for h, _ in chunk]]
            idx = self._pad([d for _, d in chunk], self.num_blocks)
            self.caches = self._scatter(self.caches, idx, self._to_devices(data))

    def _zeros(self, shape: tuple[int, ...], dtype: Any) -> tuple[jax.Array, jax.Array]:
        return tensor_parallel.zeros(shape, dtype, self.sharding), tensor_parallel.zeros(shape, dtype, self.sharding)

    def _gather_to_host(self, idx: np.ndarray) -> np.ndarray:
        data = self._gather(self.caches, idx)
        if self.sharding is None:
            return np.asarray(data)
        out = np.zeros(data.shape, self.host.dtype)  # only this process's heads are filled
        tensor_parallel.to_host(data, out)
        return out

    def _to_devices(self, data: np.ndarray) -> np.ndarray | jax.Array:
        return data if self.sharding is None else tensor_parallel.array_from_host(data, self._blocks_sharding)

    def reset(self) -> None:
        """Replaces the device pool with zeros (after a failed step consumed the donated arrays);
        every block's contents are lost, so the caller must recompute whatever used them."""
        shapes = [(k.shape, k.dtype) for k, _ in self.caches]
        self.caches = [self._zeros(shape, dtype) for shape, dtype in shapes]

    def is_lost(self) -> bool:
        """Whether the device arrays were consumed (donated to a call that then failed)."""
        return any(k.is_deleted() or v.is_deleted() for k, v in self.caches)

    def lowerings(self, max_pairs: int) -> Iterator[tuple[str, Callable[[], Any]]]:
        """(name, lower) for each block program :meth:`warm_up` runs, with arguments of the same
        types (the start-up thread pool compiles them ahead of it)."""
        for n in geometric_range(1, next_pow2(max_pairs)):
            idx = np.zeros(n, np.int32)
            yield f"kv copy {n}", functools.partial(self._copy.lower, self.caches, idx, idx)
            if self.host is not None:
                shape = self.host.shape[:2] + (n,) + self.host.shape[3:]
                # NumPy data on one device; on a mesh, laid out as _to_devices lays it out.
                data = jax.ShapeDtypeStruct(shape, self.host.dtype,
                                            sharding=None if self.sharding is None else self._blocks_sharding)
                yield f"kv gather {n}", functools.partial(self._gather.lower, self.caches, idx)
                yield f"kv scatter {n}", functools.partial(self._scatter.lower, self.caches, idx, data)

    def warm_up(self, max_pairs: int) -> None:
        """Compiles the block programs for every padded size up to ``next_pow2(max_pairs)``; larger
        requests are chunked to that size from then on."""
        self.max_pairs_per_call = next_pow2(max_pairs)
        for n in geometric_range(1, self.max_pairs_per_call):
            # Destinations past the pool: the programs compile and run, nothing changes.
            # NumPy inputs, as in serving: a jnp.asarray would compile a staging program per shape.
            src = self._pad([0] * n, 0)
            dst = self._pad([self.num_blocks] * n, self.num_blocks)
            self.caches = self._copy(self.caches, src, dst)
            if self.host is not None:
                data = self._gather_to_host(src)
                self.caches = self._scatter(self.caches, dst, self._to_devices(data))
