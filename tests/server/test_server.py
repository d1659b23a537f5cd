"""The OpenAI-compatible server over real HTTP on loopback, on the real engine and a tiny model."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from jaxpaged.engine_args import EngineArgs
from jaxpaged.server.server_tokenizer import ServerTokenizer
from tests.helpers.server_bad_inputs import BAD_INPUTS, CHAT, MAX_MODEL_LEN, C, M, P
from tests.helpers.server_harness import Stack
from tests.helpers.tiny_checkpoint import make_tiny_checkpoint

MAX_NUM_SEQS = 16
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>")
API_KEY = "sk-test-3c1f0e9b7d"
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores the key value cache in fixed size blocks. A scheduler batches requests",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 2048. Once upon a time there was a small model",
    "JAX compiles",
    "The server streams tokens over server-sent events to many clients at once. " * 3,
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from jaxpaged.llm_engine import LLMEngine

    ckpt = make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "ckpt"), max_position_embeddings=MAX_MODEL_LEN)
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=ckpt, dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS, block_size=8,
        num_gpu_blocks_override=40, max_logprobs=5, seed=0))
    stack = Stack(engine)
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def url(stack):
    return stack.serve(max_n=4, max_logprobs=5, max_stop_strings=4, max_prompts_per_request=8,
                       max_request_body_bytes=64 * 1024).url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_completions_with_openai_client(client, stack):
    ids = stack.tokenizer.tokenizer.encode(PROMPTS[1])
    out = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == "tiny" and out.id.startswith("cmpl-")
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 7 and out.usage.total_tokens == len(ids) + 7
    (choice,) = out.choices
    assert choice.finish_reason == "length" and isinstance(choice.text, str)
    # Token-id prompt: the same prompt gives the same greedy text.
    again = client.completions.create(model="tiny-alias", prompt=ids, max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert again.choices[0].text == choice.text and again.usage.prompt_tokens == len(ids)
    # Batch of prompts: one choice per prompt, numbered in order, each the prompt's own greedy text.
    batch = client.completions.create(model="tiny", prompt=[PROMPTS[1], PROMPTS[0]], max_tokens=7, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == choice.text
    assert batch.usage.completion_tokens == 14


def test_completions_logprobs_n_and_echo(client):
    out = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=5, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    specials = set(SPECIAL_TOKENS)  # skipped in the text, shown in tokens (as vLLM does)
    assert "".join(t for t in lp.tokens if t not in specials) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0.0 and 1 <= len(top) <= 4 and top[token] == value
        assert value == max(top.values())  # greedy: the sampled token is the most likely one
    many = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=6, temperature=1.0, n=3, seed=7,
                                     extra_body={"ignore_eos": True})
    assert sorted(c.index for c in many.choices) == [0, 1, 2] and many.usage.completion_tokens == 18
    same = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=6, temperature=1.0, n=3, seed=7,
                                     extra_body={"ignore_eos": True})
    assert [c.text for c in same.choices] == [c.text for c in many.choices]  # seeded: reproducible
    echo = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True,
                                     extra_body={"ignore_eos": True})
    plain = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert echo.choices[0].text == PROMPTS[0] + plain.choices[0].text


def test_best_of_beam_search_and_cached_tokens(client, url, stack):
    kw = dict(model="tiny", prompt=PROMPTS[3], max_tokens=6, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    every = client.completions.create(n=3, logprobs=0, **kw)
    best = max(every.choices, key=lambda c: sum(c.logprobs.token_logprobs))
    chosen = client.completions.create(n=1, best_of=3, **kw)
    assert [c.text for c in chosen.choices] == [best.text] and chosen.choices[0].index == 0
    for body, param in ((dict(n=1, best_of=3, stream=True), "best_of"), (dict(n=2, best_of=1), "best_of"),
                        (dict(n=1, best_of=5), "best_of")):
        r = httpx.post(url + "/v1/completions", json=dict(model="tiny", prompt="Hello", max_tokens=2, **body))
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    # Beam search (vLLM's extra fields): two beams, best (by length-penalised score) first.
    beam = dict(use_beam_search=True, length_penalty=0.8, ignore_eos=True)
    out = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=6, n=2, logprobs=0, extra_body=beam)
    scores = [sum(c.logprobs.token_logprobs) / 6**0.8 for c in out.choices]
    assert [c.index for c in out.choices] == [0, 1] and scores == sorted(scores, reverse=True)
    assert out.choices[0].logprobs.tokens != out.choices[1].logprobs.tokens
    assert all(c.finish_reason == "length" for c in out.choices) and out.usage.completion_tokens == 12
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=6, n=2, stream=True,
                                            extra_body=beam))
    texts = ["".join(ch.text for c in chunks for ch in c.choices if ch.index == i) for i in range(2)]
    assert texts == [c.text for c in out.choices]
    r = httpx.post(url + "/v1/completions", json=dict(model="tiny", prompt="Hi", max_tokens=2, n=2, temperature=0.7,
                                                      use_beam_search=True))
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature", r.text
    # The prefix cache: the same prompt again reports its cached tokens, as OpenAI does.
    long = PROMPTS[5]
    first = client.completions.create(model="tiny", prompt=long, max_tokens=2, temperature=0)
    again = client.completions.create(model="tiny", prompt=long, max_tokens=2, temperature=0)
    assert again.choices[0].text == first.choices[0].text
    assert again.usage.prompt_tokens_details.cached_tokens >= again.usage.prompt_tokens - 8 > 0
    salted = client.completions.create(model="tiny", prompt=long, max_tokens=2, temperature=0,
                                       extra_body={"cache_salt": "tenant-b"})
    assert salted.usage.prompt_tokens_details.cached_tokens == 0
    chat = [{"role": "user", "content": PROMPTS[5]}]
    client.chat.completions.create(model="tiny", messages=chat, max_tokens=2)
    chat_again = client.chat.completions.create(model="tiny", messages=chat, max_tokens=2)
    assert chat_again.usage.prompt_tokens_details.cached_tokens > 0
    metrics = httpx.get(url + "/metrics").text
    hits = [line for line in metrics.splitlines() if line.startswith("jaxpaged:prefix_cache_hits_total")]
    assert hits and float(hits[0].split()[-1]) > 0 and "\njaxpaged:prefix_cache_queries_total{" in metrics


def test_echo_with_logprobs_scores_the_prompt(client, stack):
    """lm-eval's loglikelihood request: echo, max_tokens=0, logprobs. A prompt token's logprob must
    be what the model gave that token when it generated it."""
    ids = stack.tokenizer.tokenizer.encode(PROMPTS[2])
    gen = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, logprobs=1)
    token, logprob = gen.choices[0].logprobs.tokens[0], gen.choices[0].logprobs.token_logprobs[0]
    next_id = stack.tokenizer.tokenizer.convert_tokens_to_ids(stack.tokenizer.tokenizer.tokenize(token))
    assert len(next_id) == 1
    scored_ids = ids + next_id
    for stream in (False, True):
        kwargs = dict(model="tiny", prompt=scored_ids, max_tokens=0, echo=True, logprobs=2, temperature=0)
        if stream:
            chunks = list(client.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].text for c in chunks)
            lp = chunks[0].choices[0].logprobs
        else:
            out = client.completions.create(**kwargs)
            assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(scored_ids)
            text, lp = out.choices[0].text, out.choices[0].logprobs
        assert text == stack.tokenizer.tokenizer.decode(scored_ids)  # the prompt, nothing generated
        assert len(lp.tokens) == len(scored_ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.tokens[-1] == token and abs(lp.token_logprobs[-1] - logprob) < 1e-4
        assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(1 <= len(t) <= 3 for t in lp.top_logprobs[1:])
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_stop_string_cuts_text_in_both_modes(client):
    base = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(base) > 6
    stop = base[3:6]  # occurs in the greedy text: generation must end right before it
    cut = base[: base.index(stop)]
    full = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=24, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True})
    assert full.choices[0].text == cut and full.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=24, temperature=0,
                                            stop=[stop], stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_streaming_completion_with_usage(client):
    kwargs = dict(model="tiny", prompt=PROMPTS[2], max_tokens=9, temperature=0, extra_body={"ignore_eos": True})
    final = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert len({c.id for c in chunks}) == 1
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == final.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in text_chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].usage.prompt_tokens == final.usage.prompt_tokens
    running = list(client.completions.create(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
                                             **kwargs))
    counts = [c.usage.completion_tokens for c in running]
    assert counts == sorted(counts) and counts[-1] == 9 and all(c.usage.prompt_tokens == final.usage.prompt_tokens for c in running)


def test_chat_completions_plain_and_streaming(client, stack):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello world!"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    msg = out.choices[0].message
    assert msg.role == "assistant" and out.choices[0].finish_reason == "length"
    rendered = "<s><|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHello world!<|im_end|>\n<|im_start|>assistant\n"
    assert out.usage.prompt_tokens == len(stack.tokenizer.tokenizer.encode(rendered, add_special_tokens=False))
    content = out.choices[0].logprobs.content
    assert len(content) == 6 and "".join(c.token for c in content if c.token not in SPECIAL_TOKENS) == msg.content
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) == 2
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy picks the top token
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == out.usage.prompt_tokens


def test_models_tokenize_detokenize_metrics_version(url, client, stack):
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-alias"]
    tok = httpx.post(url + "/tokenize", json={"prompt": PROMPTS[1]}).json()
    assert tok["tokens"] == stack.tokenizer.tokenizer.encode(PROMPTS[1]) and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == MAX_MODEL_LEN
    detok = httpx.post(url + "/detokenize", json={"tokens": tok["tokens"][1:]}).json()
    assert detok["prompt"] == PROMPTS[1]
    chat_tok = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat_tok["tokens"][0] == stack.tokenizer.tokenizer.bos_token_id and chat_tok["count"] > 5
    text = httpx.get(url + "/metrics").text
    for name in ("jaxpaged:num_requests_running", "jaxpaged:num_requests_waiting", "jaxpaged:kv_cache_usage_perc",
                 "jaxpaged:num_preemptions_total", "jaxpaged:prompt_tokens_total", "jaxpaged:generation_tokens_total",
                 "jaxpaged:time_to_first_token_seconds_bucket", "jaxpaged:time_per_output_token_seconds_count",
                 "jaxpaged:e2e_request_latency_seconds_sum", "jaxpaged:request_success_total"):
        assert f"\n{name}{{" in text, name
    count = [line for line in text.splitlines() if line.startswith("jaxpaged:e2e_request_latency_seconds_count")]
    assert int(count[0].split()[-1]) >= 10  # the requests of the tests above
    gen = [line for line in text.splitlines() if line.startswith("jaxpaged:generation_tokens_total")]
    assert float(gen[0].split()[-1]) >= 50
    assert httpx.get(url + "/health").status_code == 200
    assert "version" in httpx.get(url + "/version").json()


async def _one_request(http: httpx.AsyncClient, url: str, spec: dict, started: asyncio.Event | None = None) -> dict:
    body = {"model": "tiny", "prompt": spec["prompt"], "max_tokens": spec["max_tokens"], "temperature": 0,
            "ignore_eos": True, "echo": spec["echo"]}
    if not spec["stream"]:
        resp = await http.post(url + "/v1/completions", json=body)
        assert resp.status_code == 200, resp.text
        data = resp.json()
        return {"text": data["choices"][0]["text"], "usage": data["usage"], "finish": data["choices"][0]["finish_reason"],
                "ids": {data["id"]}}
    body.update(stream=True, stream_options={"include_usage": True})
    text, usage, finish, ids, done = [], None, None, set(), False
    async with http.stream("POST", url + "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: ") and not done
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            ids.add(chunk["id"])
            if chunk["choices"]:
                text.append(chunk["choices"][0]["text"])
                if started is not None and chunk["choices"][0]["text"]:
                    started.set()
                finish = chunk["choices"][0]["finish_reason"] or finish
            else:
                usage = chunk["usage"]
    assert done
    return {"text": "".join(text), "usage": usage, "finish": finish, "ids": ids}


def test_concurrent_load_every_request_exact_and_unmixed(url, stack):
    """64 concurrent clients, 512 requests, streaming and not, mixed prompts and lengths."""
    _check_concurrent_load(url, stack)


@pytest.fixture(scope="module")
def async_stack(tmp_path_factory):
    from jaxpaged.llm_engine import LLMEngine

    ckpt = make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "ckpt"), max_position_embeddings=MAX_MODEL_LEN)
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=ckpt, dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS, block_size=8,
        num_gpu_blocks_override=40, max_logprobs=5, seed=0, async_scheduling=True))
    stack = Stack(engine)
    yield stack
    stack.close()


def test_concurrent_load_with_async_scheduling(async_stack):
    """The same load through an engine that schedules a step ahead, then a client that hangs up."""
    url = async_stack.serve(max_n=4, max_logprobs=5, max_stop_strings=4, max_prompts_per_request=8).url
    _check_concurrent_load(url, async_stack)
    _check_disconnect_frees_blocks(url, async_stack)


def _check_concurrent_load(url, stack):
    rng = random.Random(0)
    prompt_lens = {p: len(stack.tokenizer.tokenizer.encode(p)) for p in PROMPTS}
    specs = [{"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(1, 12), "stream": rng.random() < 0.5,
              "echo": rng.random() < 0.5} for _ in range(512)]

    # Two long requests that cannot both fit the pool (2 x 27 blocks of 8 > 40): the second starts
    # once the first has streamed a token, so both run at once for ~200 steps and the scheduler
    # must preempt, whatever pace the 512 other clients keep.
    filler = {"prompt": PROMPTS[1], "max_tokens": 200, "stream": True, "echo": False}

    async def run() -> tuple[list[dict], list[dict]]:
        limits = httpx.Limits(max_connections=66, max_keepalive_connections=66)
        async with httpx.AsyncClient(limits=limits, timeout=120) as http:
            gate = asyncio.Semaphore(64)

            async def guarded(spec):
                async with gate:
                    t0 = time.monotonic()
                    try:
                        return await _one_request(http, url, spec)
                    except httpx.HTTPError as exc:  # reported with its request, below
                        return {"error": f"{type(exc).__name__}: {exc!r} after {time.monotonic() - t0:.2f}s", "spec": spec}

            fillers = []
            for _ in range(2):
                started = asyncio.Event()
                fillers.append(asyncio.ensure_future(_one_request(http, url, filler, started)))
                await asyncio.wait_for(started.wait(), 60)
            results = await asyncio.gather(*(guarded(s) for s in specs))
            return results, await asyncio.gather(*fillers)

    before = stack.wait_idle()
    start = time.monotonic()
    results, fillers = asyncio.run(run())
    assert [f["finish"] for f in fillers] == ["length"] * 2 and fillers[0]["text"] == fillers[1]["text"]
    elapsed = time.monotonic() - start
    errors = [r for r in results if "error" in r]
    assert not errors, (len(errors), errors[:3])
    greedy: dict[tuple[str, int], str] = {}
    for spec, res in zip(specs, results):
        assert len(res["ids"]) == 1  # every chunk of a stream carries that stream's id
        assert res["finish"] == "length"
        assert res["usage"]["completion_tokens"] == spec["max_tokens"]
        assert res["usage"]["prompt_tokens"] == prompt_lens[spec["prompt"]]
        text = res["text"]
        if spec["echo"]:
            assert text.startswith(spec["prompt"])  # a mixed-up response would echo another prompt
            text = text[len(spec["prompt"]):]
        # Greedy: every response for (prompt, max_tokens), streamed or not, is the same text.
        assert greedy.setdefault((spec["prompt"], spec["max_tokens"]), text) == text
    assert len({r for res in results for r in res["ids"]}) == 512  # no id shared between requests
    stats = stack.wait_idle()
    assert stats["kv_cache_usage"] == 0.0 and stats["num_free_blocks"] == stats["num_gpu_blocks"]
    # The fillers forced preemption (recompute), and still nothing was lost or changed. Serving
    # compiled nothing new.
    assert stats["num_preemptions_total"] > before["num_preemptions_total"]
    assert stats["num_compilations"] == before["num_compilations"]
    assert elapsed < 120, f"load test took {elapsed:.1f}s"


def _stream_then_drop(url: str, body: dict, chunks_before_drop: int) -> int:
    got = 0
    with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                got += 1
                if got >= chunks_before_drop:
                    break  # leaving the with-blocks closes the connection mid-stream
    return got


def test_client_disconnect_aborts_and_frees_blocks(url, stack):
    _check_disconnect_frees_blocks(url, stack)


def _check_disconnect_frees_blocks(url, stack):
    long = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 240, "temperature": 0, "ignore_eos": True}
    aborted_before = stack.metrics.success["abort"]
    assert _stream_then_drop(url, dict(long, stream=True), 3) == 3
    # Non-streaming: the client gives up before the answer (240 tokens take ~0.25 s here, async
    # scheduling or not); the server notices and aborts.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=long, timeout=httpx.Timeout(60, read=0.05))
    stats = stack.wait_idle(timeout=30)
    assert stats["kv_cache_usage"] == 0.0 and stats["num_running"] == 0
    assert stack.metrics.success["abort"] == aborted_before + 2, stack.metrics.success
    # and the engine still serves
    ok = httpx.post(url + "/v1/completions", json=dict(long, max_tokens=3))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_api_key(stack, caplog):
    caplog.set_level("INFO")
    server = stack.serve(api_key=API_KEY)
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    assert good.completions.create(model="tiny", prompt="Hello", max_tokens=2).usage.completion_tokens >= 1
    for bad_key in ("wrong", API_KEY[:-1], API_KEY + "x"):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key=bad_key, max_retries=0).models.list()
    for headers in ({}, {"Authorization": API_KEY}, {"Authorization": f"Basic {API_KEY}"}):
        resp = httpx.post(server.url + "/v1/completions", json={"prompt": "x"}, headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    for path in ("/tokenize", "/detokenize"):
        assert httpx.post(server.url + path, json={"prompt": "x"}).status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # open by design
    assert httpx.get(server.url + "/metrics").status_code == 200  # open unless --metrics-require-auth
    locked = stack.serve(api_key=API_KEY, metrics_require_auth=True)
    assert httpx.get(locked.url + "/metrics").status_code == 401
    assert httpx.get(locked.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert "/v1/completions" in caplog.text  # the access log ran ...
    assert API_KEY not in caplog.text  # ... and never wrote the key


def test_bad_inputs_get_openai_errors_and_server_keeps_serving(url, stack):
    assert len(BAD_INPUTS) >= 30
    failures = []
    with httpx.Client(timeout=60) as http:
        for name, path, body, status, param in BAD_INPUTS:
            if isinstance(body, bytes):
                resp = http.post(url + path, content=body, headers={"Content-Type": "application/json"})
            else:
                resp = http.post(url + path, json=body)
            try:
                err = resp.json()["error"]
                ok = (resp.status_code == status and isinstance(err["message"], str) and err["message"]
                      and isinstance(err["type"], str) and "code" in err and (param is None or err["param"] == param))
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                failures.append((name, resp.status_code, resp.text[:300]))
        assert http.get(url + C).status_code == 405
        assert not failures, failures
        ok = http.post(url + C, json=dict(P, max_tokens=3, ignore_eos=True))
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    assert http_ok(url)
    assert stack.wait_idle()["num_running"] == 0


def http_ok(url: str) -> bool:
    return httpx.get(url + "/health").status_code == 200


def test_bounded_waiting_queue_gives_503_and_missing_chat_template_400(stack):
    bare = ServerTokenizer.for_engine(stack.engine.tokenizer)
    bare.tokenizer.chat_template = None
    server = stack.serve(tokenizer=bare, max_waiting_requests=2)
    resp = httpx.post(server.url + CHAT, json=M)
    assert resp.status_code == 400 and "chat template" in resp.json()["error"]["message"]

    async def burst():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as http:
            body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0, "ignore_eos": True}
            return await asyncio.gather(*(http.post(server.url + C, json=body) for _ in range(3 * MAX_NUM_SEQS)))

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    # At least one request had to run for two to wait; all beyond that could be refused.
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 3
    for r in responses:
        if r.status_code == 503:
            assert "max_waiting_requests=2" in r.json()["error"]["message"]
        else:
            assert r.json()["usage"]["completion_tokens"] == 100
    assert 'jaxpaged:request_rejected_total{model_name="tiny",status="503"}' in httpx.get(server.url + "/metrics").text
    bare.close()


def test_server_without_tokenizer_takes_token_ids_only(stack):
    server = stack.serve(tokenizer=None)  # what --skip-tokenizer-init gives
    ids = stack.tokenizer.tokenizer.encode(PROMPTS[1])
    ok = httpx.post(server.url + C, json=dict(P, prompt=ids, max_tokens=3, ignore_eos=True))
    usage = ok.json()["usage"]
    assert ok.status_code == 200 and usage["prompt_tokens"] == len(ids) and usage["completion_tokens"] == 3
    assert usage["total_tokens"] == len(ids) + 3 and 0 <= usage["prompt_tokens_details"]["cached_tokens"] < len(ids)
    for path, body, param in ((C, P, "prompt"), (CHAT, M, "messages"), ("/tokenize", {"prompt": "x"}, "prompt"),
                              ("/detokenize", {"tokens": [1]}, "tokens"), (C, dict(P, prompt=ids, echo=True), "echo")):
        resp = httpx.post(server.url + path, json=body)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, (path, resp.text)
        assert "tokenizer" in resp.json()["error"]["message"]


def test_cli_starts_when_warm_authenticates_and_stops_on_sigint(stack):
    """``python -m jaxpaged.serve`` as a user runs it: the port opens only after warm-up, the key
    (from the environment) guards the API and never reaches the log, SIGINT stops it cleanly."""
    env = dict(os.environ, JAXPAGED_API_KEY=API_KEY, PYTHONPATH=os.getcwd())
    cmd = [sys.executable, "-m", "jaxpaged.serve", "--model", stack.engine.model_path, "--port", "0",
           "--max-model-len", "64", "--max-num-seqs", "2", "--max-num-batched-tokens", "32", "--block-size", "8",
           "--served-model-name", "cli-model", "--log-step-timeline"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "server exited early:\n" + "".join(log)
            log.append(line)
            match = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            if match:
                url = match.group(1)
                break
        text = "".join(log)
        assert "engine ready" in text and "KV blocks" in text and "programs compiled" in text
        assert text.index("engine ready") < text.index("Uvicorn running")  # warm before the port opens
        auth = {"Authorization": f"Bearer {API_KEY}"}
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers=auth).json()["data"][0]["id"] == "cli-model"
        out = httpx.post(url + C, headers=auth, json={"prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
        assert out.json()["usage"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        log.append(rest)
        assert proc.returncode == 0 and "server stopped" in rest
        assert "leaked" not in rest  # the engine process released what it registered (resource_tracker)
        # --log-step-timeline: the engine process logged its steps (the request's decode steps)
        timeline = json.loads(re.search(r"engine step timeline: (\{.*\})", rest).group(1))
        assert sum(b["steps"] for b in timeline["buckets"].values()) >= 3
        assert timeline["num_published_steps"] >= 3
        assert timeline["pack_ms_per_step"] > 0 and timeline["send_ms_per_step"] > 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert API_KEY not in "".join(log)


class StreamInBackground:
    """A streaming request read on a thread; ``started`` is set at the first data chunk."""

    def __init__(self, url: str, max_tokens: int) -> None:
        self.body = {"model": "tiny", "prompt": PROMPTS[1], "temperature": 0, "ignore_eos": True, "stream": True,
                     "max_tokens": max_tokens}
        self.url, self.lines, self.started = url, [], threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        assert self.started.wait(60), "no first chunk"

    def _run(self) -> None:
        with httpx.stream("POST", self.url + C, json=self.body, timeout=60) as resp:
            for line in resp.iter_lines():
                if line:
                    self.lines.append(line)
                    self.started.set()
        self.started.set()

    def join(self) -> list[str]:
        self.thread.join(60)
        return self.lines


def test_oversized_logit_bias_of_issue_13_runs_and_server_stays_healthy(url, stack):
    """65 logit_bias entries used to pass admission and then fail every step (the engine loop died,
    /health answered 503 until a restart). Now it runs; above the cap it is a 400 naming the field."""
    with httpx.Client(timeout=60) as http:
        body = dict(P, max_tokens=4, temperature=0, ignore_eos=True, logit_bias={str(i): 0.5 for i in range(65)})
        resp = http.post(url + C, json=body)
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4
        body = dict(P, max_tokens=4, min_tokens=2, stop_token_ids=list(range(64)),
                    logit_bias={str(i): 0.5 for i in range(300)})
        assert http.post(url + C, json=body).status_code == 200
        resp = http.post(url + C, json=dict(body, logit_bias={str(i): 0.5 for i in range(301)}))
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "logit_bias"
        assert "at most 300" in resp.json()["error"]["message"]
        assert http.get(url + "/health").status_code == 200
    assert stack.async_engine.engine.get_stats()["num_failed_steps_total"] == 0


def test_a_failing_request_gets_an_error_and_the_others_go_on(url, stack, monkeypatch):
    """A step that fails because of one request: that request gets a 500 OpenAI error object (an
    SSE error event when streaming), a request running beside it completes with its exact text,
    and the server stays healthy."""
    runner = stack.engine.runner
    pack = runner._tensors

    def faulty(rows, num_rows, profile):
        if any(r.params.seed == 4242 for r in rows):
            raise RuntimeError("injected packing fault")
        return pack(rows, num_rows, profile)

    canary = dict(P, prompt=PROMPTS[2], max_tokens=40, temperature=0, ignore_eos=True)
    with httpx.Client(timeout=60) as http:
        expected = http.post(url + C, json=canary).json()["choices"][0]["text"]
        monkeypatch.setattr(runner, "_tensors", faulty)
        running = StreamInBackground(url, 120)
        bad = dict(P, temperature=1.0, seed=4242, max_tokens=8)
        resp = http.post(url + C, json=bad)
        err = resp.json()["error"]
        assert resp.status_code == 500 and err["code"] == "engine_step_failed" and "injected packing fault" in err["message"]
        with http.stream("POST", url + CHAT, json=dict(M, temperature=1.0, seed=4242, stream=True)) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.status_code == 200 and lines[-1] == "data: [DONE]"
        assert '"engine_step_failed"' in lines[-2] and "injected packing fault" in lines[-2]
        assert http.post(url + C, json=canary).json()["choices"][0]["text"] == expected
        assert http.get(url + "/health").status_code == 200
    lines = running.join()
    assert lines[-1] == "data: [DONE]" and '"finish_reason":"length"' in lines[-2]
    assert stack.wait_idle()["num_free_blocks"] == stack.engine.num_gpu_blocks


def test_health_reports_a_stalled_loop(stack, monkeypatch):
    """/health is 200 only while the loop keeps coming round: one step running past the bound
    makes it 503 with the reason, and it recovers when the step ends."""
    server = stack.serve()
    stack.async_engine._stall_timeout_s = 0.5
    step = stack.engine.step
    entered = threading.Event()

    def slow_step():
        entered.set()
        time.sleep(2.0)
        return step()

    monkeypatch.setattr(stack.engine, "step", slow_step)
    try:
        result = {}
        worker = threading.Thread(target=lambda: result.update(r=httpx.post(server.url + C, json=dict(P, max_tokens=1), timeout=60)))
        worker.start()
        assert entered.wait(30)
        time.sleep(1.0)
        stalled = httpx.get(server.url + "/health")
        assert stalled.status_code == 503 and stalled.json()["error"]["code"] == "engine_stalled"
        assert "no progress" in stalled.json()["error"]["message"]
        monkeypatch.setattr(stack.engine, "step", step)
        worker.join(60)
        assert result["r"].status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        stack.async_engine._stall_timeout_s = 60.0


_FATAL_SITECUSTOMIZE = '''
import jaxpaged.kv_cache, jaxpaged.llm_engine, jaxpaged.model_runner

def _lose_device(self, *args, **kwargs):
    for k, v in self.kv.caches:
        k.delete(); v.delete()
    raise RuntimeError("injected device loss")

def _no_device(self):
    raise RuntimeError("injected: no device to rebuild the pool on")

_warm_up = jaxpaged.llm_engine.LLMEngine._warm_up

def _warm_up_then_break(self):
    _warm_up(self)  # the device breaks once the engine is serving
    jaxpaged.model_runner.ModelRunner.run_step = _lose_device
    jaxpaged.kv_cache.KVCache.reset = _no_device

jaxpaged.llm_engine.LLMEngine._warm_up = _warm_up_then_break
'''


def test_cli_exits_nonzero_when_the_engine_cannot_recover(stack, tmp_path):
    """A failure the engine cannot recover from (the device and its KV pool lost) ends the engine;
    the server answers the request with an error and exits non-zero, for a supervisor to restart."""
    (tmp_path / "sitecustomize.py").write_text(_FATAL_SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.getcwd()}")
    cmd = [sys.executable, "-m", "jaxpaged.serve", "--model", stack.engine.model_path, "--port", "0",
           "--max-model-len", "64", "--max-num-seqs", "2", "--max-num-batched-tokens", "32", "--block-size", "8"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "server exited early:\n" + "".join(log)
            log.append(line)
            match = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            if match:
                break
        resp = httpx.post(match.group(1) + C, json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
        assert resp.status_code in (500, 503) and "error" in resp.json()
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode not in (0, None), rest
        assert "the engine died" in rest and "injected device loss" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_shutdown_drains_then_aborts_and_dead_loop_fails_health(stack, url, monkeypatch):
    """Runs last: takes the engine loop down. Shutdown lets in-flight requests finish within its
    timeout and aborts the rest with an in-band error; afterwards /health and new requests get 503."""
    from jaxpaged.server.async_engine import AsyncEngine

    running = [StreamInBackground(url, 4), StreamInBackground(url, 40)]
    stack.async_engine.shutdown(timeout=60.0)  # drain: both were in flight and both finish
    for stream in running:
        lines = stream.join()
        assert lines[-1] == "data: [DONE]" and '"finish_reason":"length"' in lines[-2]
    assert not stack.engine.has_unfinished_requests()
    health = httpx.get(url + "/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
    assert httpx.post(url + C, json=P).status_code == 503

    stack.async_engine = AsyncEngine(stack.engine, stack.metrics)  # a new loop on the same engine
    stack.async_engine.start()
    url = stack.serve().url
    long = StreamInBackground(url, 240)
    stack.async_engine.shutdown(timeout=0.0)  # no drain time: aborted, told so in-band
    lines = long.join()
    assert lines[-1] == "data: [DONE]" and '"error"' in lines[-2] and "shutting down" in lines[-2]
    assert len(lines) < 240 and not stack.engine.has_unfinished_requests()

    # A loop that dies (the engine raises inside step) fails /health and the requests it held.
    def broken_step():
        raise RuntimeError("injected device failure")

    monkeypatch.setattr(stack.engine, "step", broken_step)
    stack.async_engine = AsyncEngine(stack.engine, stack.metrics)
    stack.async_engine.start()
    url = stack.serve().url
    resp = httpx.post(url + C, json=P, timeout=30)
    assert resp.status_code == 503 and "injected device failure" in resp.json()["error"]["message"]
    health = httpx.get(url + "/health")
    assert health.status_code == 503 and "injected device failure" in health.json()["error"]["message"]


def test_the_open_files_limit_is_raised_within_the_hard_limit():
    """The server (and serve.py) raise the soft open-files limit: a client per socket."""
    import resource

    from jaxpaged.server.process_limits import raise_open_files_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"hard open-files limit {hard} leaves no room to test")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert raise_open_files_limit(target=1000) == 1000 == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raise_open_files_limit(target=500) == 1000  # never lowered
        if hard != resource.RLIM_INFINITY:
            assert raise_open_files_limit(target=hard + 1) == hard  # capped by the hard limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
