"""Offline throughput on ShareGPT-like synthetic requests (vLLM's benchmark_throughput shape).

    PYTHONPATH=. python3 benchmarks/throughput.py --backend jaxpaged --num-requests 1000
    PYTHONPATH=. python3 benchmarks/throughput.py --backend hf-cb --num-requests 200
    PYTHONPATH=. python3 benchmarks/throughput.py --backend all   # jaxpaged, then HF on a prefix
    PYTHONPATH=. python3 benchmarks/throughput.py --tensor-parallel-size 1,2,4,8   # tp sweep, 7B
    PYTHONPATH=. python3 benchmarks/throughput.py --model benchmarks/configs/llama-2-70b --tensor-parallel-size 2,4,8

Weights are random (``load_format="dummy"`` / ``from_config``) with a Llama-2-7B config (or any
config directory, e.g. the 70B-shaped one); every request ignores EOS and generates exactly its
output length. Prints requests/s, output tokens/s, total tokens/s, batch-1 latency (time to first
token and time per output token of a lone request), the roofline (copy bandwidth and bf16 matmul
rate measured in the same run, on one device) and the ratio to HF in the same run; ``--json``
writes everything to a file.

``--tensor-parallel-size`` splits the model over that many GPUs; a comma list runs each size in a
fresh process (each engine takes most of every GPU's memory) and prints one table. The roofline at
tp = N counts N devices' bandwidth and matmul rate and no communication, so its ratio is an upper
bound on what the all-reduces leave. The HF backends run on one GPU and only at tp = 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.common import LlamaShape, measure_ceilings_jax, sharegpt_like, simulate_ceiling

HERE = os.path.dirname(os.path.abspath(__file__))


def run_jaxpaged(args, reqs) -> dict:
    from jaxpaged import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=args.model, load_format="dummy", dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
              block_size=args.block_size, skip_tokenizer_init=True, attention_backend=args.attention_backend,
              gpu_memory_utilization=args.gpu_memory_utilization, async_scheduling=args.async_scheduling,
              enforce_eager=args.enforce_eager, kv_cache_dtype=args.kv_cache_dtype,
              tensor_parallel_size=int(args.tensor_parallel_size))
    startup = time.perf_counter() - t0
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True, detokenize=False) for r in reqs]
    timeline = llm.llm_engine.timeline
    timeline.enable()  # per-step phase times by bucket (a few perf_counter calls a step)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    timeline.enabled = False
    greedy_timeline = timeline.summary()
    latencies = request_latencies(outs)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == sum(r.output_len for r in reqs), "engine produced a wrong number of tokens"
    stats = llm.get_stats()
    sampling = {}
    if args.also_sampling:  # the same requests again, sampled (vLLM's usual T / top-p / top-k), same engine
        sparams = [SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=None, max_tokens=r.output_len,
                                  ignore_eos=True, detokenize=False) for r in reqs]
        timeline.enable()
        t1 = time.perf_counter()
        souts = llm.generate(prompts, sparams, use_tqdm=False)
        s_elapsed = time.perf_counter() - t1
        timeline.enabled = False
        s_out = sum(len(o.outputs[0].token_ids) for o in souts)
        sampling = {"sampling_elapsed_s": s_elapsed, "sampling_output_tokens_per_s": s_out / s_elapsed,
                    "sampling_timeline": timeline.summary()}
    # The HF backends run a prefix of the same requests: time that prefix too, for a like-for-like ratio.
    prefix = {}
    if args.hf_num_requests < len(reqs):
        sub = reqs[: args.hf_num_requests]
        t1 = time.perf_counter()
        o = llm.generate(prompts[: len(sub)], params[: len(sub)], use_tqdm=False)
        dt = time.perf_counter() - t1
        prefix = {"prefix_num_requests": len(sub), "prefix_elapsed_s": dt,
                  "prefix_output_tokens_per_s": sum(len(x.outputs[0].token_ids) for x in o) / dt}
    # Batch-1 decode: one request alone, decode rate after its first token.
    one = [{"prompt_token_ids": reqs[0].prompt_token_ids[:128]}]
    p1 = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True, detokenize=False)
    o1 = llm.generate(one, p1, use_tqdm=False)[0]
    m = o1.metrics
    b1 = (len(o1.outputs[0].token_ids) - 1) / (m.last_token_time - m.first_token_time)
    return {"elapsed_s": elapsed, "output_tokens": n_out, "startup_s": startup, "batch1_decode_tok_s": b1,
            "batch1_tpot_ms": 1000.0 / b1, "batch1_ttft_ms": 1000.0 * (m.first_token_time - m.arrival_time),
            "num_compilations_after_warmup": stats.get("num_compilations_after_warmup"),
            "num_preemptions": stats.get("num_preemptions_total"), "padding_waste": stats.get("padding_waste"),
            "num_gpu_blocks": stats.get("num_gpu_blocks"), "timeline": greedy_timeline, **latencies, **sampling,
            **prefix}


def request_latencies(outs) -> dict:
    """TTFT and TPOT of the greedy run's requests, as serve.py defines them (TTFT from arrival to the
    first token; TPOT the time after it over the tokens after it): every request arrives at once, so
    these are the offline counterparts of ``serve.py --request-rate inf``."""
    import numpy as np

    ttft, tpot = [], []
    for o in outs:
        m, n = o.metrics, len(o.outputs[0].token_ids)
        ttft.append(m.first_token_time - m.arrival_time)
        if n > 1:
            tpot.append((m.last_token_time - m.first_token_time) / (n - 1))
    ms = lambda xs, q: 1000.0 * float(np.percentile(xs, q))  # noqa: E731
    return {"median_ttft_ms": ms(ttft, 50), "p99_ttft_ms": ms(ttft, 99),
            "median_tpot_ms": ms(tpot, 50), "p99_tpot_ms": ms(tpot, 99)}


def _hf_model(args, attn_implementation: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(args.model)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn_implementation)
    return model.eval()


def run_hf_static(args, reqs) -> dict:
    """HF generate in static padded batches of ``--hf-batch-size`` (vLLM's "hf" backend)."""
    import torch

    model = _hf_model(args, "sdpa")
    pad = 0
    n_out = 0
    t0 = time.perf_counter()
    for a in range(0, len(reqs), args.hf_batch_size):
        batch = reqs[a : a + args.hf_batch_size]
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):  # left padding
            ids[i, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            mask[i, width - len(r.prompt_token_ids):] = 1
        max_new = max(r.output_len for r in batch)
        with torch.no_grad():
            model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=max_new, min_new_tokens=max_new,
                           do_sample=False, pad_token_id=pad, eos_token_id=None)
        n_out += sum(r.output_len for r in batch)  # tokens the requests asked for; the rest is padding waste
    torch.cuda.synchronize()
    return {"elapsed_s": time.perf_counter() - t0, "output_tokens": n_out}


def run_hf_cb(args, reqs) -> dict:
    """HF transformers' continuous batching (``paged|sdpa``), each request with its own max_new_tokens."""
    import torch
    from transformers import GenerationConfig

    model = _hf_model(args, "paged|sdpa")
    print(f"[hf-cb] model ready; adding {len(reqs)} requests", flush=True)
    gc = GenerationConfig(max_new_tokens=max(r.output_len for r in reqs), do_sample=False, eos_token_id=-1,
                          pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gc)
    manager.start()
    n_out = 0
    t0 = time.perf_counter()
    for i, r in enumerate(reqs):
        try:
            manager.add_request(r.prompt_token_ids, request_id=f"r{i}", max_new_tokens=r.output_len, eos_token_id=-1)
        except TypeError:  # older transformers: no per-request eos argument
            manager.add_request(r.prompt_token_ids, request_id=f"r{i}", max_new_tokens=r.output_len)
    done = 0
    while done < len(reqs):
        res = manager.get_result(timeout=60)
        if res is None:
            raise RuntimeError(f"HF continuous batching stalled after {done} of {len(reqs)} requests")
        # RequestStatus is an IntEnum: str() gives "3", not "FINISHED" (that check skipped every
        # result and made the first GPU run look like a stall).
        status = getattr(res, "status", None)
        if status is not None and getattr(status, "name", "FINISHED") != "FINISHED":
            continue
        done += 1
        n_out += len(res.generated_tokens)
        if done == 1:
            print(f"[hf-cb] first result {type(res).__name__} status={getattr(res, 'status', None)} "
                  f"tokens={len(res.generated_tokens)}", flush=True)
        if done % 10 == 0:
            print(f"[hf-cb] {done}/{len(reqs)} done after {time.perf_counter() - t0:.1f} s", flush=True)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    manager.stop(block=True)
    return {"elapsed_s": elapsed, "output_tokens": n_out}


def print_timeline(timeline: dict, elapsed: float) -> None:
    """Per bucket: steps, ms per step by phase, share of the run's wall time."""
    print(f"\n{'bucket':>7s} {'steps':>6s} {'pad':>5s} | ms/step: {'wall':>6s} {'sched':>6s} {'disp':>6s} "
          f"{'wait':>6s} {'proc':>6s} | share")
    for label, row in timeline.items():
        pad = row["padded_tokens"] / row["tokens"] - 1 if row["tokens"] else 0.0
        print(f"{label:>7s} {int(row['steps']):6d} {pad:5.2f} |          {row['wall_ms_per_step']:6.2f} "
              f"{row['schedule_ms_per_step']:6.2f} {row['dispatch_ms_per_step']:6.2f} {row['wait_ms_per_step']:6.2f} "
              f"{row['process_ms_per_step']:6.2f} | {row['wall'] / elapsed:5.1%}")
    parts = sorted({k[: -len("_ms_per_step")] for row in timeline.values() for k in row
                    if k.startswith("dispatch.") and k.endswith("_ms_per_step")})
    if parts:
        print(f"\n{'bucket':>7s} | dispatch parts, ms/step: " + " ".join(f"{p[len('dispatch.'):]:>10s}" for p in parts))
        for label, row in timeline.items():
            print(f"{label:>7s} |                          " + " ".join(f"{row.get(p + '_ms_per_step', 0.0):10.2f}" for p in parts))


def main() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["jaxpaged", "hf", "hf-cb", "all"], default="jaxpaged")
    ap.add_argument("--model", default=os.path.join(HERE, "configs", "llama-2-7b"))
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--hf-num-requests", type=int, default=200, help="prefix of the same requests for HF backends")
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--attention-backend", default=None)
    ap.add_argument("--async-scheduling", action="store_true", help="schedule step N+1 while step N runs")
    ap.add_argument("--enforce-eager", action="store_true", help="XLA command buffers (CUDA graphs) off")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--also-sampling", action="store_true",
                    help="run the requests again with temperature 0.8, top_p 0.95, top_k 50 on the same engine")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--json", default=None)
    ap.add_argument("--hf-static-num-requests", type=int, default=64, help="prefix for the static-batch HF backend")
    ap.add_argument("--smoke", action="store_true", help="small ceiling measurement (CPU smoke test of the script)")
    ap.add_argument("--tensor-parallel-size", default="1",
                    help="GPUs the model is split over; a comma list (1,2,4,8) runs each in a fresh process")
    args = ap.parse_args()
    if "," in args.tensor_parallel_size:
        return tp_sweep(args)
    if int(args.tensor_parallel_size) > 1 and args.backend != "jaxpaged":
        raise SystemExit("error: the HF backends run on one GPU: use --backend jaxpaged with --tensor-parallel-size > 1")

    if args.backend == "jaxpaged":
        # The engine sizes JAX's memory pool to gpu_memory_utilization when it starts JAX's backend;
        # the ceilings below start it first, so set the same pool here (as a served engine has it).
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{args.gpu_memory_utilization:.3f}")
    if args.enforce_eager:  # before the ceilings below start JAX's backend: the flag is read at start
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
    shape = LlamaShape.from_config(os.path.join(args.model, "config.json"))
    if args.kv_cache_dtype.startswith("fp8"):  # the roofline reads the KV cache at its own width
        shape.kv_dtype_bytes = 1
    reqs = sharegpt_like(args.num_requests, seed=args.seed, max_total=args.max_model_len, vocab_size=shape.vocab)
    results: dict = {"args": vars(args), "mean_prompt": sum(len(r.prompt_token_ids) for r in reqs) / len(reqs),
                     "mean_output": sum(r.output_len for r in reqs) / len(reqs)}
    # Ceilings first: once an engine holds its KV pool there is no room for the copy test.
    ceilings = measure_ceilings_jax(64 << 20, 512) if args.smoke else measure_ceilings_jax()
    print(f"[ceilings] {json.dumps(ceilings)}", flush=True)
    backends = ["jaxpaged", "hf-cb", "hf"] if args.backend == "all" else [args.backend]
    for b in backends:
        subset = {"jaxpaged": reqs, "hf-cb": reqs[: args.hf_num_requests], "hf": reqs[: args.hf_static_num_requests]}[b]
        fn = {"jaxpaged": run_jaxpaged, "hf": run_hf_static, "hf-cb": run_hf_cb}[b]
        r = fn(args, subset)
        n_tok = sum(len(x.prompt_token_ids) + x.output_len for x in subset)
        r.update(num_requests=len(subset), requests_per_s=len(subset) / r["elapsed_s"],
                 output_tokens_per_s=r["output_tokens"] / r["elapsed_s"], total_tokens_per_s=n_tok / r["elapsed_s"])
        results[b] = r
        print(f"[{b}] {json.dumps(r)}", flush=True)
    results["ceilings"] = ceilings
    tp = int(args.tensor_parallel_size)  # N devices: N times one device's ceilings (no communication)
    sim = simulate_ceiling(reqs, shape, tp * ceilings["copy_bytes_per_s"], tp * ceilings["bf16_matmul_flops_per_s"],
                           args.max_num_seqs, args.max_num_batched_tokens)
    results["roofline_output_tokens_per_s"] = sim
    results["batch1_roofline_tok_s"] = tp * ceilings["copy_bytes_per_s"] / shape.weight_bytes
    print(f"\nweights {shape.weight_bytes / 1e9:.2f} GB, KV {shape.kv_bytes_per_token / 1e6:.3f} MB/token; "
          f"copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul {ceilings['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
    print(f"roofline (simulated, same max_num_seqs/budget): {sim:.0f} output tok/s; batch-1 decode roofline "
          f"{results['batch1_roofline_tok_s']:.0f} tok/s")
    print(f"{'backend':10s} {'reqs':>5s} {'req/s':>8s} {'out tok/s':>10s} {'total tok/s':>11s} {'vs roofline':>11s}")
    for b in backends:
        r = results[b]
        print(f"{b:10s} {r['num_requests']:5d} {r['requests_per_s']:8.2f} {r['output_tokens_per_s']:10.0f} "
              f"{r['total_tokens_per_s']:11.0f} {r['output_tokens_per_s'] / sim:10.1%}")
    if "jaxpaged" in results:
        j = results["jaxpaged"]
        print(f"jaxpaged batch-1 decode {j['batch1_decode_tok_s']:.1f} tok/s = "
              f"{j['batch1_decode_tok_s'] / results['batch1_roofline_tok_s']:.1%} of roofline "
              f"(TPOT {j['batch1_tpot_ms']:.2f} ms, TTFT {j['batch1_ttft_ms']:.1f} ms; tp {tp})")
        print(f"jaxpaged all requests at once: TTFT median {j['median_ttft_ms'] / 1000:.1f} s, P99 "
              f"{j['p99_ttft_ms'] / 1000:.1f} s; TPOT median {j['median_tpot_ms']:.1f} ms, P99 {j['p99_tpot_ms']:.1f} ms "
              f"(serve.py's definitions)")
        for b in ("hf-cb", "hf"):
            if b in results:
                print(f"jaxpaged / {b}: {j['output_tokens_per_s'] / results[b]['output_tokens_per_s']:.1f}x output tok/s")
        if "sampling_output_tokens_per_s" in j:
            print(f"jaxpaged sampled (T=0.8, top_p=0.95, top_k=50): {j['sampling_output_tokens_per_s']:.0f} output tok/s "
                  f"= {j['sampling_output_tokens_per_s'] / j['output_tokens_per_s']:.1%} of greedy")
            print_timeline(j["sampling_timeline"], j["sampling_elapsed_s"])
        if "prefix_output_tokens_per_s" in j:
            print(f"jaxpaged on the first {j['prefix_num_requests']} requests (the HF prefix): "
                  f"{j['prefix_output_tokens_per_s']:.0f} output tok/s")
    if "jaxpaged" in results:
        print_timeline(results["jaxpaged"]["timeline"], results["jaxpaged"]["elapsed_s"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def tp_sweep(args) -> None:
    """Runs this benchmark once per tensor-parallel size, each in a fresh process, and tabulates."""
    sizes = [int(x) for x in args.tensor_parallel_size.split(",")]
    argv = [a for a in sys.argv[1:]]
    i = argv.index("--tensor-parallel-size")
    del argv[i : i + 2]
    if "--json" in argv:
        j = argv.index("--json")
        del argv[j : j + 2]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tp in sizes:
            out = os.path.join(tmp, f"tp{tp}.json")
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--tensor-parallel-size", str(tp), "--json", out]
            print(f"[sweep] {' '.join(cmd)}", flush=True)
            proc = subprocess.run(cmd)
            rows[tp] = json.load(open(out)) if proc.returncode == 0 and os.path.exists(out) else {"failed": proc.returncode}
    print(f"\n{'tp':>3s} {'out tok/s':>10s} {'vs roofline':>11s} {'b1 tok/s':>9s} {'TPOT ms':>8s} {'TTFT ms':>8s} "
          f"{'startup s':>9s} {'KV blocks':>9s}")
    for tp, r in rows.items():
        j = r.get("jaxpaged")
        if j is None:
            print(f"{tp:3d} failed ({r.get('failed')})")
            continue
        print(f"{tp:3d} {j['output_tokens_per_s']:10.0f} {j['output_tokens_per_s'] / r['roofline_output_tokens_per_s']:10.1%} "
              f"{j['batch1_decode_tok_s']:9.1f} {j['batch1_tpot_ms']:8.2f} {j['batch1_ttft_ms']:8.1f} "
              f"{j['startup_s']:9.0f} {j['num_gpu_blocks']:9d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(tp): r for tp, r in rows.items()}, f, indent=2)


if __name__ == "__main__":
    main()
