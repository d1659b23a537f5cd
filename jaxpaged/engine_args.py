"""Engine arguments (vLLM's names), shared by ``LLM``, ``LLMEngine`` and the server's CLI."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from pallas_kernels.backends import ATTENTION_BACKENDS

PREEMPTION_MODES = ("recompute", "swap")
# vLLM's names: "auto" = the model's dtype; "fp8" = "fp8_e4m3" (float8_e4m3fn); "fp8_e5m2".
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


@dataclasses.dataclass
class EngineArgs:
    """Everything that configures an engine. ``None`` means "derive it" (documented per field)."""

    # An HF checkpoint directory, a .gguf file or a Hub name (org/name); None = the default model
    model: str | None = None
    revision: str | None = None  # Hub branch, tag or commit of ``model``
    tokenizer: str | None = None  # defaults to ``model``
    skip_tokenizer_init: bool = False  # token-id prompts only, no text (benchmarks on dummy weights)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    seed: int = 0
    block_size: int = 16
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES: fp8 halves the KV bytes (capacity x2)
    max_num_seqs: int | None = None  # None: 256 on GPU, 16 on CPU
    max_num_batched_tokens: int | None = None  # None: 2048 on GPU, 512 on CPU (at least max_num_seqs)
    max_model_len: int | None = None  # None: the config's max_position_embeddings
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    swap_space: float = 4.0  # GiB of host memory for swapped-out KV blocks
    preemption_mode: str = "recompute"
    load_format: str = "auto"  # auto | safetensors | gguf | dummy ("auto": gguf for a .gguf file)
    generation_config: str = "auto"  # auto | vllm | a folder (see jaxpaged/generation_config.py)
    tensor_parallel_size: int = 1  # devices the model is split over (Megatron-style; models/sharding.py)
    # Multi-host (jax.distributed; jaxpaged/distributed.py): JAX's coordinator as host:port (process
    # 0's host), the number of processes and this one's index. None: JAXPAGED_COORDINATOR_ADDRESS,
    # JAXPAGED_NUM_PROCESSES, JAXPAGED_PROCESS_ID from the environment; no address: one process.
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    attention_backend: str | None = None  # None: the fastest available on the device
    max_logprobs: int = 20
    # Admission caps of the fixed-width sampler inputs (a request above them is refused with a
    # ValueError naming the field): logit_bias entries (OpenAI's limit) and stop_token_ids.
    max_logit_bias: int = 300
    max_stop_token_ids: int = 64
    # JAX persistent compilation cache: "auto" = $JAXPAGED_CACHE/xla (~/.cache/jaxpaged/xla) on a
    # GPU, none on the CPU; a path; or "" / None for none.
    compilation_cache_dir: str | None = "auto"
    # vLLM's name: no CUDA graphs. Here: XLA's command buffers off (--xla_gpu_enable_command_buffer=),
    # each kernel launched on its own; takes effect only before JAX's GPU backend starts. Off by
    # default: as fast batched, a third slower at batch 1 (benchmarks/RESULTS.md, run c).
    enforce_eager: bool = False
    # Schedule step N+1 while step N runs on the device (its sampled tokens feed N+1 there); a
    # step whose sampling needs the exact token history (seed, penalties, min_tokens) waits.
    async_scheduling: bool = False
    # Automatic prefix caching (vLLM v1's default): full KV blocks are shared between requests with
    # the same token prefix, found by a hash chain; outputs are the same with it off.
    enable_prefix_caching: bool = True
    disable_log_stats: bool = False

    def __post_init__(self) -> None:
        def bad(field: str, allowed: str, value: Any) -> ValueError:
            return ValueError(f"{field} must be {allowed}, got {value!r}")

        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise bad("block_size", "a power of two in [1, 128]", self.block_size)
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise bad("max_num_seqs", ">= 1", self.max_num_seqs)
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise bad("max_num_batched_tokens", ">= 1", self.max_num_batched_tokens)
        if self.max_model_len is not None and self.max_model_len < 1:
            raise bad("max_model_len", ">= 1", self.max_model_len)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise bad("gpu_memory_utilization", "in (0, 1]", self.gpu_memory_utilization)
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise bad("num_gpu_blocks_override", ">= 1", self.num_gpu_blocks_override)
        if self.swap_space < 0:
            raise bad("swap_space", ">= 0 (GiB)", self.swap_space)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise bad("kv_cache_dtype", f"one of {KV_CACHE_DTYPES}", self.kv_cache_dtype)
        if self.preemption_mode not in PREEMPTION_MODES:
            raise bad("preemption_mode", f"one of {PREEMPTION_MODES}", self.preemption_mode)
        if self.tensor_parallel_size < 1:
            raise bad("tensor_parallel_size", ">= 1", self.tensor_parallel_size)
        if self.num_processes is not None and self.num_processes < 1:
            raise bad("num_processes", ">= 1", self.num_processes)
        if self.process_id is not None and not 0 <= self.process_id < (self.num_processes or self.process_id + 1):
            raise bad("process_id", "in [0, num_processes)", self.process_id)
        if self.attention_backend is not None and self.attention_backend not in ATTENTION_BACKENDS:
            raise bad("attention_backend", f"one of {ATTENTION_BACKENDS}", self.attention_backend)
        if self.max_logprobs < 0:
            raise bad("max_logprobs", ">= 0", self.max_logprobs)
        if self.max_logit_bias < 0:
            raise bad("max_logit_bias", ">= 0", self.max_logit_bias)
        if self.max_stop_token_ids < 0:
            raise bad("max_stop_token_ids", ">= 0", self.max_stop_token_ids)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Adds ``--model``, ``--block-size`` ... (one flag per field, vLLM spelling)."""
        for f in dataclasses.fields(EngineArgs):
            flag = "--" + f.name.replace("_", "-")
            default = f.default
            if f.type in ("bool",) or isinstance(default, bool):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
                continue
            if "int" in str(f.type):
                kind = int
            elif "float" in str(f.type):
                kind = float
            else:
                kind = str
            parser.add_argument(flag, type=kind, default=default)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
