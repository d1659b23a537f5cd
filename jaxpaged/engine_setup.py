"""What ``LLMEngine`` settles from its arguments before it builds anything: the platform (XLA
flags, ``jax.distributed``, the compilation cache — all before JAX starts its backend), the
tokenizer, the EOS id and ``max_model_len``."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from jaxpaged import distributed
from jaxpaged.cache_dir import cache_root
from jaxpaged.engine_args import EngineArgs

logger = logging.getLogger("jaxpaged")


def _jax_backends_started() -> bool:
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # no public API says whether the backends exist yet

    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started and started())


def _warn_pool_fixed(gpu_memory_utilization: float) -> None:
    import jax

    if jax.default_backend() == "gpu" and gpu_memory_utilization > 0.75:
        logger.warning(
            "JAX's GPU memory pool was created before the engine, at JAX's default of 75%% of the device: "
            "the KV cache fits in that, not in gpu_memory_utilization=%.2f. Set XLA_PYTHON_CLIENT_MEM_FRACTION=%.2f "
            "before anything in the process uses JAX to give the engine its share.",
            gpu_memory_utilization, gpu_memory_utilization)


def setup_platform(args: EngineArgs) -> distributed.DistributedConfig | None:
    """Sets the process up for JAX; returns the multi-host set-up, None for one process."""
    # JAX reserves 75% of GPU memory at start unless told otherwise; make that our budget. Once
    # something in the process has started JAX's backend the pool is fixed: say so rather than let
    # the KV sizing believe a fraction the pool was never given.
    if "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:
        if _jax_backends_started():
            _warn_pool_fixed(args.gpu_memory_utilization)
        else:
            os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{args.gpu_memory_utilization:.3f}"
    flags = os.environ.get("XLA_FLAGS", "")
    if args.enforce_eager and "xla_gpu_enable_command_buffer" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_enable_command_buffer=".strip()
    cfg = distributed.distributed_config(args)
    if cfg is not None:  # multi-host: before anything touches a device
        distributed.initialize(cfg)
    import jax

    cache_dir = args.compilation_cache_dir
    if cache_dir == "auto":
        # On by default where compiling is slow (GPU: minutes of start-up for a 7B model); off on
        # the CPU, where programs compile in seconds and the suite builds hundreds of engines.
        cache_dir = os.path.join(cache_root(), "xla") if jax.default_backend() == "gpu" else None
    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        logger.info("JAX compilation cache: %s", cache_dir)
    return cfg


def load_tokenizer(path: str):
    """The HF tokenizer at ``path``; a ValueError that says what to pass instead."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot load a tokenizer from {path!r} ({e}); pass tokenizer=PATH, or "
            "skip_tokenizer_init=True to use token-id prompts only"
        ) from e


def eos_token_id(tokenizer: Any, hf_config: dict) -> int | None:
    """The tokenizer's EOS id, else the first of ``config.json``'s."""
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    eos = hf_config.get("eos_token_id")
    if isinstance(eos, list):
        return int(eos[0]) if eos else None
    return eos


def resolve_max_model_len(args: EngineArgs, config: Any) -> int:
    """``max_model_len``, by default the model's ``max_position_embeddings``, never above it."""
    limit = int(config.max_position_embeddings)
    if args.max_model_len is None:
        return limit
    if args.max_model_len > limit:
        raise ValueError(f"max_model_len must be <= {limit} (the model's max_position_embeddings), "
                         f"got {args.max_model_len}")
    return args.max_model_len
