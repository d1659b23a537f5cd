"""KV memory saved by sharing blocks, and what prefix caching buys on a shared system prompt.

    PYTHONPATH=. python3 benchmarks/sharing.py --scale cpu               # random tiny model, CPU, minutes
    PYTHONPATH=. python3 benchmarks/sharing.py --scale 7b --json $OUT/sharing.json   # Llama-2-7B shape, GPU

Savings (the PagedAttention paper's measure, section 6.3): while a workload runs, every step
counts the device blocks in use and the blocks the sequences' tables list (what the same sequences
would hold if nothing were shared); the saving is 1 - sum(used) / sum(listed) over the run's steps.
Three kinds of sharing, each on ShareGPT-like and Alpaca-like length mixes (the paper's two
traces): parallel sampling (n = 2, 4, 6; the prompt is shared), beam search (width 2, 4, 6; the
prompt and every common prefix of the beams) and a shared system prompt (prefix caching across
requests). The paper reports 6.1-9.8 % for parallel sampling and 37.6-55.2 % for beam search on
Alpaca (its Figure 15).

Prefix caching speed: requests that share a long system prompt, all submitted at once, run with
``enable_prefix_caching`` on and off: output tokens/s, time to first token (mean and median from
the arrival of the batch) and the tokens the engine actually computed.

Weights are random (the tiny model's seeded ones on CPU, ``load_format="dummy"`` for 7B), every
request ignores EOS (fixed lengths, so both sides of a comparison do the same work), and beam
search's branching follows whatever distributions those weights give.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import time
from typing import Any

from benchmarks.common import sharegpt_like

HERE = os.path.dirname(os.path.abspath(__file__))
PAPER_RANGES = {"parallel sampling": (6.1, 9.8), "beam search": (37.6, 55.2)}  # % saved, Alpaca, Figure 15
MIXES = {"sharegpt": (161.3, 338.0), "alpaca": (19.3, 58.5)}  # mean prompt / output tokens (paper, Figure 11)


@dataclasses.dataclass
class Scale:
    """How big a run is; ``cpu`` and ``7b`` are the presets."""

    model: str | None  # None: the random tiny model (jaxpaged.default_model)
    load_format: str
    dtype: str
    num_requests: int  # per savings run
    length_scale: dict[str, float]  # per mix: multiplies its mean lengths
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    system_prompt_len: int  # the prefix-caching speed run
    num_prefix_requests: int
    prefix_output_mean: float

    def llm_kwargs(self) -> dict[str, Any]:
        from jaxpaged.default_model import ensure_tiny_model

        return dict(model=self.model or ensure_tiny_model(), load_format=self.load_format, dtype=self.dtype,
                    max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs,
                    max_num_batched_tokens=self.max_num_batched_tokens, skip_tokenizer_init=True, seed=0)


SCALES = {
    # CPU: ShareGPT lengths at a quarter (the tiny model's steps are cheap, not free), Alpaca's as they are.
    "cpu": Scale(None, "auto", "float32", num_requests=16, length_scale={"sharegpt": 0.25, "alpaca": 1.0},
                 max_model_len=1024, max_num_seqs=32, max_num_batched_tokens=256, system_prompt_len=256,
                 num_prefix_requests=48, prefix_output_mean=16),
    "7b": Scale(os.path.join(HERE, "configs", "llama-2-7b"), "dummy", "bfloat16", num_requests=100,
                length_scale={"sharegpt": 1.0, "alpaca": 1.0}, max_model_len=2048, max_num_seqs=256,
                max_num_batched_tokens=2048, system_prompt_len=1000, num_prefix_requests=200, prefix_output_mean=128),
}


def make_llm(scale: Scale, **overrides: Any):
    from jaxpaged import LLM

    return LLM(**(scale.llm_kwargs() | overrides))


def workload(scale: Scale, mix: str, num_requests: int | None = None, seed: int = 0, vocab_size: int = 1000):
    """``(prompt token ids, output length)`` pairs with the mix's length distribution."""
    prompt_mean, output_mean = MIXES[mix]
    k = scale.length_scale[mix]
    reqs = sharegpt_like(num_requests or scale.num_requests, seed=seed, mean_prompt=prompt_mean * k,
                         mean_output=output_mean * k, vocab_size=vocab_size, max_total=scale.max_model_len)
    return [(r.prompt_token_ids, r.output_len) for r in reqs]


def measure_blocks(llm, prompts: list[list[int]], params: list) -> dict[str, float]:
    """Runs the requests to the end, one engine step at a time, counting blocks after every step."""
    engine = llm.llm_engine
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"share-{time.monotonic_ns()}-{i}", {"prompt_token_ids": prompt}, p)
    used = listed = steps = peak_used = peak_listed = 0
    while engine.has_unfinished_requests():
        engine.step()
        s = engine.get_stats()
        used += s["num_used_blocks"]
        listed += s["num_logical_blocks"]
        peak_used, peak_listed = max(peak_used, s["num_used_blocks"]), max(peak_listed, s["num_logical_blocks"])
        steps += 1
    return {"saving": 1.0 - used / listed if listed else 0.0, "mean_used_blocks": used / max(steps, 1),
            "mean_listed_blocks": listed / max(steps, 1), "peak_used_blocks": peak_used,
            "peak_listed_blocks": peak_listed, "steps": steps}


def parallel_sampling_savings(llm, reqs, n: int) -> dict[str, float]:
    from jaxpaged import SamplingParams

    params = [SamplingParams(n=n, temperature=1.0, seed=i, max_tokens=o, ignore_eos=True, detokenize=False)
              for i, (_, o) in enumerate(reqs)]
    return measure_blocks(llm, [p for p, _ in reqs], params)


def beam_search_savings(llm, reqs, width: int) -> dict[str, float]:
    from jaxpaged import SamplingParams

    params = [SamplingParams(n=width, use_beam_search=True, temperature=0.0, max_tokens=o, ignore_eos=True,
                             detokenize=False) for _, o in reqs]
    return measure_blocks(llm, [p for p, _ in reqs], params)


def system_prompt_savings(llm, reqs, system_prompt: list[int]) -> dict[str, float]:
    """Every request = the system prompt + its own prompt (prefix caching shares the former)."""
    from jaxpaged import SamplingParams

    llm.reset_prefix_cache()
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True, detokenize=False) for _, o in reqs]
    return measure_blocks(llm, [system_prompt + p for p, _ in reqs], params)


KINDS = ("parallel", "beam", "system")


def savings_table(scale: Scale, mixes=("sharegpt", "alpaca"), widths=(2, 4, 6), kinds=KINDS, llm=None) -> list[dict]:
    """Rows ``{mix, kind, param, saving, ...}`` for parallel sampling, beam search and a shared
    system prompt (``kinds``), on one engine."""
    llm = llm or make_llm(scale)
    vocab = llm.llm_engine.vocab_size
    rows = []
    for mix in mixes:
        reqs = workload(scale, mix, vocab_size=vocab)
        for n in widths if "parallel" in kinds else ():
            rows.append(dict(mix=mix, kind="parallel sampling", param=n, **parallel_sampling_savings(llm, reqs, n)))
        for w in widths if "beam" in kinds else ():
            rows.append(dict(mix=mix, kind="beam search", param=w, **beam_search_savings(llm, reqs, w)))
        if "system" in kinds:
            system = workload(scale, mix, num_requests=1, seed=99, vocab_size=vocab)[0][0]
            system = (system * (scale.system_prompt_len // len(system) + 1))[: scale.system_prompt_len]
            rows.append(dict(mix=mix, kind="shared system prompt", param=len(system),
                             **system_prompt_savings(llm, reqs, system)))
    return rows


def prefix_caching_speed(scale: Scale, enable: bool, seed: int = 1) -> dict[str, float]:
    """``num_prefix_requests`` requests sharing a ``system_prompt_len``-token system prompt, all at
    once: throughput, time to first token and tokens computed."""
    from jaxpaged import SamplingParams

    llm = make_llm(scale, enable_prefix_caching=enable)
    vocab = llm.llm_engine.vocab_size
    reqs = sharegpt_like(scale.num_prefix_requests, seed=seed, mean_prompt=MIXES["sharegpt"][0] * scale.length_scale["sharegpt"],
                         mean_output=scale.prefix_output_mean, vocab_size=vocab, max_total=scale.max_model_len // 2)
    system = sharegpt_like(1, seed=seed + 1, mean_prompt=scale.system_prompt_len, vocab_size=vocab,
                           max_total=4 * scale.system_prompt_len)[0].prompt_token_ids
    system = (system * (scale.system_prompt_len // len(system) + 1))[: scale.system_prompt_len]
    prompts = [{"prompt_token_ids": system + r.prompt_token_ids} for r in reqs]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True, detokenize=False) for r in reqs]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm: host paths, allocator
    llm.reset_prefix_cache()
    before = llm.get_stats()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    after = llm.get_stats()
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    gc.collect()  # the next engine sizes its KV pool from the memory this one held
    return {"enable_prefix_caching": enable, "num_requests": len(outs), "system_prompt_len": len(system),
            "elapsed_s": elapsed, "output_tokens_per_s": n_out / elapsed, "requests_per_s": len(outs) / elapsed,
            "mean_ttft_s": statistics.mean(ttft), "median_ttft_s": statistics.median(ttft),
            "computed_tokens": after["num_computed_tokens_total"] - before["num_computed_tokens_total"],
            "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in prompts),
            "cached_tokens": sum(o.num_cached_tokens or 0 for o in outs),
            "num_compilations_after_warmup": after["num_compilations_after_warmup"],
            "outputs": [o.outputs[0].token_ids for o in outs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--only", default="savings,prefix", help="comma list: savings, prefix")
    ap.add_argument("--mixes", default="sharegpt,alpaca", help=f"savings: comma list of {sorted(MIXES)}")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"savings: comma list of {KINDS}")
    ap.add_argument("--num-requests", type=int, default=None, help="override the scale's requests per savings run")
    ap.add_argument("--num-prefix-requests", type=int, default=None, help="override the prefix-caching run's requests")
    ap.add_argument("--caching", choices=["both", "off", "on"], default="both", help="prefix run: which sides")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    scale = SCALES[args.scale]
    if args.num_requests:
        scale = dataclasses.replace(scale, num_requests=args.num_requests)
    if args.num_prefix_requests:
        scale = dataclasses.replace(scale, num_prefix_requests=args.num_prefix_requests)
    results: dict[str, Any] = {"scale": args.scale, "config": dataclasses.asdict(scale)}
    if "savings" in args.only:
        t0 = time.perf_counter()
        rows = savings_table(scale, mixes=args.mixes.split(","), kinds=args.kinds.split(","))
        results["savings"] = rows
        print(f"\nKV blocks saved by sharing ({args.scale}, {time.perf_counter() - t0:.0f} s); paper (Alpaca): "
              f"parallel sampling {PAPER_RANGES['parallel sampling']} %, beam search {PAPER_RANGES['beam search']} %")
        print(f"{'mix':9s} {'kind':21s} {'n/width':>7s} {'saved':>7s} {'used':>8s} {'listed':>8s} {'steps':>6s}")
        for r in rows:
            print(f"{r['mix']:9s} {r['kind']:21s} {r['param']:7d} {r['saving']:7.1%} {r['mean_used_blocks']:8.1f} "
                  f"{r['mean_listed_blocks']:8.1f} {r['steps']:6d}")
    if "prefix" in args.only:
        sides = {"both": (False, True), "off": (False,), "on": (True,)}[args.caching]
        runs = {("on" if e else "off"): prefix_caching_speed(scale, e) for e in sides}
        pc = results["prefix_caching"] = dict(runs)
        print(f"\n{scale.num_prefix_requests} requests sharing a {scale.system_prompt_len}-token system prompt")
        print(f"{'caching':8s} {'out tok/s':>10s} {'req/s':>7s} {'mean TTFT':>10s} {'p50 TTFT':>9s} {'computed':>9s} {'cached':>8s}")
        for name, r in runs.items():
            print(f"{name:8s} {r['output_tokens_per_s']:10.1f} {r['requests_per_s']:7.2f} {r['mean_ttft_s']:9.3f}s "
                  f"{r['median_ttft_s']:8.3f}s {r['computed_tokens']:9d} {r['cached_tokens']:8d}")
        if len(runs) == 2:
            off, on = runs["off"], runs["on"]
            pc.update(same_outputs=on["outputs"] == off["outputs"],
                      throughput_ratio=on["output_tokens_per_s"] / off["output_tokens_per_s"],
                      mean_ttft_ratio=off["mean_ttft_s"] / on["mean_ttft_s"])
            print(f"on / off: {pc['throughput_ratio']:.2f}x output tok/s, mean TTFT {pc['mean_ttft_ratio']:.2f}x "
                  f"shorter; same greedy outputs: {pc['same_outputs']}")
    if args.json:
        with open(args.json, "w") as f:  # outputs (token ids) are kept: two single-side files can be compared
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
