"""Process 0 of the two-process test (tests/engine/test_multihost.py): builds the engine from the
JSON engine arguments in argv[1], generates greedily for the prompts in argv[2], and prints one JSON
line with the token ids and the engine's stats. The other process runs ``python -m jaxpaged.worker``."""

import json
import sys

from jaxpaged import LLM, SamplingParams


def main() -> None:
    engine_kw, prompts = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    llm = LLM(**engine_kw)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=1, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    result = {
        "tokens": [o.outputs[0].token_ids for o in outs],
        "logprobs": [[d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs],
        "stats": llm.get_stats(),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
