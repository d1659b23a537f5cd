"""Tensor parallelism on the engine side: the device mesh, parameter placement straight into each
device's slice, and the shardings of the step programs' inputs and outputs.

The model is sharded as its family declares (``hf_sharding_table``, models/sharding.py); XLA's SPMD
partitioner compiles the step for the mesh and inserts the collectives (an all-reduce after each
row-parallel layer and after the vocab-parallel embedding lookup, an all-gather of the logits).
Everything the host sends a step — token ids, positions, block tables — is replicated: scheduling
and block tables are the same for every device. At ``tensor_parallel_size == 1`` there is no mesh
and none of this runs: programs compile exactly as they do without tensor parallelism.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.sharding import TP_AXIS, ShardingPlan


def make_mesh(tensor_parallel_size: int) -> Mesh | None:
    """A one-axis (``"tp"``) mesh over ``tensor_parallel_size`` devices; None for 1.

    In one process it takes the first devices; across processes (jax.distributed) the same number
    from each process, in process order, so the mesh spans every process."""
    tp = tensor_parallel_size
    num_processes = jax.process_count()
    if tp == 1 and num_processes == 1:
        return None
    if num_processes == 1:
        devices = jax.devices()
        if tp > len(devices):
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} devices; this machine has {len(devices)} "
                             f"{jax.default_backend()} device(s)")
        return Mesh(np.array(devices[:tp]), (TP_AXIS,))
    if tp % num_processes:
        raise ValueError(f"tensor_parallel_size={tp} must be a multiple of the number of processes ({num_processes})")
    per = tp // num_processes
    by_process: dict[int, list] = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    short = {p: len(ds) for p, ds in by_process.items() if len(ds) < per}
    if short:
        raise ValueError(f"tensor_parallel_size={tp} over {num_processes} processes needs {per} devices in each; "
                         f"process(es) {sorted(short)} have {sorted(short.values())}")
    devices = [d for p in sorted(by_process) for d in by_process[p][:per]]
    return Mesh(np.array(devices), (TP_AXIS,))


def tp_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape[TP_AXIS]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def kv_cache_sharding(mesh: Mesh) -> NamedSharding:
    """The paged cache [num_blocks, block_size, kv heads, head_dim] split along its heads."""
    return NamedSharding(mesh, P(None, None, TP_AXIS, None))


def host_array_placer(mesh: Mesh, plan: ShardingPlan) -> Callable[[tuple[str, ...], np.ndarray], jax.Array]:
    """``place(path, array)`` for the loader: each device receives only its slice of the host array
    (a memory-mapped checkpoint tensor), cut on the host; nothing is staged whole on one device."""

    def place(path: tuple[str, ...], array: np.ndarray) -> jax.Array:
        sharding = NamedSharding(mesh, plan[path].spec)
        return jax.make_array_from_callback(array.shape, sharding, lambda idx: np.ascontiguousarray(array[idx]))

    return place


@functools.lru_cache(maxsize=None)
def _dummy_program(kind: str, shape: tuple[int, ...], dtype: Any, sharding: NamedSharding, relayout: bool):
    def draw(key, columns):
        if kind == "ones":
            x = jnp.ones(shape, dtype)
        elif kind == "zeros":
            x = jnp.zeros(shape, dtype)
        else:
            x = (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)
        return x[..., columns] if relayout else x

    return jax.jit(draw, out_shardings=sharding)


def dummy_param(mesh: Mesh, plan: ShardingPlan, path: tuple[str, ...], kind: str, key: jax.Array,
                canonical_shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """A dummy parameter drawn directly into its shards: the values of the same draw at
    ``tensor_parallel_size == 1`` (JAX's partitionable threefry), in the layout the plan holds."""
    ps = plan[path]
    sharding = NamedSharding(mesh, ps.spec)
    relayout = ps.columns is not None
    columns = ps.columns if relayout else np.zeros(0, np.int32)
    return _dummy_program(kind, tuple(canonical_shape), jnp.dtype(dtype), sharding, relayout)(key, columns)


@functools.lru_cache(maxsize=None)
def _zeros_program(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def zeros(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding | None) -> jax.Array:
    """A zero array allocated in place on its devices (each device only its shard)."""
    if sharding is None:
        return jnp.zeros(shape, dtype)
    return _zeros_program(tuple(shape), jnp.dtype(dtype), sharding)()


def array_from_host(data: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from host data of its full shape, each device (of this process) taking its
    slice; across processes each supplies the slices of its own devices."""
    return jax.make_array_from_callback(data.shape, sharding, lambda idx: np.ascontiguousarray(data[idx]))


def to_host(array: jax.Array, out: np.ndarray) -> None:
    """Copies this process's shards of ``array`` into the same slices of ``out`` (of the global
    shape); in one process that is the whole array."""
    for s in array.addressable_shards:
        out[s.index] = np.asarray(s.data)


def step_jit_kwargs(mesh: Mesh | None, params: Any, caches: Any, num_replicated_args: int) -> dict:
    """``jax.jit`` keyword arguments for a step ``f(params, caches, *replicated args)`` returning
    ``(*replicated outputs, caches)``: parameters and caches keep their shardings (so the donated
    cache comes back laid out as it went in and nothing recompiles), the rest is replicated."""
    if mesh is None:
        return {}
    rep = replicated(mesh)
    param_sh = jax.tree.map(lambda a: a.sharding, params)
    cache_sh = jax.tree.map(lambda a: a.sharding, caches)
    return dict(in_shardings=(param_sh, cache_sh) + (rep,) * num_replicated_args,
                out_shardings=(rep, rep, cache_sh))


def replicated_out_kwargs(mesh: Mesh | None) -> dict:
    """``jax.jit`` keyword arguments that gather a program's outputs to every device (the sampler
    and prompt-logprob programs, whose results the host reads)."""
    return {} if mesh is None else dict(out_shardings=replicated(mesh))
