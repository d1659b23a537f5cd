"""Shared pieces of the benchmarks: synthetic ShareGPT-like request lengths, device ceilings
measured in the same run, and roofline arithmetic for a Llama-shaped model."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time

import numpy as np


LLAMA_7B_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "llama-2-7b")


def llama_config_dir(tiny: bool) -> str:
    """A directory holding the Llama-2-7B config.json (``load_format="dummy"`` needs nothing else),
    or with ``tiny`` the same architecture at 2 layers of width 64 and a 1,000-token vocabulary:
    the host profilers' CPU model, whose device step costs little beside the host's work."""
    if not tiny:
        return LLAMA_7B_CONFIG_DIR
    with open(os.path.join(LLAMA_7B_CONFIG_DIR, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=1000)
    d = tempfile.mkdtemp()
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    return d


@dataclasses.dataclass
class SyntheticRequest:
    prompt_token_ids: list[int]
    output_len: int


def sharegpt_like(num_requests: int, seed: int = 0, mean_prompt: float = 160.0, mean_output: float = 340.0,
                  sigma: float = 0.9, vocab_size: int = 32000, max_total: int = 2048) -> list[SyntheticRequest]:
    """Log-normal prompt/output lengths with the given means (fixed seed), random token ids."""
    rng = np.random.default_rng(seed)

    def lognormal(mean: float) -> np.ndarray:
        mu = math.log(mean) - sigma**2 / 2
        return np.maximum(4, rng.lognormal(mu, sigma, num_requests).round().astype(int))

    prompts, outputs = lognormal(mean_prompt), lognormal(mean_output)
    reqs = []
    for p, o in zip(prompts, outputs):
        p = int(min(p, max_total // 2))
        o = int(min(o, max_total - p))
        reqs.append(SyntheticRequest(rng.integers(100, vocab_size - 100, p).tolist(), o))
    return reqs


def median_call_seconds(fn, *args, iters: int = 20, calls: int = 1) -> float:
    """Median seconds of one ``fn(*args)`` after a first (compiling) call: ``iters`` timings of
    ``calls`` calls in a row, each waited for at its end."""
    import jax

    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(calls)])
        ts.append((time.perf_counter() - t0) / calls)
    return float(np.median(ts))


def measure_ceilings_jax(nbytes: int = 4 << 30, n: int = 8192) -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate, via JAX."""
    import jax
    import jax.numpy as jnp

    bench = median_call_seconds
    x = jax.random.normal(jax.random.PRNGKey(0), (nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0000001)  # forces a full read + write (a plain copy may be elided)
    t = bench(copy, x)
    bw = 2 * x.nbytes / t
    del x
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda p, q: p @ q)
    t = bench(mm, a, b)
    return {"copy_bytes_per_s": bw, "bf16_matmul_flops_per_s": 2 * n**3 / t}


@dataclasses.dataclass
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    dtype_bytes: int = 2
    kv_dtype_bytes: int = 2  # 1 for an fp8 KV cache

    @classmethod
    def from_config(cls, path: str, dtype_bytes: int = 2) -> "LlamaShape":
        c = json.load(open(path))
        return cls(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"],
                   c.get("num_key_value_heads", c["num_attention_heads"]), c["vocab_size"], dtype_bytes)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def num_params(self) -> int:
        h, i, L, v = self.hidden, self.intermediate, self.layers, self.vocab
        attn = h * h * 2 + 2 * h * self.kv_heads * self.head_dim
        return L * (attn + 3 * h * i + 2 * h) + 2 * v * h + h

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_dtype_bytes

    def step_cost(self, num_tokens: int, context_tokens: int) -> tuple[float, float]:
        """(bytes, flops) of one step computing ``num_tokens`` that attend to ``context_tokens`` keys in total."""
        nbytes = self.weight_bytes + context_tokens * self.kv_bytes_per_token + num_tokens * self.kv_bytes_per_token
        flops = 2 * self.num_params * num_tokens + 4 * self.layers * self.hidden * context_tokens
        return nbytes, flops


def simulate_ceiling(reqs: list[SyntheticRequest], shape: LlamaShape, bw: float, flops_rate: float,
                     max_num_seqs: int, max_num_batched_tokens: int) -> float:
    """Output tokens/s of an ideal continuous-batching engine whose every step costs
    max(bytes / bw, flops / flops_rate), with the same max_num_seqs and per-step token budget
    (FCFS admission, decodes first, prompts in chunks)."""
    pending = [(len(r.prompt_token_ids), r.output_len) for r in reqs]
    running: list[list[int]] = []  # [prompt tokens left, tokens in the KV cache, output tokens left]
    total_time, out_tokens, i = 0.0, 0, 0
    while i < len(pending) or running:
        while i < len(pending) and len(running) < max_num_seqs:
            running.append([pending[i][0], 0, pending[i][1]])
            i += 1
        budget = max_num_batched_tokens
        tokens = ctx = 0
        step_q = []
        for r in running:  # decodes first, then prompt chunks
            q = 1 if r[0] == 0 else 0
            step_q.append(q)
        for j, r in enumerate(running):
            if r[0] > 0:
                step_q[j] = min(r[0], max(0, budget - sum(step_q)))
        for j, r in enumerate(running):
            q = step_q[j]
            if q == 0:
                continue
            tokens += q
            ctx += r[1] * q + q * (q + 1) // 2
            r[1] += q
            if r[0] > 0:
                r[0] -= q
                if r[0] == 0:
                    r[2] -= 1
                    out_tokens += 1
            else:
                r[2] -= 1
                out_tokens += 1
        nbytes, flops = shape.step_cost(tokens, ctx)
        total_time += max(nbytes / bw, flops / flops_rate)
        running = [r for r in running if r[2] > 0]
    return out_tokens / total_time
