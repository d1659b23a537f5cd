"""Host-side cost of one engine step at a large batch, measured on the CPU with a tiny model.

    PYTHONPATH=. python benchmarks/host_profile.py --num-seqs 256

The engine's step is synchronous: scheduling, packing, building sampling tensors and outputs happen
while the device waits. This profiles those Python parts (cProfile) and prints milliseconds per step
for each; the device part ("wait for device") is the tiny model on the CPU and says nothing about a GPU.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import tempfile
import time

import numpy as np

PARTS = {
    "scheduler.schedule": ("scheduler.py", "schedule"),
    "scheduler.update_from_output": ("scheduler.py", "update_from_output"),
    "runner: pack arrays": ("model_runner.py", "_pack_arrays"),
    "runner: sampling tensors": ("sampler.py", "from_rows"),
    "runner: sampler flags": ("model_runner.py", "_profile_for"),
    "engine: request outputs": ("llm_engine.py", "_request_output"),
    "wait for device (device_get)": ("api.py", "device_get"),
    "engine.step (total)": ("llm_engine.py", "step"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    args = ap.parse_args()

    from jaxpaged import LLM, SamplingParams

    here = os.path.dirname(os.path.abspath(__file__))
    cfg = json.load(open(os.path.join(here, "configs", "llama-2-7b", "config.json")))
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=1000)
    d = tempfile.mkdtemp()
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    llm = LLM(d, load_format="dummy", skip_tokenizer_init=True, max_num_seqs=args.num_seqs,
              max_num_batched_tokens=max(512, args.num_seqs), max_model_len=512,
              num_gpu_blocks_override=args.num_seqs * 8)
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(5, 900, args.prompt_len).tolist()} for _ in range(args.num_seqs)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True, detokenize=False)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    llm.generate(prompts, params, use_tqdm=False)
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats
    steps = next(v[0] for k, v in stats.items() if k[0].endswith("llm_engine.py") and k[2] == "step")
    print(f"{args.num_seqs} sequences, {steps} steps, {wall:.2f} s wall")
    print(f"{'part':34s} {'ms/step':>8s}")
    for name, (file, func) in PARTS.items():
        cum = sum(v[3] for k, v in stats.items() if k[0].endswith(file) and k[2] == func)
        print(f"{name:34s} {1000 * cum / steps:8.2f}")


if __name__ == "__main__":
    main()
