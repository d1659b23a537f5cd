"""Admission is the only place a request can be refused: every limit a step relies on is checked by
``SamplingParams`` / ``LLMEngine.add_request`` with a ValueError naming the field and the allowed
range, and a request that passes admission at the edge of every limit runs to the end."""

import pytest

from jaxpaged import LLM, SamplingParams
from jaxpaged.sampling_params import MAX_SEED, MIN_SEED
from tests.helpers.tiny_checkpoint import make_tiny_checkpoint

MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    ckpt = make_tiny_checkpoint(str(tmp_path_factory.mktemp("admission") / "tiny"), max_position_embeddings=MAX_MODEL_LEN)
    return LLM(ckpt, dtype="float32", max_num_seqs=4, max_num_batched_tokens=32, block_size=4,
               num_gpu_blocks_override=48, max_logprobs=3, max_logit_bias=100, max_stop_token_ids=8)


def _refused(llm, params=None, prompt="Hello world", match=""):
    engine = llm.llm_engine
    with pytest.raises(ValueError, match=match):
        engine.add_request("refused", prompt, params)
    assert not engine.has_unfinished_requests()  # nothing was kept


@pytest.mark.parametrize("kwargs, match", [
    ({"logit_bias": {i: 1.0 for i in range(101)}}, r"^logit_bias may hold at most 100 entries"),
    ({"stop_token_ids": list(range(9))}, r"^stop_token_ids may hold at most 8 ids"),
    ({"logprobs": 4}, r"^logprobs must be <= max_logprobs \(3\)"),
    ({"prompt_logprobs": 4}, r"^prompt_logprobs must be <= max_logprobs \(3\)"),
    ({"logit_bias": {10**6: 1.0}}, r"^logit_bias token id must be in \[0, "),
    ({"stop_token_ids": [10**6]}, r"^stop_token_ids token id must be in \[0, "),
    ({"n": 5}, r"^n \(5\) must be <= max_num_seqs \(4\)"),
    ({"n": 4, "max_tokens": 60, "ignore_eos": True}, r"needs up to 64 KV blocks"),
])
def test_engine_caps_refused_at_admission(llm, kwargs, match):
    _refused(llm, SamplingParams(**kwargs), match=match)


@pytest.mark.parametrize("kwargs, match", [
    ({"seed": MAX_SEED + 1}, r"^seed must be in \[-9223372036854775808, 9223372036854775807\]"),
    ({"seed": MIN_SEED - 1}, r"^seed must be in"),
    ({"seed": True}, r"^seed must be an integer"),
    ({"top_p": 0.0}, r"^top_p must be in \(0, 1\]"),
    ({"temperature": float("inf")}, r"^temperature must be in \[0, inf\)"),
    ({"logit_bias": {3: float("nan")}}, r"^logit_bias\[3\] must not be NaN"),
    ({"stop": [""]}, r"^stop cannot contain an empty string"),
])
def test_sampling_params_ranges(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_prompt_checks(llm):
    _refused(llm, prompt="", match=r"^prompt must not be empty")
    _refused(llm, prompt=[], match=r"^prompt must not be empty")
    _refused(llm, prompt=[1, 10**6], match=r"^prompt_token_ids contains 1000000, outside the vocabulary")
    _refused(llm, prompt=[5] * (MAX_MODEL_LEN + 1), match=r"^prompt is 65 tokens long, more than max_model_len \(64\)")
    _refused(llm, prompt={"neither": 1}, match=r"^prompt dict must have")
    _refused(llm, prompt=[1, True], match=r"^prompt_token_ids must be a list of integers")


def test_params_mutated_after_construction_are_checked_and_copied(llm):
    """The request checks (and keeps) its own copy: fields assigned after __init__ cannot slip a
    bad value past admission, nor change a running request."""
    params = SamplingParams(temperature=0.0, max_tokens=4)
    params.top_p = 5.0
    _refused(llm, params, match=r"^top_p must be in \(0, 1\]")
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine = llm.llm_engine
    engine.add_request("copied", "Hello world", params)
    params.max_tokens = 1000
    params.logit_bias = {i: 1.0 for i in range(1000)}
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert len(outs[-1].outputs[0].token_ids) == 4 and outs[-1].outputs[0].finish_reason == "length"


def test_requests_at_every_edge_run_to_the_end(llm):
    """The widest request admission lets through (bias width, bans under min_tokens, logprobs,
    seeds at both ends of the range) runs beside plain ones; the 65-entry logit_bias that used to
    fail a step (issue #13) is one of them. Nothing compiles while they run."""
    vocab = llm.llm_engine.vocab_size
    eos = llm.llm_engine.eos_token_id
    widest = SamplingParams(temperature=0.9, top_k=5, max_tokens=8, min_tokens=6, seed=MAX_SEED, logprobs=3,
                            prompt_logprobs=3, presence_penalty=0.5,
                            stop_token_ids=[vocab - 1 - i for i in range(8)],
                            logit_bias={i: -0.5 for i in range(100)})
    params = [
        SamplingParams(temperature=0.0, max_tokens=8, logit_bias={i: 0.25 for i in range(65)}),
        widest,
        SamplingParams(temperature=1.0, max_tokens=8, seed=MIN_SEED, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
    ]
    before = llm.get_stats()["num_compilations"]
    outs = llm.generate(["Hello world"] * len(params), params, use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outs].count("error") == 0
    assert all(o.finished and o.outputs[0].token_ids for o in outs)
    # min_tokens banned EOS and the stop ids until 6 tokens were out
    first6 = outs[1].outputs[0].token_ids[:6]
    assert eos not in first6 and not set(first6) & set(widest.stop_token_ids)
    assert len(outs[1].outputs[0].logprobs) == len(outs[1].outputs[0].token_ids)
    stats = llm.get_stats()
    assert stats["num_compilations"] == before and stats["num_failed_steps_total"] == 0
    assert stats["num_free_blocks"] == stats["num_gpu_blocks"]
