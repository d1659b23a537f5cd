"""LangChain, which the seed tutorial names, against the running server: ``langchain-openai``'s
``ChatOpenAI`` and ``OpenAI`` (invoke, stream, batch) get the engine's own greedy text."""

import pytest

pytest.importorskip("langchain_openai")
from langchain_openai import ChatOpenAI, OpenAI  # noqa: E402

from jaxpaged import LLM, SamplingParams  # noqa: E402
from tests.helpers.server_harness import Stack  # noqa: E402
from tests.helpers.tiny_checkpoint import make_tiny_checkpoint  # noqa: E402

MAX_TOKENS = 8
QUESTIONS = ["Hello there", "How are you today?", "Tell me about blocks"]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_tiny_checkpoint(str(tmp_path_factory.mktemp("lc")))
    return LLM(model=path, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128, block_size=8)


@pytest.fixture(scope="module")
def base_url(llm):
    stack = Stack(llm.llm_engine)
    server = stack.serve()
    yield server.url + "/v1"
    stack.close()


def _greedy(llm, prompts, chat: bool) -> list[str]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    if chat:
        outs = llm.chat([[{"role": "user", "content": q}] for q in prompts], params, use_tqdm=False)
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def test_chat_openai_invoke_stream_batch(llm, base_url):
    want = _greedy(llm, QUESTIONS, chat=True)
    chat = ChatOpenAI(base_url=base_url, api_key="unused", model="tiny", temperature=0, max_tokens=MAX_TOKENS,
                      max_retries=0, extra_body={"ignore_eos": True})
    reply = chat.invoke(QUESTIONS[0])
    assert reply.content == want[0]
    assert reply.response_metadata["finish_reason"] == "length"
    chunks = list(chat.stream(QUESTIONS[1]))
    assert len(chunks) > 1 and "".join(c.content for c in chunks) == want[1]
    assert [m.content for m in chat.batch(QUESTIONS)] == want


def test_openai_completions_invoke_stream_batch(llm, base_url):
    prompts = ["The quick brown fox", "Paged attention stores", "Once upon a time"]
    want = _greedy(llm, prompts, chat=False)
    completion = OpenAI(base_url=base_url, api_key="unused", model="tiny", temperature=0, max_tokens=MAX_TOKENS,
                        max_retries=0, extra_body={"ignore_eos": True})
    assert completion.invoke(prompts[0]) == want[0]
    pieces = list(completion.stream(prompts[1]))
    assert len(pieces) > 1 and "".join(pieces) == want[1]
    assert completion.batch(prompts) == want
