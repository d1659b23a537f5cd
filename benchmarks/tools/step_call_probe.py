"""What the host's enqueue of the engine's compiled step (``step_call``) spends its time on.

The step timeline charges 2.5-12 ms a step to the call that enqueues the compiled step
(RESULTS.md, "Where a step's time goes"); at batch 1 that is most of the host's time a token. A
synthetic chain of matmuls shaped like decode steps enqueues in 0.37 ms on the same GPU
(``command_buffer_wait.py``), so the cost is in something the real step has and the chain has
not. This probe runs the engine's own step and sampler programs on one synthetic decode batch,
chained as async scheduling chains them (each step reads the previous step's sampled token on
the device; at most two steps in flight), and takes one ingredient away at a time:

- ``engine``: as the engine calls it (the flat int32 input a NumPy array, transferred by the call);
- ``device input``: the flat input put on the device before the loop (no transfer in the call);
- ``no token chain``: no input read from the previous step's sampled tokens (a constant instead);
- ``no sampler``: the step alone, no sampler call between steps.

Reported per way: median host ms of the step call and of the sampler call, ms a step over the chain.
Beside them, the floor under a decode step: the model's weights read once by matmuls of the step's
rows (and of one row), and by a plain sum (the read-only rate).

    PYTHONPATH=. JAX_PLATFORMS=cuda python3 benchmarks/tools/step_call_probe.py --json $OUT/probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.common import llama_config_dir, median_call_seconds  # noqa: E402
from benchmarks.tools.step_profile import synthetic_step  # noqa: E402

WAYS = ("engine", "device input", "no token chain", "no sampler")


def run_way(runner, way: str, ids, positions, md, num_steps: int) -> dict:
    import jax
    import jax.numpy as jnp

    num_rows = 8  # the sampler's smallest row bucket: one sequence
    prev_idx = np.full(len(ids), -1, np.int32)
    if way != "no token chain":
        prev_idx[0] = 0  # row 0's input is the token the previous step sampled
    params, _, flat, _, layout = runner.step_arguments(ids, positions, md, None, prev_idx)
    if way == "device input":
        flat = jax.device_put(flat)
    ridx = jnp.zeros(num_rows, jnp.int32)
    flags = runner._flags(runner.GREEDY)
    prev_tokens = runner._no_prev_tokens
    step_ms, sample_ms, in_flight = [], [], []
    t0 = None
    for i in range(num_steps + 10):
        if i == 10:  # the first steps record the command buffers
            jax.block_until_ready(in_flight)
            in_flight, step_ms, sample_ms = [], [], []
            t0 = time.perf_counter()
        if len(in_flight) >= 2:
            jax.block_until_ready(in_flight.pop(0))
        t = time.perf_counter()
        last, _, runner.kv.caches = runner._step(params, runner.kv.caches, flat, prev_tokens, layout)
        step_ms.append(1e3 * (time.perf_counter() - t))
        if way == "no sampler":
            in_flight.append(last)
            continue
        t = time.perf_counter()
        _, tokens = runner._sample(last, ridx, None, flags)
        sample_ms.append(1e3 * (time.perf_counter() - t))
        if way != "no token chain":
            prev_tokens = tokens
        in_flight.append(tokens)
    jax.block_until_ready(in_flight)
    wall = time.perf_counter() - t0
    return {"step_call_ms_median": statistics.median(step_ms),
            "sample_call_ms_median": statistics.median(sample_ms) if sample_ms else None,
            "ms_per_step": 1e3 * wall / num_steps}


def weights_floor(params, rows: int, reps: int = 10, calls: int = 5) -> dict:
    """Device ms to read every 2-D weight of ``params`` once: by matmuls of ``rows`` rows (what a
    decode step's projections do, the LM head and embedding table included) and by a plain sum (the
    read-only rate), each as GB/s over the weights' bytes."""
    import jax
    import jax.numpy as jnp

    mats = [w for w in jax.tree_util.tree_leaves(params) if getattr(w, "ndim", 0) == 2]
    nbytes = sum(w.nbytes for w in mats)
    x = jnp.ones((rows, max(w.shape[0] for w in mats)), mats[0].dtype)
    matmuls = jax.jit(lambda x, mats: sum(jnp.sum(x[:, : w.shape[0]] @ w, dtype=jnp.float32) for w in mats))
    read = jax.jit(lambda mats: sum(jnp.sum(w, dtype=jnp.float32) for w in mats))
    out = {"weights_GB": nbytes / 1e9, "rows": rows}
    for name, fn, args in (("matmul", matmuls, (x, mats)), ("read", read, (mats,))):
        ms = 1e3 * median_call_seconds(fn, *args, iters=reps, calls=calls)
        out[name + "_ms"], out[name + "_GBps"] = ms, nbytes / ms / 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="config directory (default: Llama-2-7B; --tiny on CPU)")
    ap.add_argument("--tiny", action="store_true", help="the tiny CPU Llama (smoke test of the script)")
    ap.add_argument("--num-seqs", type=int, default=1)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--num-steps", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from jaxpaged import LLM

    model = args.model or llama_config_dir(args.tiny)
    llm = LLM(model=model, load_format="dummy", dtype="float32" if args.tiny else "bfloat16", max_model_len=2048,
              skip_tokenizer_init=True)
    runner = llm.llm_engine.runner
    bucket, ids, positions, md = synthetic_step(runner, "decode", args.num_seqs, args.context, 2048)
    results = {"bucket": str(bucket)}
    for way in WAYS:
        r = results[way] = run_way(runner, way, ids, positions, md, args.num_steps)
        sample = "" if r["sample_call_ms_median"] is None else f", sampler call {r['sample_call_ms_median']:.2f} ms"
        print(f"{way:15s} step call {r['step_call_ms_median']:6.2f} ms{sample}, {r['ms_per_step']:6.2f} ms a step",
              flush=True)
    results["num_compilations_after_warmup"] = llm.get_stats()["num_compilations_after_warmup"]
    # The floor under the step: its weights read once, by matmuls of the step's rows (and of one
    # row), and by a plain read. Compiled after the count above, which they would otherwise join.
    results["weights_floor"] = [weights_floor(runner.lm.params, rows) for rows in sorted({1, bucket.num_tokens})]
    for r in results["weights_floor"]:
        print(f"weights {r['weights_GB']:.2f} GB, {r['rows']:3d} rows: matmuls {r['matmul_ms']:.2f} ms "
              f"({r['matmul_GBps']:.0f} GB/s), plain read {r['read_ms']:.2f} ms ({r['read_GBps']:.0f} GB/s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **results}, f, indent=2)


if __name__ == "__main__":
    main()
