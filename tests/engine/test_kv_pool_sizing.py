"""How many KV blocks the device pool gets (jaxpaged/kv_pool_sizing.py)."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest

from jaxpaged import kv_pool_sizing
from jaxpaged.engine_args import EngineArgs
from jaxpaged.kv_pool_sizing import CPU_KV_CACHE_BYTES, activation_peak_bytes, num_kv_blocks
from jaxpaged.model_loader import load_model
from tests.helpers.tiny_checkpoint import make_tiny_checkpoint

GiB = 1 << 30


def _blocks(args, **kw):
    base = dict(max_model_len=100, block_bytes=1 << 20, on_gpu=False, max_num_seqs=4, max_num_batched_tokens=64)
    return num_kv_blocks(kw.pop("lm", types.SimpleNamespace(mesh=None)), args, **{**base, **kw})


def test_override_wins_everywhere():
    args = EngineArgs(num_gpu_blocks_override=7)
    assert _blocks(args) == 7
    assert _blocks(args, on_gpu=True) == 7


def test_cpu_pool_is_capped_by_the_sequences_it_can_serve_and_holds_at_least_one():
    args = EngineArgs(block_size=16)
    # 100 tokens = 7 blocks a sequence; 4 sequences need 28, far below 1 GiB of 1 MiB blocks.
    assert _blocks(args) == 28
    assert _blocks(args, max_num_seqs=10_000) == CPU_KV_CACHE_BYTES // (1 << 20)
    # Blocks bigger than the CPU budget: still one whole sequence.
    assert _blocks(args, block_bytes=CPU_KV_CACHE_BYTES) == 7


def test_gpu_pool_is_what_the_budget_leaves_after_weights_activations_and_margin(monkeypatch):
    """The arithmetic of the GPU path, on a device whose memory figures are given (the CPU has
    none); the activation peak is :func:`activation_peak_bytes`'s, tested below on a real model."""
    limit, in_use, peak = 120 * GiB, 14 * GiB, 3 * GiB
    device = types.SimpleNamespace(memory_stats=lambda: {"bytes_limit": limit, "bytes_in_use": in_use})
    monkeypatch.setattr(jax, "devices", lambda *a: [device])
    monkeypatch.setattr(kv_pool_sizing, "activation_peak_bytes", lambda *a: peak)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    args = EngineArgs(block_size=16, gpu_memory_utilization=0.9)
    budget = min(limit, limit / 0.95 * 0.9)
    margin = max(2 * GiB, int(0.03 * budget))
    want = int((budget - in_use - peak - margin) // (8 << 20))
    assert _blocks(args, on_gpu=True, block_bytes=8 << 20) == want
    # Not even one sequence of max_model_len fits: refused, naming the fields to change.
    with pytest.raises(ValueError, match="not enough GPU memory for one sequence of max_model_len=100"):
        _blocks(args, on_gpu=True, block_bytes=20 * GiB)



def test_gpu_pool_under_tensor_parallelism_is_sized_per_device(monkeypatch):
    """Each device holds 1/tp of every block: the budget left on the fullest device of the mesh,
    divided by that share."""
    limit, peak = 120 * GiB, 3 * GiB
    devices = [types.SimpleNamespace(process_index=0, memory_stats=lambda u=u: {"bytes_limit": limit, "bytes_in_use": u})
               for u in (14 * GiB, 16 * GiB)]
    mesh = types.SimpleNamespace(devices=np.array(devices, dtype=object))
    monkeypatch.setattr(kv_pool_sizing, "activation_peak_bytes", lambda *a: peak)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    args = EngineArgs(block_size=16, gpu_memory_utilization=0.9)
    budget = min(limit, limit / 0.95 * 0.9)
    margin = max(2 * GiB, int(0.03 * budget))
    want = int((budget - 16 * GiB - peak - margin) // (4 << 20))
    assert _blocks(args, on_gpu=True, block_bytes=8 << 20, lm=types.SimpleNamespace(mesh=mesh)) == want


def test_a_pool_started_before_the_engine_is_not_resized_in_name_only(monkeypatch, caplog):
    """JAX's GPU pool is fixed when its backend starts. An engine that comes after (a notebook that
    ran JAX first; a benchmark that measured bandwidth first) must size its KV cache within JAX's
    default 75 %, and say so, instead of setting a fraction the pool never gets."""
    from jaxpaged import engine_setup

    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "unset below")  # restored to its state at teardown
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
    monkeypatch.setattr(engine_setup, "_jax_backends_started", lambda: True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    args = EngineArgs(gpu_memory_utilization=0.9, compilation_cache_dir=None)
    with caplog.at_level("WARNING", logger="jaxpaged"):
        engine_setup.setup_platform(args)
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in engine_setup.os.environ
    assert "gpu_memory_utilization=0.90" in caplog.text and "75%" in caplog.text
    # The sizing then takes the pool as 75 % of the device: the budget is the whole pool.
    limit, in_use, peak = 60 * GiB, 13 * GiB, 1 * GiB
    device = types.SimpleNamespace(memory_stats=lambda: {"bytes_limit": limit, "bytes_in_use": in_use})
    monkeypatch.setattr(jax, "devices", lambda *a: [device])
    monkeypatch.setattr(kv_pool_sizing, "activation_peak_bytes", lambda *a: peak)
    margin = max(2 * GiB, int(0.03 * limit))
    assert _blocks(args, on_gpu=True, block_bytes=8 << 20) == int((limit - in_use - peak - margin) // (8 << 20))
    # Before the backend starts, the engine sets the fraction itself.
    monkeypatch.setattr(engine_setup, "_jax_backends_started", lambda: False)
    engine_setup.setup_platform(args)
    assert engine_setup.os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.900"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return load_model(make_tiny_checkpoint(str(tmp_path_factory.mktemp("sizing") / "tiny")), dtype="float32")


def test_activation_peak_grows_with_the_step(tiny_model):
    small = activation_peak_bytes(tiny_model, 16, 256, 16, 16)
    large = activation_peak_bytes(tiny_model, 16, 256, 256, 16)
    if small == 0:
        pytest.skip("this backend reports no memory analysis")
    # At least the step's own outputs: the hidden states [T, 64] and last-token logits [S, vocab].
    assert large >= 256 * 64 * 4
    assert large > small
