"""How much an fp8 KV cache changes a trained model's outputs (``kv_cache_dtype="fp8"`` vs "auto").

    PYTHONPATH=. python3 benchmarks/kv_cache_quality.py --json /tmp/kvq.json          # CPU: default model, float32
    PYTHONPATH=. python3 benchmarks/kv_cache_quality.py --dtype bfloat16 --json $OUT/kvq.json   # GPU

On the default model (SmolLM2-135M-Instruct, trained) with fixed chat prompts: greedy agreement
(the fraction of generated tokens equal to the full-precision cache's, and how many tokens agree
before the first difference), and the mean |Δ logprob| of teacher-forced prompt tokens (each
prompt's own tokens scored through the cache: the cache's precision alone moves these). The same
engine settings otherwise; the model's weights in ``--dtype``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?",
    "Write a haiku about the sea.", "What is 12 times 12?", "Give me a tip for learning to cook.",
    "Why is the sky blue?", "Translate 'good morning' into Spanish.", "Explain what a CPU cache is.",
    "List four planets of the solar system.", "What does a paged KV cache store?", "Describe a cat in one sentence.",
]


def run(kv_cache_dtype: str, args) -> tuple[list[list[int]], list[np.ndarray]]:
    from jaxpaged import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, kv_cache_dtype=kv_cache_dtype, max_num_seqs=len(QUESTIONS),
              max_model_len=512, max_num_batched_tokens=512)
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                                             add_generation_prompt=True)} for q in QUESTIONS]
    for p in prompts:
        ids = p["prompt_token_ids"]
        p["prompt_token_ids"] = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, prompt_logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outs]
    plps = [np.asarray([lp[t].logprob for lp, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])]) for o in outs]
    return tokens, plps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded default model")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-cache-dtype", default="fp8")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    base_tokens, base_lp = run("auto", args)
    tokens, lp = run(args.kv_cache_dtype, args)
    same = [np.mean(np.asarray(a[: len(b)]) == np.asarray(b[: len(a)])) for a, b in zip(base_tokens, tokens)]
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
              for a, b in zip(base_tokens, tokens)]
    dlp = np.concatenate([np.abs(a - b) for a, b in zip(base_lp, lp)])
    result = {"args": vars(args), "num_prompts": len(QUESTIONS),
              "greedy_token_agreement": float(np.mean(same)), "identical_outputs": int(sum(a == b for a, b in zip(base_tokens, tokens))),
              "mean_agreeing_prefix_tokens": float(np.mean(prefix)),
              "prompt_logprob_mean_abs_diff": float(dlp.mean()), "prompt_logprob_max_abs_diff": float(dlp.max()),
              "num_prompt_tokens_scored": int(dlp.size)}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
