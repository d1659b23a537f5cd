"""How many KV blocks the device pool gets: on a GPU, what is left of the memory budget after the
weights, the largest step's activations (measured by compiling that step against a one-block
cache) and a margin; on CPU a fixed size. ``num_gpu_blocks_override`` wins over both.

Under tensor parallelism every device holds its share of each block (its KV heads), its share of
the weights and its share of the step's activations, so the budget is per device: the fullest
device of the mesh decides, and across processes the smallest count wins (every process must
build the same pool)."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import numpy as np

from jaxpaged.engine_args import EngineArgs
from pallas_kernels.sizes import cdiv

logger = logging.getLogger("jaxpaged")

# CPU has no memory to size the pool from; this many bytes of KV cache unless overridden.
CPU_KV_CACHE_BYTES = 1 << 30


def num_kv_blocks(lm: Any, args: EngineArgs, *, max_model_len: int, block_bytes: int, on_gpu: bool,
                  max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """Blocks for the device pool of the loaded model ``lm`` (``block_bytes``: one block of every
    device together); ValueError if not even one sequence of ``max_model_len`` fits."""
    if args.num_gpu_blocks_override is not None:
        return args.num_gpu_blocks_override
    blocks_per_seq = cdiv(max_model_len, args.block_size)
    if not on_gpu:
        cap = max_num_seqs * blocks_per_seq
        return max(blocks_per_seq, min(cap, CPU_KV_CACHE_BYTES // block_bytes))
    import jax

    devices = [jax.devices()[0]] if lm.mesh is None else [d for d in lm.mesh.devices.flat
                                                          if d.process_index == jax.process_index()]
    tp = 1 if lm.mesh is None else lm.mesh.devices.size
    block_bytes = cdiv(block_bytes, tp)  # each device's share of a block
    stats = [d.memory_stats() or {} for d in devices]
    limit = min(s.get("bytes_limit", 0) for s in stats)
    in_use = max(s.get("bytes_in_use", 0) for s in stats)
    # JAX's pool is XLA_PYTHON_CLIENT_MEM_FRACTION of the device (we set it to
    # gpu_memory_utilization unless the user did): our budget is that fraction of the device.
    pool_fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
    budget = min(limit, limit / pool_fraction * args.gpu_memory_utilization)
    peak = activation_peak_bytes(lm, args.block_size, max_model_len, max_num_batched_tokens,
                                 min(max_num_batched_tokens, max_num_seqs))
    # Headroom for what the step's own analysis does not show: the sampler and prompt-logprobs
    # programs, XLA's autotuning scratch at compile time, cuBLAS workspaces.
    margin = max(2 << 30, int(0.03 * budget))
    free = budget - in_use - peak - margin
    num = int(free // block_bytes)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        num = int(multihost_utils.process_allgather(np.array(num, np.int64)).min())
    logger.info("GPU memory: limit %.1f GiB, weights etc. %.1f GiB, activation peak %.2f GiB -> %d KV blocks",
                limit / 2**30, in_use / 2**30, peak / 2**30, num)
    if num < blocks_per_seq:
        raise ValueError(f"not enough GPU memory for one sequence of max_model_len={max_model_len}: "
                         f"{num} blocks available; lower max_model_len or raise gpu_memory_utilization")
    return num


def activation_peak_bytes(lm: Any, block_size: int, max_model_len: int, T: int, S: int) -> int:
    """Temporaries + outputs of the model step for T tokens of S sequences, from XLA's memory
    analysis of that step compiled against a one-block cache (before the pool exists)."""
    import jax
    import jax.numpy as jnp

    from jaxpaged.model_runner import forward_step
    from jaxpaged.tensor_parallel import kv_cache_sharding
    from models.attention_metadata import AttentionMetadata
    from models.sharding import kv_cache_heads

    cfg = lm.config
    MB = cdiv(max_model_len, block_size)
    shape = (1, block_size, kv_cache_heads(cfg), cfg.head_dim)
    sharding = None if lm.mesh is None else kv_cache_sharding(lm.mesh)
    caches = [(jax.ShapeDtypeStruct(shape, lm.dtype, sharding=sharding),) * 2 for _ in range(cfg.num_hidden_layers)]
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    md = AttentionMetadata(i32(T), i32(S + 1), i32(S), i32(S, MB), i32(S), attention_backend=lm.attention_backend,
                           mesh=lm.mesh)

    fwd = functools.partial(forward_step, lm.model)  # the runner's step
    compiled = jax.jit(fwd, donate_argnums=(1,)).lower(lm.params, caches, i32(T), i32(T), md).compile()
    mem = compiled.memory_analysis()
    return int(getattr(mem, "temp_size_in_bytes", 0) + getattr(mem, "output_size_in_bytes", 0))
