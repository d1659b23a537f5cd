"""The bad-input table for tests/test_server.py: (name, path, body, expected status, expected param).

Written against the caps the test server is started with (max_n=4, max_logprobs=5,
max_stop_strings=4, max_prompts_per_request=8, a 64 KiB body limit) and MAX_MODEL_LEN tokens of context.
"""

MAX_MODEL_LEN = 256
PROMPT = "The quick brown fox jumps over the lazy dog."

C, CHAT = "/v1/completions", "/v1/chat/completions"
P = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
M = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 40  # > MAX_MODEL_LEN tokens
BAD_INPUTS = [  # (name, path, body: dict | bytes, status, param)
    ("malformed json", C, b'{"prompt": "x",', 400, None),
    ("invalid utf-8", C, b'{"prompt": "\xff\xfe"}', 400, None),
    ("json array body", C, b"[1, 2]", 400, None),
    ("empty body", C, b"", 400, None),
    ("NaN literal", C, b'{"prompt": "x", "temperature": NaN}', 400, None),
    ("nested too deep", C, b"[" * 30000 + b"]" * 30000, 400, None),
    ("missing prompt", C, {"model": "tiny"}, 400, "prompt"),
    ("missing messages", CHAT, {"model": "tiny"}, 400, "messages"),
    ("empty messages", CHAT, dict(M, messages=[]), 400, "messages"),
    ("bad role", CHAT, dict(M, messages=[{"role": "wizard", "content": "x"}]), 400, "messages"),
    ("image content part", CHAT, dict(M, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "messages"),
    ("prompt wrong type", C, dict(P, prompt=123), 400, "prompt"),
    ("mixed prompt list", C, dict(P, prompt=["a", 1]), 400, "prompt"),
    ("max_tokens as string", C, dict(P, max_tokens="5"), 400, "max_tokens"),
    ("ignore_eos as string", C, dict(P, ignore_eos="yes"), 400, "ignore_eos"),
    ("seed as string", C, dict(P, seed="abc"), 400, "seed"),
    ("temperature < 0", C, dict(P, temperature=-1), 400, "temperature"),
    ("top_p = 0", C, dict(P, top_p=0), 400, "top_p"),
    ("top_p > 1", CHAT, dict(M, top_p=1.5), 400, "top_p"),
    ("top_k = -2", C, dict(P, top_k=-2), 400, "top_k"),
    ("min_p > 1", C, dict(P, min_p=2.0), 400, "min_p"),
    ("presence_penalty > 2", C, dict(P, presence_penalty=3), 400, "presence_penalty"),
    ("frequency_penalty < -2", CHAT, dict(M, frequency_penalty=-3), 400, "frequency_penalty"),
    ("repetition_penalty = 0", C, dict(P, repetition_penalty=0), 400, "repetition_penalty"),
    ("max_tokens = 0", C, dict(P, max_tokens=0), 400, "max_tokens"),
    ("max_completion_tokens < 0", CHAT, dict(M, max_tokens=None, max_completion_tokens=-5), 400, "max_completion_tokens"),
    ("min_tokens > max_tokens", C, dict(P, min_tokens=5), 400, "min_tokens"),
    ("n = 0", C, dict(P, n=0), 400, "n"),
    ("n over cap", CHAT, dict(M, n=5), 400, "n"),
    ("logprobs over cap", C, dict(P, logprobs=6), 400, "logprobs"),
    ("logprobs < 0", C, dict(P, logprobs=-1), 400, "logprobs"),
    ("top_logprobs over cap", CHAT, dict(M, logprobs=True, top_logprobs=6), 400, "top_logprobs"),
    ("top_logprobs without logprobs", CHAT, dict(M, top_logprobs=2), 400, "top_logprobs"),
    ("too many stop strings", C, dict(P, stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("empty stop string", C, dict(P, stop=[""]), 400, "stop"),
    ("negative stop_token_ids", C, dict(P, stop_token_ids=[-1]), 400, "stop_token_ids"),
    ("logit_bias non-id key", C, dict(P, logit_bias={"abc": 1.0}), 400, "logit_bias"),
    ("logit_bias out of range", C, dict(P, logit_bias={"5": 200.0}), 400, "logit_bias"),
    ("unknown model", C, dict(P, model="gpt-17"), 404, "model"),
    ("unknown model (chat)", CHAT, dict(M, model="gpt-17"), 404, "model"),
    ("empty prompt", C, dict(P, prompt=""), 400, "prompt"),
    ("empty token prompt", C, dict(P, prompt=[]), 400, "prompt"),
    ("token id out of vocab", C, dict(P, prompt=[1, 10**6]), 400, "prompt"),
    ("prompt longer than context", C, dict(P, prompt=LONG_TEXT), 400, "prompt"),
    ("prompt + max_tokens over context", C, dict(P, prompt=PROMPT, max_tokens=MAX_MODEL_LEN), 400, "max_tokens"),
    ("chat longer than context", CHAT, dict(M, messages=[{"role": "user", "content": LONG_TEXT}]), 400, "messages"),
    ("too many prompts", C, dict(P, prompt=["a"] * 9), 400, "prompt"),
    ("stream_options without stream", C, dict(P, stream_options={"include_usage": True}), 400, "stream_options"),
    ("max_tokens = 0 without echo", C, dict(P, max_tokens=0), 400, "max_tokens"),
    ("tools", CHAT, dict(M, tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("body over size cap", C, dict(P, prompt="x" * 70000), 413, None),
    ("tokenize with neither", "/tokenize", {"model": "tiny"}, 400, "prompt"),
    ("detokenize bad id", "/detokenize", {"tokens": [10**7]}, 400, "tokens"),
    ("unknown route", "/v1/embeddings", P, 404, None),
]
