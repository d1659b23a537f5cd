"""Two processes on this machine (CPU devices, loopback) serve one model at tp = 4, two devices
each: process 0 runs the engine (scheduler, block manager) and process 1 replays its steps
(jaxpaged/distributed.py); the tokens match the single-process, unsplit engine's, under a pool
small enough to preempt (swapped blocks go to each process's own host pool), and nothing
compiles after warm-up on the leader."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxpaged import LLM, SamplingParams
from tests.helpers.tp_checkpoints import build

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENGINE = dict(dtype="float32", skip_tokenizer_init=True, block_size=4, max_num_seqs=4, max_num_batched_tokens=32,
              max_model_len=128, num_gpu_blocks_override=18, swap_space=0.01)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(kw: dict) -> list[str]:
    out = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + flag[2:])
        else:
            out += [flag, str(v)]
    return out


@pytest.mark.parametrize("mode", ["swap", "recompute-async"])
def test_two_processes_match_one(tmp_path, mode):
    ckpt = build("llama_gqa", str(tmp_path / "ckpt"))
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 250, n).tolist() for n in (5, 37, 12, 1, 23, 9)]
    engine = dict(ENGINE, model=ckpt, preemption_mode=mode.split("-")[0], async_scheduling=mode.endswith("async"))

    ref = LLM(**engine).generate([{"prompt_token_ids": p} for p in prompts],
                                 SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, detokenize=False),
                                 use_tqdm=False)

    dist = dict(engine, tensor_parallel_size=4, coordinator_address=f"127.0.0.1:{_free_port()}", num_processes=2)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    worker = subprocess.Popen([sys.executable, "-m", "jaxpaged.worker", *_cli(dict(dist, process_id=1))], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        leader = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tests", "helpers", "multihost_leader.py"),
             json.dumps(dict(dist, process_id=0)), json.dumps(prompts)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        worker_out, _ = worker.communicate(timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert leader.returncode == 0, leader.stdout[-3000:] + leader.stderr[-6000:]
    assert worker.returncode == 0, worker_out[-6000:]
    line = next(x for x in leader.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["tokens"] == [o.outputs[0].token_ids for o in ref]
    assert result["stats"]["num_compilations_after_warmup"] == 0
    assert result["stats"]["num_preemptions_total"] > 0
    replayed = re.search(r"worker 1 stops after (\d+) steps", worker_out)
    assert replayed and int(replayed.group(1)) > 0, worker_out[-3000:]
