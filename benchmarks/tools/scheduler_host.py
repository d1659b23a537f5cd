"""Host cost of the scheduler alone: ``Scheduler.schedule`` and ``update_from_output`` per step
at a large batch, with no model (sampled tokens are made up on the host).

    PYTHONPATH=. python benchmarks/tools/scheduler_host.py --num-seqs 512

Drives the engine's own ``Scheduler`` over a ``BlockManager`` the way async scheduling does
(step N+1 is scheduled before step N's tokens land), with ``SamplingParams`` as the engine builds
them. Prints milliseconds per step for each part over the decode steps (every running sequence
decoding), the part of an engine step's host time that grows with the number of sequences. Times
are the thread's CPU time (``time.thread_time``): pure Python on one thread, so the same as wall
time on an idle machine, and not inflated when other work shares the cores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from jaxpaged.block_manager import BlockManager
from jaxpaged.request import Request
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.scheduler import Scheduler


def run(num_seqs: int, prompt_len: int, output_len: int, block_size: int, prefix_caching: bool) -> dict:
    max_model_len = prompt_len + output_len
    num_blocks = num_seqs * -(-max_model_len // block_size) + 16
    bm = BlockManager(num_blocks, 0, block_size, enable_caching=prefix_caching)
    sched = Scheduler(bm, num_seqs, max(2048, num_seqs), max_model_len, eos_token_id=2, async_scheduling=True)
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    for i in range(num_seqs):
        sched.add_request(Request(f"r{i}", rng.integers(10, 30000, prompt_len).tolist(), params, first_seq_id=i))
    times = {"schedule": [], "update_from_output": []}
    prev = None
    while sched.has_unfinished_requests() or prev is not None:
        t0 = time.thread_time()
        out = sched.schedule() if sched.has_unfinished_requests() else None
        t1 = time.thread_time()
        decode = out is not None and len(out.scheduled) == num_seqs and out.num_batched_tokens == num_seqs
        if prev is not None:
            sampled = {sid: (7, 0.0, None) for row in prev.scheduled for sid in row.sample_seq_ids}
            t2 = time.thread_time()
            sched.update_from_output(prev, sampled)
            t3 = time.thread_time()
            if decode:
                times["update_from_output"].append(t3 - t2)
        if decode:
            times["schedule"].append(t1 - t0)
        prev = out if out is not None and out.scheduled else None
    return {k: 1000 * float(np.median(v)) for k, v in times.items()} | {"decode_steps": len(times["schedule"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-seqs", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=150)
    ap.add_argument("--output-len", type=int, default=200)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--no-prefix-caching", action="store_true")
    args = ap.parse_args()
    r = run(args.num_seqs, args.prompt_len, args.output_len, args.block_size, not args.no_prefix_caching)
    print(f"{args.num_seqs} sequences, {r['decode_steps']} decode steps: median ms/step "
          f"schedule {r['schedule']:.2f}, update_from_output {r['update_from_output']:.2f}")


if __name__ == "__main__":
    main()
