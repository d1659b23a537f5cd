"""Engine start-up time with a cold and a warm compilation cache (vLLM's ``bench startup`` shape).

    PYTHONPATH=. python3 benchmarks/startup.py --json $OUT/startup.json      # GPU, 7B dummy bf16

Each start is a fresh process that imports jaxpaged and builds ``LLM`` (load the weights, size the
KV pool, compile every bucket): the first with an empty compilation cache directory, the next ones
with the same directory, now filled. Reported: seconds from the process start to the engine being
ready (imports included), and the engine's own ``LLM(...)`` time. ``--compile-threads 1,8`` repeats
the whole measurement (a fresh cache directory each) for each number of compile threads
(``$JAXPAGED_COMPILE_THREADS``; default: the engine's own choice).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = """
import json, sys, time
t0 = time.perf_counter()
from jaxpaged import LLM
t1 = time.perf_counter()
llm = LLM(model=sys.argv[1], load_format="dummy", dtype=sys.argv[2], skip_tokenizer_init=True,
          max_model_len=int(sys.argv[3]), compilation_cache_dir=sys.argv[4])
t2 = time.perf_counter()
runner = llm.llm_engine.runner
print("STARTUP " + json.dumps({"import_s": t1 - t0, "engine_s": t2 - t1,
                               "num_compilations": llm.get_stats()["num_compilations"],
                               "warm_up_s": llm.llm_engine.warm_up_seconds,
                               "precompile_s": getattr(runner, "precompile_seconds", None)}))
"""


def start_once(args, cache_dir: str, threads: str | None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    if threads is not None:
        env["JAXPAGED_COMPILE_THREADS"] = threads
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, args.model, args.dtype, str(args.max_model_len), cache_dir],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    line = [x for x in proc.stdout.splitlines() if x.startswith("STARTUP ")]
    if proc.returncode or not line:
        raise RuntimeError(f"start-up failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return dict(json.loads(line[-1][len("STARTUP "):]), process_s=wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(HERE, "configs", "llama-2-7b"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--warm-runs", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--compile-threads", default=None,
                    help="comma-separated thread counts, each measured cold and warm (default: the engine's)")
    args = ap.parse_args()
    runs = {}
    for threads in args.compile_threads.split(",") if args.compile_threads else [None]:
        suffix = "" if threads is None else f"_t{threads}"
        with tempfile.TemporaryDirectory(prefix="jaxpaged-xla-") as cache_dir:
            runs[f"cold{suffix}"] = start_once(args, cache_dir, threads)
            print(f"[cold{suffix}] {json.dumps(runs[f'cold{suffix}'])}", flush=True)
            for i in range(args.warm_runs):
                runs[f"warm{i}{suffix}"] = start_once(args, cache_dir, threads)
                print(f"[warm{i}{suffix}] {json.dumps(runs[f'warm{i}{suffix}'])}", flush=True)
    print(f"{'start':>9s} {'process s':>10s} {'engine s':>9s} {'imports s':>9s}")
    for name, r in runs.items():
        print(f"{name:>9s} {r['process_s']:10.1f} {r['engine_s']:9.1f} {r['import_s']:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
