"""Online serving benchmark against a running ``python -m jaxpaged.serve`` (or any OpenAI-compatible
server that accepts vLLM's ``ignore_eos``), shaped like ``vllm bench serve``.

Requests arrive as a Poisson process at ``--request-rate`` (``inf``: all at once), optionally
capped at ``--max-concurrency`` in flight. Prompt and output lengths are drawn from log-normal
distributions with a fixed seed (ShareGPT-like: mean prompt ~150, mean output ~300 tokens by
default); prompts are random token ids so the input length is exact, and ``ignore_eos`` with
``max_tokens`` makes the output length exact. Each request streams (SSE) so time to first token
(TTFT), time per output token (TPOT, excluding the first) and inter-token latency (ITL) are
measured at the client.

    python benchmarks/serve.py --base-url http://127.0.0.1:8000 --num-prompts 1000 --request-rate 16
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import sys
import time

import httpx
import numpy as np

from benchmarks.common import sharegpt_like
from jaxpaged.server.process_limits import raise_open_files_limit


@dataclasses.dataclass
class RequestResult:
    prompt_len: int
    output_len: int  # tokens the server reported (usage.completion_tokens)
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    start: float = 0.0
    error: str = ""


GOODPUT_METRICS = ("ttft", "tpot", "e2el")


def parse_goodput(pairs: list[str] | None) -> dict[str, float]:
    """vLLM's ``--goodput``: service-level objectives as "KEY:VALUE" pairs, in milliseconds, KEY one
    of ttft, tpot (per output token after the first), e2el (whole request)."""
    slos = {}
    for pair in pairs or []:
        key, sep, value = pair.partition(":")
        try:
            ms = float(value) if sep and key in GOODPUT_METRICS else float("nan")
        except ValueError:
            ms = float("nan")
        if not ms > 0:
            raise ValueError(f"--goodput {pair!r}: expected KEY:VALUE with KEY one of {', '.join(GOODPUT_METRICS)} "
                             "and VALUE a positive number of milliseconds")
        slos[key] = ms
    return slos


def tpot_seconds(r: RequestResult) -> float:
    """Seconds per output token after the first (0 for a one-token output)."""
    return (r.latency - r.ttft) / (r.output_len - 1) if r.output_len > 1 else 0.0


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    """Whether a successful request met every objective (a one-token output's TPOT counts as 0)."""
    got = {"ttft": r.ttft, "tpot": tpot_seconds(r), "e2el": r.latency}
    return all(1000 * got[k] <= v for k, v in slos.items())


def lognormal_lengths(rng: np.random.Generator, n: int, mean: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    mu = math.log(mean) - sigma**2 / 2  # so that the (unclipped) mean is ``mean``
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), lo, hi).astype(int)


def make_workload(args: argparse.Namespace) -> list[tuple[list[int], int]]:
    if args.dataset == "sharegpt-like":  # throughput.py's requests (same seed): online vs offline, like for like
        reqs = sharegpt_like(args.num_prompts, seed=args.seed, vocab_size=args.vocab_size, max_total=args.max_model_len)
        return [(r.prompt_token_ids, r.output_len) for r in reqs]
    rng = np.random.default_rng(args.seed)
    prompt_lens = lognormal_lengths(rng, args.num_prompts, args.prompt_len_mean, args.prompt_len_sigma, 4, args.max_prompt_len)
    output_lens = lognormal_lengths(rng, args.num_prompts, args.output_len_mean, args.output_len_sigma, 1, args.max_output_len)
    return [(rng.integers(args.min_token_id, args.max_token_id, p).tolist(), int(o)) for p, o in zip(prompt_lens, output_lens)]


async def one_request(http: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    result = RequestResult(prompt_len=len(prompt), output_len=0, ok=False, start=time.perf_counter())
    last = result.start
    try:
        async with http.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                now = time.perf_counter()
                if chunk.get("choices"):
                    if result.ttft == 0.0:
                        result.ttft = now - result.start
                    else:
                        result.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
        result.latency = time.perf_counter() - result.start
        result.ok = result.output_len > 0
        if not result.ok:
            result.error = "no usage chunk"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        # where in the stream it broke tells a refused connection from a response cut short
        result.error = (f"{type(exc).__name__}: {exc} (after {len(result.itl) + (result.ttft > 0)} chunks, "
                        f"{time.perf_counter() - result.start:.1f} s)")
    return result


async def run(args: argparse.Namespace) -> tuple[list[RequestResult], float, list[tuple[float, int]]]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = args.max_concurrency or args.num_prompts
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=None,
                                 limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit)) as http:
        model = args.model or (await http.get("/v1/models")).json()["data"][0]["id"]
        workload = make_workload(args)
        rng = np.random.default_rng(args.seed + 1)
        gate = asyncio.Semaphore(limit)
        in_flight = 0
        concurrency: list[tuple[float, int]] = []

        async def guarded(prompt: list[int], max_tokens: int) -> RequestResult:
            nonlocal in_flight
            async with gate:
                in_flight += 1
                concurrency.append((time.perf_counter(), in_flight))
                try:
                    return await one_request(http, "/v1/completions", model, prompt, max_tokens)
                finally:
                    in_flight -= 1

        start = time.perf_counter()
        tasks = []
        for prompt, max_tokens in workload:
            tasks.append(asyncio.create_task(guarded(prompt, max_tokens)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start, concurrency


def summarize(args: argparse.Namespace, results: list[RequestResult], duration: float,
              concurrency: list[tuple[float, int]]) -> dict:
    ok = [r for r in results if r.ok]
    ms = lambda xs, q: float(np.percentile(xs, q) * 1000) if len(xs) else float("nan")  # noqa: E731
    mean = lambda xs: float(np.mean(xs) * 1000) if len(xs) else float("nan")  # noqa: E731
    ttfts = [r.ttft for r in ok]
    tpots = [tpot_seconds(r) for r in ok if r.output_len > 1]
    itls = [x for r in ok for x in r.itl]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    # Peak output throughput: tokens per 1-second window, counted at the chunks' arrival times.
    stamps = sorted(t for r in ok for t in [r.start + r.ttft] + list(r.start + r.ttft + np.cumsum(r.itl)))
    peak = 0
    if stamps:
        base = stamps[0]
        peak = int(np.bincount(((np.asarray(stamps) - base)).astype(int)).max())
    return {
        "successful_requests": len(ok), "failed_requests": len(results) - len(ok),
        "max_concurrency": args.max_concurrency, "request_rate": args.request_rate, "duration_s": duration,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration, "output_throughput": total_out / duration,
        "peak_output_throughput": peak, "peak_concurrent_requests": max((c for _, c in concurrency), default=0),
        "total_token_throughput": (total_in + total_out) / duration,
        "mean_ttft_ms": mean(ttfts), "median_ttft_ms": ms(ttfts, 50), "p99_ttft_ms": ms(ttfts, 99),
        "mean_tpot_ms": mean(tpots), "median_tpot_ms": ms(tpots, 50), "p99_tpot_ms": ms(tpots, 99),
        "mean_itl_ms": mean(itls), "median_itl_ms": ms(itls, 50), "p99_itl_ms": ms(itls, 99),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        **goodput(args, ok, duration),
    }


def goodput(args: argparse.Namespace, ok: list[RequestResult], duration: float) -> dict:
    """Requests a second that met every ``--goodput`` objective (vLLM's request_goodput)."""
    slos = getattr(args, "goodput_slos", None)
    if not slos:
        return {}
    good = sum(meets_slos(r, slos) for r in ok)
    return {"goodput_slos_ms": slos, "good_requests": good, "request_goodput": good / duration}


def print_report(s: dict) -> None:
    row = lambda k, v: print(f"{k:<40}{v}")  # noqa: E731
    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="))
    row("Successful requests:", s["successful_requests"])
    row("Failed requests:", s["failed_requests"])
    row("Maximum request concurrency:", s["max_concurrency"])
    row("Request rate configured (RPS):", f"{s['request_rate']:.2f}")
    row("Benchmark duration (s):", f"{s['duration_s']:.2f}")
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", f"{s['request_throughput']:.2f}")
    row("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}")
    row("Peak output token throughput (tok/s):", f"{s['peak_output_throughput']:.2f}")
    row("Peak concurrent requests:", f"{s['peak_concurrent_requests']:.2f}")
    row("Total Token throughput (tok/s):", f"{s['total_token_throughput']:.2f}")
    if "request_goodput" in s:
        row("Request goodput (req/s):", f"{s['request_goodput']:.2f}")
    for title, key, name in (("Time to First Token", "ttft", "TTFT"),
                             ("Time per Output Token (excl. 1st token)", "tpot", "TPOT"),
                             ("Inter-token Latency", "itl", "ITL")):
        print("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        row(f"Mean {name} (ms):", f"{s[f'mean_{key}_ms']:.2f}")
        row(f"Median {name} (ms):", f"{s[f'median_{key}_ms']:.2f}")
        row(f"P99 {name} (ms):", f"{s[f'p99_{key}_ms']:.2f}")
    print("=" * 50)
    for err in s["errors"]:
        print("error:", err)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--api-key", default=os.environ.get("JAXPAGED_API_KEY"))
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", choices=["lognormal", "sharegpt-like"], default="lognormal",
                   help="lognormal: the --prompt-len/--output-len options below; sharegpt-like: "
                        "benchmarks/throughput.py's requests (--seed, --vocab-size, --max-model-len)")
    p.add_argument("--vocab-size", type=int, default=32000, help="sharegpt-like: token ids in [100, vocab - 100)")
    p.add_argument("--max-model-len", type=int, default=2048, help="sharegpt-like: prompt + output cap")
    p.add_argument("--prompt-len-mean", type=float, default=150.0)
    p.add_argument("--prompt-len-sigma", type=float, default=0.8)
    p.add_argument("--max-prompt-len", type=int, default=1024)
    p.add_argument("--output-len-mean", type=float, default=300.0)
    p.add_argument("--output-len-sigma", type=float, default=0.8)
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--min-token-id", type=int, default=10)
    p.add_argument("--max-token-id", type=int, default=1000, help="prompt token ids are drawn from [min, max)")
    p.add_argument("--result-json", default=None, help="also write the numbers here")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:VALUE",
                   help="service-level objectives in ms (vLLM's): ttft, tpot, e2el, e.g. ttft:500 tpot:50; "
                        "reports request_goodput, the requests a second that met all of them")
    args = p.parse_args(argv)
    try:
        args.goodput_slos = parse_goodput(args.goodput)
    except ValueError as e:
        p.error(str(e))
    open_files = raise_open_files_limit()  # one socket per request in flight
    if open_files < (args.max_concurrency or args.num_prompts) + 64:
        print(f"warning: open files limit {open_files} is below the requests in flight", file=sys.stderr)
    results, duration, concurrency = asyncio.run(run(args))
    summary = summarize(args, results, duration, concurrency)
    summary["open_files_limit"] = open_files
    print_report(summary)
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["failed_requests"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
