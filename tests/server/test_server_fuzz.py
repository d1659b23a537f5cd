"""Fuzzing the HTTP API (hypothesis, seeded and bounded, so CI runs the same bodies every time).

Random bodies for ``/v1/completions`` and ``/v1/chat/completions`` are drawn field by field from
the request schema: in-range values, edges, and out-of-range ones (wrong types, huge and negative
numbers, huge dicts and lists, unicode, empty strings and lists, token-id prompts). While each body
is served, a canary request runs beside it. After every body:
  - the answer is a 200, or a 4xx carrying the OpenAI error object - never a 5xx, never a hang;
  - a 200 stream ends with ``[DONE]`` and carries no error event (admission refuses, steps don't fail);
  - the canary completes with its exact greedy text;
and at the end the engine holds no request and no block, compiled nothing new and failed no step.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxpaged.engine_args import EngineArgs
from tests.helpers.server_harness import Stack
from tests.helpers.tiny_checkpoint import make_tiny_checkpoint

MAX_MODEL_LEN = 128
NUM_BODIES = 200  # per endpoint
BODY_TIMEOUT_S = 60.0
CANARY = {"model": "tiny", "prompt": "Paged attention stores the key value cache", "max_tokens": 12,
          "temperature": 0, "ignore_eos": True}
RAN = {"completions": 0, "chat": 0, "status": {}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from jaxpaged.llm_engine import LLMEngine

    ckpt = make_tiny_checkpoint(str(tmp_path_factory.mktemp("fuzz") / "ckpt"), max_position_embeddings=MAX_MODEL_LEN)
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=ckpt, dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=8, max_num_batched_tokens=64,
        block_size=8, num_gpu_blocks_override=40, max_logprobs=5, seed=0))
    stack = Stack(engine)
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def server(stack):
    url = stack.serve(max_n=4, max_logprobs=5, max_stop_strings=4, max_prompts_per_request=4,
                      max_request_body_bytes=256 * 1024).url
    expected = httpx.post(url + "/v1/completions", json=CANARY, timeout=BODY_TIMEOUT_S).json()["choices"][0]["text"]
    stats = stack.wait_idle()
    return url, expected, stats


# ---- values ---------------------------------------------------------------------------------------
_TEXT = st.text(st.characters(codec="utf-8"), max_size=40)
_WORD = st.text(st.characters(codec="utf-8"), min_size=1, max_size=24)
_JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
    _TEXT, st.lists(st.integers(-5, 10**6), max_size=6), st.dictionaries(_TEXT, st.integers(), max_size=3),
)


def _field(valid, *edges):
    """(in-range values, out-of-range ones: the field's edges and anything at all)."""
    return valid, (st.one_of(st.sampled_from(edges), _JUNK) if edges else _JUNK)


_TOKEN_IDS = st.lists(st.integers(0, 300), min_size=1, max_size=24)
_TOKEN_KEY = st.one_of(st.integers(0, 320).map(str), st.integers(-5, 10**7).map(str),
                       st.sampled_from(["", " 7", "-0", "1e3", "\u00b2", "\u0663", "12abc", "99999999999999999999"]))
SAMPLING_FIELDS = {
    "model": _field(st.just("tiny"), "tiny-alias", "", "gpt-17"),
    "n": _field(st.integers(1, 3), 0, 4, 5, -1, 2**63, 10**30),
    "temperature": _field(st.floats(0, 2), -1.0, 0.0, 1e-6, 1e308, 5e-324),
    "top_p": _field(st.floats(0.01, 1.0), 0.0, 1.0, 1.5, -0.1),
    "top_k": _field(st.integers(-1, 50), 0, -2, 10**12, 2**31),
    "min_p": _field(st.floats(0, 1), 1.0, -0.5, 2.0),
    "seed": _field(st.integers(-2**63, 2**63 - 1), 2**63, -2**63 - 1, 2**64 + 5),
    "stop": _field(st.one_of(_WORD, st.lists(_WORD, max_size=4)), "", [""], ["a"] * 50),
    "stream": _field(st.booleans()),
    "stream_options": _field(st.fixed_dictionaries({}, optional={"include_usage": st.booleans(),
                                                                 "continuous_usage_stats": st.booleans()})),
    "presence_penalty": _field(st.floats(-2, 2), 2.0, -2.0, 3.0, 1e300),
    "frequency_penalty": _field(st.floats(-2, 2), -2.0, 2.5),
    "repetition_penalty": _field(st.floats(0.5, 2), 0.0, -1.0, 1e300),
    "logit_bias": _field(st.dictionaries(_TOKEN_KEY, st.floats(-150, 150), max_size=8),
                         {str(i): 1.0 for i in range(65)}, {str(i): -1.0 for i in range(300)},
                         {str(i): 1.0 for i in range(301)}, {str(10**6): 1.0}),
    "user": _field(_TEXT),
    "ignore_eos": _field(st.booleans()),
    "min_tokens": _field(st.integers(0, 4), -1, 10**9),
    "stop_token_ids": _field(st.lists(st.integers(0, 320), max_size=8), list(range(64)), list(range(65)), [-1],
                             [10**12]),
    "include_stop_str_in_output": _field(st.booleans()),
    "skip_special_tokens": _field(st.booleans()),
    "spaces_between_special_tokens": _field(st.booleans()),
    "use_beam_search": _field(st.booleans(), "yes"),
    "length_penalty": _field(st.floats(-2, 2), 1e300, "x"),
    "early_stopping": _field(st.sampled_from([False, True, "never"]), "always", 1),
    "cache_salt": _field(st.one_of(st.none(), _WORD), "", 7),
}
COMPLETION_FIELDS = dict(SAMPLING_FIELDS, **{
    "prompt": _field(st.one_of(_WORD, _TOKEN_IDS, st.lists(_WORD, min_size=1, max_size=3),
                               st.lists(_TOKEN_IDS, min_size=1, max_size=3)),
                     "", [], [[]], [""], [0], [10**9], ["a"] * 5, "x" * 2000),
    "max_tokens": _field(st.integers(1, 16), 0, MAX_MODEL_LEN, 10**9, -5, None),
    "logprobs": _field(st.integers(0, 5), 6, -1, 10**6),
    "echo": _field(st.booleans()),
    "suffix": _field(st.none(), "tail"),
    "best_of": _field(st.one_of(st.none(), st.integers(1, 4)), 0, 5, -1, 2**40),
})
_CONTENT = st.one_of(_WORD, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _WORD}),
                                     min_size=1, max_size=2))
_MESSAGES = st.tuples(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": _CONTENT}),
             max_size=2),
    st.fixed_dictionaries({"role": st.just("user"), "content": _CONTENT}),
).map(lambda t: t[0] + [t[1]])
_BAD_MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["wizard", "", "tool", "developer", "user"]), "content": _JUNK}),
    st.fixed_dictionaries({"role": st.just("user"), "content": st.just([{"type": "image_url", "image_url": {"url": "x"}}])}),
    _JUNK,
)
CHAT_FIELDS = dict(SAMPLING_FIELDS, **{
    "messages": (_MESSAGES, st.one_of(st.lists(st.one_of(_BAD_MESSAGE, _BAD_MESSAGE), min_size=1, max_size=3),
                                      st.sampled_from([[], [{"role": "user"}], [{"role": "user", "content": "hi " * 300}]]),
                                      _JUNK)),
    "max_tokens": _field(st.integers(1, 16), 0, 10**9, -5),
    "max_completion_tokens": _field(st.integers(1, 16), 0, -1, 10**9),
    "logprobs": _field(st.booleans()),
    "top_logprobs": _field(st.integers(0, 5), 6, -1),
    "tools": _field(st.none(), [], [{"type": "function", "function": {"name": "f"}}]),
    "tool_choice": _field(st.none(), "none", "auto", {"type": "function"}),
    "response_format": _field(st.sampled_from([None, {"type": "text"}]), {"type": "json_object"}, {"type": ["x"]}),
    "add_generation_prompt": _field(st.booleans()),
    "continue_final_message": _field(st.just(False), True),
    "chat_template_kwargs": _field(st.dictionaries(_WORD, _WORD, max_size=3), {"messages": 5}),
})


@st.composite
def _bodies(draw, fields: dict, required: str) -> dict:
    """A third of the bodies in range, a third in range but for one field, a third anything."""
    mode = draw(st.sampled_from(["valid", "one_bad", "any"]))
    names = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=8))
    if required not in names and (mode != "any" or draw(st.booleans())):
        names.append(required)
    body = {name: draw(fields[name][0] if mode != "any" else st.one_of(*fields[name])) for name in names}
    if mode == "one_bad":
        name = draw(st.sampled_from(names))
        body[name] = draw(fields[name][1])
    return body


# ---- the invariant -------------------------------------------------------------------------------
def _check_answer(status: int, raw: bytes, streamed: bool) -> None:
    assert status < 500, (status, raw[:500])
    if status != 200:
        assert 400 <= status < 500, status
        err = json.loads(raw)["error"]
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
        assert "param" in err and "code" in err
        return
    if streamed:
        lines = [line for line in raw.decode().split("\n") if line]
        assert lines[-1] == "data: [DONE]", lines[-3:]
        for line in lines[:-1]:
            chunk = json.loads(line[len("data: "):])
            assert "error" not in chunk, chunk
    else:
        assert json.loads(raw)["choices"], raw[:500]


async def _serve_one(url: str, path: str, body: dict, expected: str) -> int:
    async with httpx.AsyncClient(timeout=BODY_TIMEOUT_S) as http:
        canary = asyncio.ensure_future(http.post(url + "/v1/completions", json=CANARY))
        content = json.dumps(body, allow_nan=False).encode()
        resp = await http.post(url + path, content=content, headers={"Content-Type": "application/json"})
        _check_answer(resp.status_code, resp.content, resp.headers.get("content-type", "").startswith("text/event-stream"))
        got = await canary
        assert got.status_code == 200 and got.json()["choices"][0]["text"] == expected
        return resp.status_code


def _run_body(server, path: str, body: dict, kind: str) -> None:
    url, expected, _ = server
    status = asyncio.run(asyncio.wait_for(_serve_one(url, path, body, expected), 2 * BODY_TIMEOUT_S))
    RAN[kind] += 1
    RAN["status"][status] = RAN["status"].get(status, 0) + 1


_SETTINGS = settings(max_examples=NUM_BODIES, derandomize=True, database=None, deadline=None, print_blob=True,
                     suppress_health_check=list(HealthCheck))


@_SETTINGS
@given(body=_bodies(COMPLETION_FIELDS, "prompt"))
def test_fuzz_completions(server, body):
    _run_body(server, "/v1/completions", body, "completions")


@_SETTINGS
@given(body=_bodies(CHAT_FIELDS, "messages"))
def test_fuzz_chat_completions(server, body):
    _run_body(server, "/v1/chat/completions", body, "chat")


def test_engine_after_fuzzing(server, stack):
    """Runs after the two fuzz tests: nothing left behind, nothing compiled, no step failed."""
    _, _, before = server
    stats = stack.wait_idle()
    print(f"fuzzed bodies: {RAN}")
    assert RAN["completions"] >= NUM_BODIES and RAN["chat"] >= NUM_BODIES
    assert len(RAN["status"]) >= 2  # both accepted and refused bodies were drawn
    assert stats["num_free_blocks"] == stats["num_gpu_blocks"] and stats["num_running"] == 0
    assert stats["num_compilations"] == before["num_compilations"]
    assert stats["num_failed_steps_total"] == 0
    assert httpx.get(server[0] + "/health").status_code == 200
