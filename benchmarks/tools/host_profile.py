"""Where one engine step's time goes at a large batch: host parts (timed) and the device step alone.

    PYTHONPATH=. python benchmarks/tools/host_profile.py --num-seqs 256                 # CPU, tiny model
    PYTHONPATH=. python3 benchmarks/tools/host_profile.py --full-model --num-seqs 256   # GPU, 7B dummy bf16

The engine's step runs scheduling, packing, sampling-tensor and output building on the host around
the device step. This wraps those methods in ``perf_counter`` timers (no profiler: cProfile
inflated these many-small-call parts two to three times) and prints milliseconds per step for
each, then times the device alone: the compiled step + sampler on the last decode step's own
packed inputs, called back to back (``--device-iters``), so wall per step minus device per step is
what the host costs. On the CPU with the tiny model the device figures say nothing about a GPU,
and "step call" includes the computation itself (the CPU backend runs it in the calling thread).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import time

import numpy as np

# (label, the engine attribute holding the method (None: the engine itself), method name)
PARTS = [
    ("scheduler.schedule", "scheduler", "schedule"),
    ("scheduler.update_from_output", "scheduler", "update_from_output"),
    ("runner: pack arrays", "runner", "_pack_arrays"),
    ("runner: step call (dispatch)", "runner", "_step"),
    ("runner: sampler flags", "runner", "_profile_for"),
    ("runner: sampling tensors", "runner", "_tensors"),
    ("runner: sampler call (dispatch)", "runner", "_sample"),
    ("output processor: request outputs", "output_processor", "make_output"),
    ("engine.step (total)", None, "step"),
]


def add_timers(engine, totals: dict, calls: dict) -> None:
    """Wraps each part's bound method on its instance with a timer adding into ``totals`` (seconds)
    and ``calls``."""
    for label, owner, name in PARTS:
        obj = getattr(engine, owner) if owner else engine
        fn = getattr(obj, name)

        @functools.wraps(fn)
        def timed(*a, _fn=fn, _label=label, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                totals[_label] += time.perf_counter() - t0
                calls[_label] += 1

        setattr(obj, name, timed)


def time_device_step(llm, captured, iters: int) -> dict:
    """Median ms of the step program and of step + greedy sampler, on captured packed inputs."""
    import jax

    runner = llm.llm_engine.runner
    ids, md, positions = captured
    rows = np.zeros(runner.max_rows, np.int32)
    tensors = runner._tensors([], runner.max_rows, runner.GREEDY)
    flags = runner._flags(runner.GREEDY)

    def run(with_sampler: bool) -> float:
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            last, _ = runner.run_step(ids, positions, md)
            out = runner._sample(last, rows, tensors, flags) if with_sampler else last
            jax.block_until_ready(out)
            ts.append(time.perf_counter() - t0)
        return 1000 * float(np.median(ts[2:]))

    return {"step_ms": run(False), "step_and_sample_ms": run(True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--full-model", action="store_true", help="the Llama-2-7B config as is, bf16 (GPU)")
    ap.add_argument("--device-iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from benchmarks.common import llama_config_dir
    from jaxpaged import LLM, SamplingParams
    from pallas_kernels.sizes import next_pow2

    d = llama_config_dir(tiny=not args.full_model)
    cfg = json.load(open(os.path.join(d, "config.json")))
    max_len = max(512, next_pow2(args.prompt_len + args.output_len))
    kw = dict(dtype="bfloat16") if args.full_model else dict(num_gpu_blocks_override=args.num_seqs * 8)
    llm = LLM(d, load_format="dummy", skip_tokenizer_init=True, max_num_seqs=args.num_seqs,
              max_num_batched_tokens=max(512, args.num_seqs), max_model_len=max_len, **kw)
    runner = llm.llm_engine.runner
    captured: list = []
    pack = runner._pack_arrays

    def capturing_pack(scheduled, bucket):
        out = pack(scheduled, bucket)
        if len(scheduled) == args.num_seqs and all(len(x.token_ids) == 1 for x in scheduled):
            captured[:] = [out]
        return out

    runner._pack_arrays = capturing_pack
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(5, min(900, cfg["vocab_size"] - 1), args.prompt_len).tolist()}
               for _ in range(args.num_seqs)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:8], params, use_tqdm=False)  # first-call costs out of the timings
    engine = llm.llm_engine
    totals: dict = collections.defaultdict(float)
    calls: dict = collections.defaultdict(int)
    add_timers(engine, totals, calls)
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    steps = calls["engine.step (total)"]
    result = {"num_seqs": args.num_seqs, "steps": steps, "wall_s": wall, "parts_ms_per_step": {}}
    print(f"{args.num_seqs} sequences, {steps} steps, {wall:.2f} s wall ({1000 * wall / steps:.2f} ms/step)")
    print(f"{'part':34s} {'ms/step':>8s}")
    for label, _, _ in PARTS:
        ms = 1000 * totals[label] / steps
        result["parts_ms_per_step"][label] = ms
        print(f"{label:34s} {ms:8.2f}")
    if captured:
        runner._pack_arrays = pack
        dev = time_device_step(llm, captured[0], args.device_iters)
        result.update(dev)
        print(f"device alone (decode bucket, {args.num_seqs} seqs): step {dev['step_ms']:.2f} ms, "
              f"step + sampler {dev['step_and_sample_ms']:.2f} ms")
    if args.json:
        json.dump(result, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
