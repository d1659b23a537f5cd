"""Does enqueueing a jitted call wait for the previous launch of the same program?

The engine's step timeline shows the enqueue of a compiled step (``step_call``) taking longer the
longer the step before it runs on the device (RESULTS.md, "Where a step's time goes"). A likely
cause: XLA runs the step as a command buffer (a CUDA graph) and records it again whenever an input's
address changes (every step: fresh inputs), which waits for the graph's launch in flight. If so, two
copies of the same program, called in turn, would each find their own previous launch finished.

This script runs a chain of calls shaped like decode steps (a donated state updated in place, a
fresh host input each call, the previous call's output as an input, at most two calls in flight as
under async scheduling) in three ways: one program; two copies of it (same computation, distinct
names, so XLA compiles and records each separately) called in turn; and one program with command
buffers off (``--xla_gpu_enable_command_buffer=`` in a child process). Reported per way: host
milliseconds per enqueue (median) and milliseconds per call over the chain.

    PYTHONPATH=. JAX_PLATFORMS=cuda python3 benchmarks/tools/command_buffer_wait.py --json $OUT/cbw.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _make_step(name: str, num_layers: int):
    import jax
    import jax.numpy as jnp

    def step(weights, state, x, prev):
        h = x + prev
        for i in range(num_layers):
            h = jnp.tanh(h @ weights[i])
        n = min(state.shape[1], h.shape[1])
        state = state.at[0, :n].add(h[0, :n])  # in place: the state is donated, as the KV cache is
        return h, state

    step.__name__ = step.__qualname__ = name  # the module name: distinct names compile apart
    return jax.jit(step, donate_argnums=(1,))


def run_chain(num_copies: int, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    steps = [_make_step(f"decode_step_copy{i}", args.num_layers) for i in range(num_copies)]
    key = jax.random.PRNGKey(0)
    weights = jax.random.normal(key, (args.num_layers, args.width, args.width), jnp.bfloat16) / args.width ** 0.5
    state = jnp.zeros((4, args.state_elems // 4), jnp.bfloat16)
    prev = jnp.zeros((args.rows, args.width), jnp.bfloat16)
    host = np.ones((args.rows, args.width), np.float32).astype(jnp.bfloat16)
    for s in steps:  # compile and warm each copy (the first run of a command buffer records it)
        for _ in range(3):
            prev, state = s(weights, state, host, prev)
    jax.block_until_ready((prev, state))
    enqueue_ms, in_flight = [], []
    t0 = time.perf_counter()
    for i in range(args.num_calls):
        if len(in_flight) >= 2:  # async scheduling keeps one step queued behind the running one
            jax.block_until_ready(in_flight.pop(0))
        t = time.perf_counter()
        prev, state = steps[i % num_copies](weights, state, host, prev)
        enqueue_ms.append(1e3 * (time.perf_counter() - t))
        in_flight.append(prev)
    jax.block_until_ready((prev, state))
    wall = time.perf_counter() - t0
    return {"copies": num_copies, "enqueue_ms_median": statistics.median(enqueue_ms),
            "enqueue_ms_p90": sorted(enqueue_ms)[int(0.9 * len(enqueue_ms))],
            "ms_per_call": 1e3 * wall / args.num_calls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-layers", type=int, default=96)
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--state-elems", type=int, default=1 << 26)
    ap.add_argument("--num-calls", type=int, default=300)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(run_chain(args.child, args)))
        return
    results = {}
    for label, copies, extra_flags in (("one program", 1, ""), ("two copies in turn", 2, ""),
                                       ("one program, command buffers off", 1, "--xla_gpu_enable_command_buffer=")):
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + extra_flags).strip())
        cmd = [sys.executable, __file__, "--child", str(copies)] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "json")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            raise RuntimeError(f"{label} failed:\n{proc.stderr[-2000:]}")
        results[label] = json.loads(line[-1][len("RESULT "):])
        r = results[label]
        print(f"{label:34s} enqueue median {r['enqueue_ms_median']:6.2f} ms (p90 {r['enqueue_ms_p90']:6.2f}), "
              f"{r['ms_per_call']:6.2f} ms a call", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
