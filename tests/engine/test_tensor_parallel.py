"""Tensor parallelism, from the one-device test session: the rules that need no second device, and
the launcher of ``tests/tp`` (8 fake CPU devices; JAX's device count is fixed when it starts, so
those tests run in a process of their own with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``).
``make test`` launches the representative subset; the every-family matrix (``slow``) runs under
``make test-all``."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from jaxpaged.engine_args import EngineArgs
from models.sharding import Packed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_tp_session(marker: str, select: str | None = None) -> None:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker, os.path.join("tests", "tp")]
    proc = subprocess.run(cmd + (["-k", select] if select else []), cwd=ROOT, env=env, capture_output=True, text=True)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-12000:] + proc.stderr[-4000:]


def test_tp_parity_subset_on_8_fake_devices():
    _run_tp_session("not slow")


# The matrix in three processes: one process compiling every family's programs for 8 devices ran
# XLA:CPU into a crash in its compiler (the accumulation tests/conftest.py describes).
@pytest.mark.slow
@pytest.mark.parametrize("select", ["test_logits_match", "test_engine_greedy",
                                    "not test_logits_match and not test_engine_greedy"])
def test_tp_parity_every_family_on_8_fake_devices(select):
    _run_tp_session("slow", select)


def _columns_by_hand(layout: str, hq: int, hkv: int, d: int, tp: int) -> list[int]:
    """Checkpoint column of each held column, spelled out head by head."""
    g = hq // hkv

    def q(h):
        return (h * d if layout == "concat" else ((h // g) * (g + 2) + h % g) * d)

    def kv(j, which):  # which: 0 = k, 1 = v
        return ((hq + which * hkv + j) * d if layout == "concat" else ((j * (g + 2)) + g + which) * d)

    cols = []
    for s in range(tp):
        q_heads = range(s * hq // tp, (s + 1) * hq // tp)
        kv_heads = range(s * hkv // tp, (s + 1) * hkv // tp) if hkv % tp == 0 else [s // (tp // hkv)]
        for start in [q(h) for h in q_heads] + [kv(j, 0) for j in kv_heads] + [kv(j, 1) for j in kv_heads]:
            cols += range(start, start + d)
    return cols


@pytest.mark.parametrize("layout", ["concat", "grouped"])
@pytest.mark.parametrize("hq,hkv,tp", [(8, 8, 2), (8, 2, 2), (8, 2, 4), (8, 1, 4), (4, 4, 4)])
def test_packed_layout_gives_each_device_whole_heads(layout, hq, hkv, tp):
    d = 3
    packed = Packed.qkv(hq, hkv, d, grouped=layout == "grouped")
    cols = packed.columns(tp)
    assert cols.tolist() == _columns_by_hand(layout, hq, hkv, d, tp)
    assert packed.width(tp) == len(cols) == tp * (hq // tp + 2 * max(1, hkv // tp)) * d
    # Splitting the re-laid-out projection gives the heads the checkpoint layout holds, in order
    # (a KV head once per device that reads it when there are fewer than devices).
    x = np.arange(packed.canonical_width, dtype=np.float32)[None]
    q1, k1, v1 = (np.asarray(a) for a in packed.split(x, 1))
    q, k, v = (np.asarray(a) for a in packed.split(x[:, cols], tp))
    np.testing.assert_array_equal(q, q1)
    copies = k.shape[1] // hkv
    np.testing.assert_array_equal(k, np.repeat(k1, copies, axis=1))
    np.testing.assert_array_equal(v, np.repeat(v1, copies, axis=1))


def test_packed_segments_that_cannot_split_are_named():
    with pytest.raises(ValueError, match=r"KV heads \(3\) must be a multiple or a divisor of tensor_parallel_size=2"):
        Packed.qkv(6, 3, 4).check(2)
    with pytest.raises(ValueError, match=r"query heads \(6\) must be a multiple of tensor_parallel_size=4"):
        Packed.qkv(6, 6, 4).check(4)


def test_engine_refuses_more_devices_than_it_has():
    from jaxpaged import LLM

    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs 2 devices; this machine has 1"):
        LLM(None, tensor_parallel_size=2, load_format="dummy", skip_tokenizer_init=True)


@pytest.mark.parametrize("kw,match", [
    (dict(num_processes=0), "num_processes must be >= 1"),
    (dict(num_processes=2, process_id=2), "process_id must be in"),
])
def test_distributed_arguments_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        EngineArgs(**kw)


def test_distributed_config_reads_arguments_then_environment(monkeypatch):
    from jaxpaged.distributed import distributed_config

    assert distributed_config(EngineArgs()) is None
    monkeypatch.setenv("JAXPAGED_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAXPAGED_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAXPAGED_PROCESS_ID", "3")
    cfg = distributed_config(EngineArgs(process_id=2, num_processes=4))
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id, cfg.is_leader) == ("10.0.0.1:1234", 4, 2, False)
    with pytest.raises(ValueError, match="host:port"):
        distributed_config(EngineArgs(coordinator_address="nohost"))
    monkeypatch.delenv("JAXPAGED_PROCESS_ID")
    with pytest.raises(ValueError, match="needs num_processes and process_id"):
        distributed_config(EngineArgs(num_processes=4))
