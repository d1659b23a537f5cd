"""Device time of single engine steps, kernel by kernel (jax.profiler trace, read back in-process).

    PYTHONPATH=. python3 benchmarks/tools/step_profile.py --json $OUT/step_profile.json      # GPU, 7B dummy bf16

Builds the engine on the Llama-2-7B config (``load_format="dummy"``), then runs three kinds of
step on synthetic block tables through the runner's own compiled step program:
``decode`` (``--num-seqs`` sequences at ``--context`` tokens, the decode bucket), ``mixed`` (the
same decodes but one, plus one prefill chunk filling ``--max-num-batched-tokens``), and
``prefill`` (one chunk of ``--max-num-batched-tokens`` tokens). For each it prints the median
step time and the GPU kernels that took it, grouped by name, in ms per step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import tempfile
import time

import numpy as np

BENCHMARKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kernel_times(trace_dir: str, iters: int) -> dict[str, float]:
    """ms per step of every GPU kernel name in the newest trace under ``trace_dir``."""
    from jax._src.lib import _profile_data

    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    data = _profile_data.ProfileData.from_file(path)
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        print(f"  [trace] {plane.name}: lines {[line.name for line in plane.lines]}")
        for line in plane.lines:
            # One line per CUDA stream (kernels run on the "Compute" one); "XLA Ops"/"XLA Modules"
            # lines would repeat the same time.
            if "compute" not in line.name.lower():
                continue
            for ev in line.events:
                totals[ev.name] += ev.duration_ns / 1e6 / iters
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def synthetic_step(runner, kind: str, num_seqs: int, context: int, budget: int):
    """Packed inputs for one step on disjoint, shuffled blocks."""
    from jaxpaged.buckets import pick_bucket
    from models.attention_metadata import pack_attention_metadata
    from pallas_kernels.sizes import cdiv

    bs = runner.block_size
    rng = np.random.default_rng(0)
    if kind == "decode":
        q_lens, ctx = [1] * num_seqs, [context - 1] * num_seqs
    elif kind == "mixed":
        q_lens = [1] * (num_seqs - 1) + [budget - (num_seqs - 1)]
        ctx = [context - 1] * (num_seqs - 1) + [0]
    else:
        q_lens, ctx = [budget], [0]
    need = [cdiv(c + q, bs) for c, q in zip(ctx, q_lens)]
    ids = rng.permutation(runner.kv.num_blocks)[: sum(need)]
    tables, a = [], 0
    for n in need:
        tables.append(ids[a : a + n].tolist())
        a += n
    bucket = pick_bucket(runner.buckets, sum(q_lens), len(q_lens), kind == "decode")
    md, positions = pack_attention_metadata(
        q_lens, ctx, tables, block_size=bs, num_tokens=bucket.num_tokens, num_seqs=bucket.num_seqs,
        max_blocks_per_seq=runner.max_blocks_per_seq, decode_only=bucket.decode_only,
        attention_backend=runner.lm.attention_backend,
    )
    input_ids = rng.integers(100, runner.vocab_size - 100, bucket.num_tokens).astype(np.int32)
    return bucket, input_ids, positions, md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(BENCHMARKS, "configs", "llama-2-7b"))
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--attention-backend", default=None)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import jax

    from jaxpaged import LLM

    llm = LLM(model=args.model, load_format="dummy", dtype="bfloat16", max_num_seqs=args.num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
              skip_tokenizer_init=True, attention_backend=args.attention_backend)
    runner = llm.llm_engine.runner
    result = {}
    for kind in ("decode", "mixed", "prefill"):
        bucket, ids, positions, md = synthetic_step(runner, kind, args.num_seqs, args.context,
                                                    args.max_num_batched_tokens)

        def step():
            last, _ = runner.run_step(ids, positions, md)
            return last

        jax.block_until_ready(step())
        ts = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            jax.block_until_ready(step())
            ts.append(1000 * (time.perf_counter() - t0))
        trace_dir = tempfile.mkdtemp()
        with jax.profiler.trace(trace_dir):
            for _ in range(args.iters):
                out = step()
            jax.block_until_ready(out)
        kernels = kernel_times(trace_dir, args.iters)
        total = sum(kernels.values())
        result[kind] = {"bucket": str(bucket), "median_ms": float(np.median(ts)), "kernel_ms": total,
                        "kernels": {k: v for k, v in list(kernels.items())[:40]}}
        print(f"\n== {kind}: bucket {bucket}, median step {np.median(ts):.2f} ms, kernels {total:.2f} ms/step")
        for name, ms in list(kernels.items())[: args.top]:
            print(f"  {ms:8.3f} ms  {100 * ms / total:5.1f}%  {name[:110]}")
    if args.json:
        json.dump(result, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
