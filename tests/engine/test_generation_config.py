"""``generation_config.json`` as vLLM uses it: its sampling fields are the defaults of requests that
set none (offline and in the server, where max_new_tokens also caps every request), and every id
in its ``eos_token_id`` list ends generation. One engine for the module, on a tiny checkpoint whose
file lists, besides the tokenizer's EOS, a token the greedy continuation is known to produce."""

import json
import os

import httpx
import pytest
import torch

from jaxpaged import LLM, SamplingParams
from jaxpaged.generation_config import load_generation_config
from tests.helpers.parity_helpers import torch_reference
from tests.helpers.server_harness import Stack
from tests.helpers.tiny_checkpoint import make_tiny_checkpoint

PROMPT = "The quick brown fox"
MAX_NEW = 6
GEN_FIELDS = {"temperature": 0.0, "top_k": 0, "top_p": 0.9, "repetition_penalty": 1.0, "max_new_tokens": MAX_NEW}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint dir, greedy reference tokens, index of the token listed as an extra EOS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_checkpoint(str(tmp_path_factory.mktemp("gen")))
    tok = AutoTokenizer.from_pretrained(path)
    ref, _ = torch_reference(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
                             list(tok(PROMPT).input_ids), 12)
    # the first token from the third on that did not occur earlier ends the continuation
    k = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i] and ref[i] != tok.eos_token_id)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(dict(GEN_FIELDS, eos_token_id=[tok.eos_token_id, ref[k]], bos_token_id=tok.bos_token_id), f)
    return path, ref, k


@pytest.fixture(scope="module")
def llm(setup):
    return LLM(model=setup[0], max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, block_size=8)


def test_every_eos_id_in_the_list_stops_generation(llm, setup):
    _, ref, k = setup
    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[: k + 1] and out.finish_reason == "stop" and out.stop_reason == ref[k]
    assert out.text == llm.get_tokenizer().decode(ref[:k], skip_special_tokens=True)
    full = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert full[0].outputs[0].token_ids == ref
    held = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, min_tokens=k + 2), use_tqdm=False)
    assert held[0].outputs[0].token_ids[:k] == ref[:k] and held[0].outputs[0].token_ids[k] != ref[k]
    assert len(held[0].outputs[0].token_ids) >= k + 2


def test_offline_defaults_come_from_the_file(llm, setup):
    _, ref, k = setup
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.top_p, defaults.max_tokens) == (0.0, -1, 1.0, MAX_NEW)
    out = llm.generate([PROMPT], use_tqdm=False)[0].outputs[0]  # no SamplingParams: the file's
    assert out.token_ids == ref[: min(k + 1, MAX_NEW)]
    explicit = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert len(explicit[0].outputs[0].token_ids) == 12  # an explicit SamplingParams is taken as given


def test_server_defaults_and_max_new_tokens_cap(llm, setup):
    _, ref, k = setup
    engine = llm.llm_engine
    stack = Stack(engine)
    try:
        from jaxpaged.server.server_config import ModelInfo

        assert ModelInfo("x", 1, 1).default_sampling_params == {}
        server = stack.serve()
        url = server.url
        body = {"prompt": PROMPT, "max_tokens": 12, "ignore_eos": True}
        first = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        again = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        # no temperature given: the file's 0.0 (greedy); max_tokens 12 capped at max_new_tokens
        assert first["usage"]["completion_tokens"] == MAX_NEW
        assert first["choices"][0]["text"] == again["choices"][0]["text"]
        assert first["choices"][0]["text"] == llm.get_tokenizer().decode(ref[:MAX_NEW], skip_special_tokens=True)
        chat = httpx.post(url + "/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True}).json()
        assert chat["usage"]["completion_tokens"] == MAX_NEW
    finally:
        stack.close()


def test_generation_config_modes(setup, tmp_path):
    path, ref, k = setup
    auto = load_generation_config("auto", path)
    assert auto.default_sampling_params == {"temperature": 0.0, "top_k": 0, "top_p": 0.9,
                                            "repetition_penalty": 1.0, "max_tokens": MAX_NEW}
    vllm = load_generation_config("vllm", path)
    assert vllm.default_sampling_params == {} and vllm.eos_token_ids == auto.eos_token_ids
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "eos_token_id": 5}))
    other = load_generation_config(str(tmp_path), path)
    assert other.default_sampling_params == {"temperature": 0.7} and other.eos_token_ids == [5]
    assert load_generation_config("auto", str(tmp_path / "absent")).default_sampling_params == {}
    with pytest.raises(ValueError, match=r"generation_config must be one of \('auto', 'vllm'\) or a folder"):
        load_generation_config("nonsense", path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="generation_config must be 'auto', 'vllm' or a folder holding"):
        load_generation_config(str(tmp_path / "empty"), path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(ValueError, match=r"generation_config: .* invalid defaults \(temperature must be"):
        load_generation_config(str(tmp_path), path)
