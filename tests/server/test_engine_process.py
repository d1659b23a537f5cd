"""The engine in a process of its own (``EngineProcessClient``, the CLI's default): the same
responses as the engine on a thread, and the same containment when a request, or the engine
process itself, fails."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
import pytest

from jaxpaged.engine_args import EngineArgs
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.server.api_server import create_app
from jaxpaged.server.engine_client import EngineDeadError, RequestAbortedError
from jaxpaged.server.engine_process_client import EngineProcessClient
from jaxpaged.server.metrics import ServerMetrics
from jaxpaged.server.server_config import ModelInfo, ServerConfig
from jaxpaged.server.server_tokenizer import ServerTokenizer
from tests.helpers.server_harness import LiveServer, Stack
from tests.helpers.tiny_checkpoint import make_tiny_checkpoint

C, CHAT = "/v1/completions", "/v1/chat/completions"
POISON_SEED = 4242  # the engine process's packing fails for requests with this seed (below)
_FAULT_SITECUSTOMIZE = f'''
import jaxpaged.model_runner

_tensors = jaxpaged.model_runner.ModelRunner._tensors

def _faulty(self, rows, num_rows, profile):
    if any(r.params.seed == {POISON_SEED} for r in rows):
        raise RuntimeError("injected packing fault")
    return _tensors(self, rows, num_rows, profile)

jaxpaged.model_runner.ModelRunner._tensors = _faulty
'''
BODIES = [  # (path, body): greedy, seeded n>1 with logprobs, stop strings, chat, streaming, beam search
    (C, {"prompt": "The quick brown fox jumps over the lazy dog.", "max_tokens": 12, "temperature": 0,
         "ignore_eos": True, "logprobs": 2}),
    (C, {"prompt": "Paged attention stores blocks", "max_tokens": 8, "temperature": 1.0, "n": 3, "seed": 7,
         "ignore_eos": True, "logprobs": 1}),
    (C, {"prompt": ["Hello", "JAX compiles"], "max_tokens": 10, "temperature": 0, "stop": ["e", "a"]}),
    (CHAT, {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 9, "temperature": 0,
            "ignore_eos": True}),
    (C, {"prompt": "Numbers: 0 1 2 3", "max_tokens": 7, "temperature": 0, "ignore_eos": True, "stream": True,
         "stream_options": {"include_usage": True}}),
    (C, {"prompt": "Once upon a time", "max_tokens": 5, "n": 2, "use_beam_search": True, "ignore_eos": True}),
]


def engine_args(ckpt: str) -> EngineArgs:
    return EngineArgs(model=ckpt, dtype="float32", max_model_len=128, max_num_seqs=8, block_size=8,
                      num_gpu_blocks_override=64, max_logprobs=5, seed=0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny") / "ckpt"), max_position_embeddings=128)


@pytest.fixture(scope="module")
def proc(ckpt, tmp_path_factory):
    """A launched client whose engine process carries the packing fault for ``POISON_SEED``."""
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(_FAULT_SITECUSTOMIZE)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = f"{site}{os.pathsep}{os.getcwd()}"  # read by the spawned process only
    try:
        client = EngineProcessClient(engine_args(ckpt), ServerMetrics("tiny"), idle_poll_s=0.2).launch(timeout=300)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    client.start()
    tokenizer = ServerTokenizer.for_engine(client.info["tokenizer"])
    app = create_app(client, tokenizer, ServerConfig(served_model_names=("tiny",)), client.info["model_info"],
                     client.metrics)
    server = LiveServer(app).start()
    yield client, server.url
    server.stop()
    client.shutdown(timeout=0.0)
    tokenizer.close()


def normalized(resp: httpx.Response) -> object:
    """The response without what differs between any two calls (ids, timestamps)."""
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        return [normalized_json(line) for line in resp.text.splitlines() if line.strip()]
    return normalized_json(resp.json())


def normalized_json(value: object) -> object:
    if isinstance(value, str) and value.startswith("data: {"):
        import json

        return normalized_json(json.loads(value[6:]))
    if isinstance(value, dict):
        return {k: normalized_json(v) for k, v in value.items() if k not in ("id", "created")}
    if isinstance(value, list):
        return [normalized_json(v) for v in value]
    return value


def test_same_responses_as_the_engine_on_a_thread(proc, ckpt):
    """Every kind of request gets byte-for-byte the response the thread client gives (ids and
    timestamps aside), and the process reports the engine's own model facts and stats."""
    from jaxpaged.llm_engine import LLMEngine

    client, url = proc
    stack = Stack(LLMEngine.from_engine_args(engine_args(ckpt)))
    try:
        thread_url = stack.serve().url
        assert client.info["model_info"] == ModelInfo.for_engine(stack.engine)
        for path, body in BODIES:
            body = dict(body, model="tiny")
            with httpx.Client(timeout=120) as http:
                by_process, by_thread = http.post(url + path, json=body), http.post(thread_url + path, json=body)
            assert by_process.status_code == by_thread.status_code == 200, (by_process.text, by_thread.text)
            assert normalized(by_process) == normalized(by_thread), body
        info = client.info
        assert info["model_info"].max_model_len == 128 and info["model_info"].vocab_size == stack.engine.vocab_size
        assert info["max_num_seqs"] == 8 and info["stats"]["num_gpu_blocks"] == 64
        stats = client.stats()
        assert stats["num_running"] == stats["num_waiting"] == 0 and stats["num_free_blocks"] == 64
        assert stats["num_compilations_after_warmup"] == 0
    finally:
        stack.close()


def test_bad_input_is_the_engines_value_error_at_admission(proc):
    """A request the engine refuses comes back across the pipe as the engine's ValueError."""
    client, _ = proc

    async def add(prompt):
        return await client.add_request("bad-1", prompt, SamplingParams(max_tokens=2))

    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, "):
        asyncio.run(add({"prompt_token_ids": [1, 10**6]}))
    with pytest.raises(ValueError, match="prompt must not be empty"):
        asyncio.run(add({"prompt_token_ids": []}))
    assert client.num_in_flight() == 0 and client.health_problem is None


def test_a_failing_request_gets_an_error_and_the_others_go_on(proc):
    """A step that fails on one request (the injected packing fault) fails that request with a 500
    naming the fault; the request beside it completes with its exact text; the engine stays up."""
    client, url = proc
    canary = {"model": "tiny", "prompt": "Paged attention", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    with httpx.Client(timeout=120) as http:
        expected = http.post(url + C, json=canary).json()["choices"][0]["text"]
        result = {}
        beside = threading.Thread(target=lambda: result.update(r=http.post(url + C, json=canary)))
        beside.start()
        bad = http.post(url + C, json={"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 1.0,
                                       "seed": POISON_SEED})
        beside.join(120)
        assert bad.status_code == 500 and bad.json()["error"]["code"] == "engine_step_failed"
        assert "injected packing fault" in bad.json()["error"]["message"]
        assert result["r"].json()["choices"][0]["text"] == expected
        assert http.get(url + "/health").status_code == 200
    assert client.stats()["num_failed_steps_total"] >= 1


def test_idle_heartbeats_keep_health_and_metrics_fresh(proc):
    """An idle engine process still reports every ``idle_poll_s``: /health stays 200 past a stall
    bound shorter than the idle time, and /metrics shows the engine's counters."""
    client, url = proc
    old, client._stall_timeout_s = client._stall_timeout_s, 1.0
    try:
        time.sleep(2.0)
        assert client.health_problem is None and httpx.get(url + "/health").status_code == 200
    finally:
        client._stall_timeout_s = old
    text = httpx.get(url + "/metrics").text
    assert 'jaxpaged:num_gpu_blocks{model_name="tiny"} 64' in text
    assert 'jaxpaged:num_compilations_after_warmup_total{model_name="tiny"} 0' in text


def test_a_killed_engine_process_fails_its_requests_and_health(ckpt):
    """SIGKILL of the engine process: the request it held gets EngineDeadError, on_dead runs once,
    /health's reason names the exit, new requests are refused."""
    died = []
    client = EngineProcessClient(engine_args(ckpt), on_dead=died.append).launch(timeout=300)
    client.start()

    async def scenario():
        stream = await client.add_request("long", "Hello", SamplingParams(max_tokens=100, ignore_eos=True, temperature=0))
        first = await stream.__aiter__().__anext__()
        assert first.outputs and first.outputs[0].token_ids
        os.kill(client._proc.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="exited unexpectedly"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await client.add_request("after", "Hello", SamplingParams(max_tokens=2))

    asyncio.run(scenario())
    assert len(died) == 1 and "exit code -9" in str(died[0])
    assert "exited unexpectedly" in client.health_problem and client.died_of is died[0]
    client.shutdown(timeout=0.0)


def test_shutdown_aborts_in_flight_requests_and_the_process_exits(ckpt):
    """shutdown(timeout=0): the running request is aborted in-band, the engine process exits 0
    and is not reported as a death."""
    died = []
    client = EngineProcessClient(engine_args(ckpt), on_dead=died.append).launch(timeout=300)
    client.start()

    async def scenario():
        stream = await client.add_request("long", "Hello", SamplingParams(max_tokens=120, ignore_eos=True))
        await stream.__aiter__().__anext__()
        await asyncio.get_running_loop().run_in_executor(None, client.shutdown, 0.0)
        with pytest.raises(RequestAbortedError, match="shutting down"):
            async for _ in stream:
                pass

    asyncio.run(scenario())
    assert client._proc.exitcode == 0 and not died and client.died_of is None
    assert client.dead_reason == "the engine process is not running"
