"""Host cost of a served step: the engine's step with ``DELTA`` outputs (what the server asks for),
the engine process's packing and pickling of them, the server's unpickling, and the garbage
collector's pauses, per step, with no GPU.

    PYTHONPATH=. python benchmarks/tools/served_step_host.py --num-seqs 256                # heap frozen
    PYTHONPATH=. python benchmarks/tools/served_step_host.py --num-seqs 256 --no-freeze-gc

A tiny random Llama (dummy weights, CPU) runs ``--num-seqs`` requests of ``--prompt-len`` prompt and
``--output-len`` output tokens (greedy, ``ignore_eos``, async scheduling, 2048-token steps) through
``LLMEngine.step``; each step's outputs go through the engine process's own ``update_from_output``
/ ``pack_update`` and ``pickle`` (``engine_core_process.py``) and back through ``unpack_update``,
as the server's side does. Times are the thread's CPU time (``time.thread_time``): the Python the
host runs, not inflated when the CPU backend's computation shares the cores. GC pauses are wall
time from ``gc.callbacks``, per generation. ``--freeze-gc`` (default) freezes the heap after
start-up as the engine process does (``jaxpaged/gc_heap.py``). Figures: RESULTS.md, "Host cost of
a served step".
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import pickle
import time

import numpy as np

class GCPauses:
    """Collections and their wall time per generation, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.count: collections.Counter = collections.Counter()
        self.seconds: collections.Counter = collections.Counter()
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.count[info["generation"]] += 1
            self.seconds[info["generation"]] += time.perf_counter() - self._start


def run(num_seqs: int, prompt_len: int, output_len: int, freeze_gc: bool) -> dict:
    from benchmarks.common import llama_config_dir
    from jaxpaged.engine_args import EngineArgs
    from jaxpaged.gc_heap import freeze_gc_heap
    from jaxpaged.llm_engine import LLMEngine
    from jaxpaged.sampling_params import RequestOutputKind, SamplingParams
    from jaxpaged.server.engine_client import update_from_output
    from jaxpaged.server.engine_core_process import pack_update, unpack_update

    d = llama_config_dir(tiny=True)
    max_model_len = 1 << (prompt_len + output_len - 1).bit_length()
    block_size = 16
    engine = LLMEngine(EngineArgs(
        model=d, load_format="dummy", skip_tokenizer_init=True, max_num_seqs=num_seqs,
        max_num_batched_tokens=2048, max_model_len=max_model_len, async_scheduling=True, block_size=block_size,
        num_gpu_blocks_override=num_seqs * -(-(prompt_len + output_len) // block_size) + 16))
    if freeze_gc:
        freeze_gc_heap()
    pauses = GCPauses()
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.DELTA)
    rng = np.random.default_rng(0)
    for i in range(num_seqs):
        engine.add_request(f"r{i}", {"prompt_token_ids": rng.integers(5, 900, prompt_len).tolist()}, params)
    parts = collections.defaultdict(float)
    steps = 0
    wall = time.perf_counter()
    while engine.has_unfinished_requests():
        t0 = time.thread_time()
        outputs = engine.step()
        t1 = time.thread_time()
        packed = [pack_update(update_from_output(out)) for out in outputs]
        t2 = time.thread_time()
        message = pickle.dumps(("step", packed, engine.get_stats()), protocol=pickle.HIGHEST_PROTOCOL)
        t3 = time.thread_time()
        [unpack_update(item) for item in pickle.loads(message)[1]]
        t4 = time.thread_time()
        steps += 1
        parts["engine.step"] += t1 - t0
        parts["pack"] += t2 - t1
        parts["pickle"] += t3 - t2
        parts["server: unpickle + unpack"] += t4 - t3
    wall = time.perf_counter() - wall
    result = {"num_seqs": num_seqs, "prompt_len": prompt_len, "output_len": output_len, "freeze_gc": freeze_gc,
              "steps": steps, "wall_s": wall,
              "cpu_ms_per_step": {k: 1e3 * v / steps for k, v in parts.items()},
              "gc_collections": {f"gen{g}": pauses.count[g] for g in range(3)},
              "gc_pause_ms_per_step": {f"gen{g}": 1e3 * pauses.seconds[g] / steps for g in range(3)},
              "gc_mean_pause_ms": {f"gen{g}": 1e3 * pauses.seconds[g] / max(1, pauses.count[g]) for g in range(3)}}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=150)
    ap.add_argument("--output-len", type=int, default=200)
    ap.add_argument("--freeze-gc", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    r = run(args.num_seqs, args.prompt_len, args.output_len, args.freeze_gc)
    print(f"{r['num_seqs']} sequences, {r['steps']} steps, heap {'frozen' if r['freeze_gc'] else 'not frozen'}")
    for k, v in r["cpu_ms_per_step"].items():
        print(f"  {k:28s} {v:7.3f} ms CPU/step")
    for g in range(3):
        print(f"  gc gen{g}: {r['gc_collections'][f'gen{g}']:4d} collections, "
              f"{r['gc_pause_ms_per_step'][f'gen{g}']:6.3f} ms/step, {r['gc_mean_pause_ms'][f'gen{g}']:7.2f} ms each")
    if args.json:
        json.dump(r, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
