import pytest

from jaxpaged.sampling_params import BeamSearchParams, SamplingParams, SamplingType


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, -1, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs, p.seed) == (16, 0, None, None, None)
    assert p.stop == [] and p.stop_token_ids == [] and p.logit_bias is None
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert p.skip_special_tokens and p.spaces_between_special_tokens and p.detokenize
    assert p.sampling_type == SamplingType.RANDOM


def test_top_k_zero_means_off_as_in_current_vllm():
    assert SamplingParams(top_k=0).top_k == -1 == SamplingParams(top_k=-1).top_k
    assert SamplingParams(top_k=5).top_k == 5


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        ({"n": 0}, "n", "at least 1"),
        ({"n": 1.5}, "n", "integer"),
        ({"temperature": -0.1}, "temperature", "[0, inf)"),
        ({"temperature": float("nan")}, "temperature", "NaN"),
        ({"top_p": 1.5}, "top_p", "(0, 1]"),
        ({"top_p": 0.0}, "top_p", "(0, 1]"),
        ({"top_k": -2}, "top_k", "-1"),
        ({"min_p": -0.1}, "min_p", "[0, 1]"),
        ({"min_p": 1.1}, "min_p", "[0, 1]"),
        ({"max_tokens": 0}, "max_tokens", "at least 1"),
        ({"min_tokens": -1}, "min_tokens", "0"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens", "max_tokens=10"),
        ({"logprobs": -1}, "logprobs", "non-negative"),
        ({"prompt_logprobs": -1}, "prompt_logprobs", "non-negative"),
        ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
        ({"presence_penalty": -2.5}, "presence_penalty", "[-2, 2]"),
        ({"frequency_penalty": -3.0}, "frequency_penalty", "[-2, 2]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty", "(0, inf)"),
        ({"repetition_penalty": -1.0}, "repetition_penalty", "(0, inf)"),
        ({"seed": 1.5}, "seed", "integer"),
        ({"stop": ["ok", ""]}, "stop", "empty"),
        ({"stop": [3]}, "stop", "string"),
        ({"stop": "x", "detokenize": False}, "stop", "detokenize"),
        ({"stop_token_ids": [-1]}, "stop_token_ids", "non-negative"),
        ({"logit_bias": {"a": 1.0}}, "logit_bias", "integer"),
        ({"logit_bias": {-3: 1.0}}, "logit_bias", "non-negative"),
        ({"logit_bias": {3: float("inf")}}, "logit_bias", "finite"),
        ({"logit_bias": {3: "big"}}, "logit_bias", "number"),
        ({"n": 3, "best_of": 2}, "best_of", "greater than or equal to n"),
        ({"best_of": 1.5}, "best_of", "integer"),
        ({"use_beam_search": True}, "temperature", "must be 0 when using beam search"),
        ({"use_beam_search": True, "temperature": 0, "n": 2, "best_of": 3}, "best_of", "beam width"),
        ({"use_beam_search": True, "temperature": 0, "stop": ["x"]}, "stop", "not supported with beam search"),
        ({"use_beam_search": True, "temperature": 0, "min_tokens": 2}, "min_tokens", "not supported"),
        ({"use_beam_search": True, "temperature": 0, "repetition_penalty": 1.2}, "repetition_penalty", "not supported"),
        ({"use_beam_search": True, "temperature": 0, "early_stopping": "always"}, "early_stopping", "'never'"),
        ({"use_beam_search": True, "temperature": 0, "early_stopping": 1}, "early_stopping", "'never'"),
        ({"use_beam_search": True, "temperature": 0, "length_penalty": float("inf")}, "length_penalty", "finite"),
        ({"use_beam_search": 1, "temperature": 0}, "use_beam_search", "boolean"),
        ({"length_penalty": 2.0}, "length_penalty", "only used by beam search"),
        ({"early_stopping": True}, "early_stopping", "only used by beam search"),
    ],
)
def test_invalid_field_raises_value_error_naming_it(kwargs, field, allowed):
    with pytest.raises(ValueError) as excinfo:
        SamplingParams(**kwargs)
    message = str(excinfo.value)
    assert field in message
    assert allowed in message


def test_top_p_message_has_value():
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        SamplingParams(top_p=1.5)


def test_boundaries_are_accepted():
    p = SamplingParams(top_p=1e-6, min_p=1.0, top_k=1, presence_penalty=-2.0, frequency_penalty=2.0,
                       repetition_penalty=1e-3, min_tokens=16, max_tokens=16, logprobs=0)
    assert (p.top_p, p.min_p, p.top_k, p.min_tokens) == (1e-6, 1.0, 1, 16)
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None


def test_stop_normalised_to_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_greedy_resets_truncation_and_sampling_type():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert p.sampling_type == SamplingType.GREEDY
    assert (p.top_p, p.top_k, p.min_p) == (1.0, -1, 0.0)
    assert SamplingParams(temperature=5e-6).sampling_type == SamplingType.GREEDY
    assert SamplingParams(temperature=0.7, seed=1).sampling_type == SamplingType.RANDOM_SEED
    assert SamplingParams(temperature=0.0, seed=1).sampling_type == SamplingType.GREEDY


def test_logit_bias_keys_normalised_to_int():
    p = SamplingParams(logit_bias={"5": 2, 7: -1.5})
    assert p.logit_bias == {5: 2.0, 7: -1.5}


def test_verify_vocab():
    SamplingParams(logit_bias={9: 1.0}, stop_token_ids=[9]).verify_vocab(10)
    with pytest.raises(ValueError, match=r"logit_bias token id must be in \[0, 10\), got 10"):
        SamplingParams(logit_bias={10: 1.0}).verify_vocab(10)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[11]).verify_vocab(10)


def test_all_stop_token_ids_and_generation_config():
    p = SamplingParams(stop_token_ids=[5])
    assert p.all_stop_token_ids == {5}
    p.update_from_generation_config({"eos_token_id": [2, 7]}, model_eos_token_id=2)
    assert p.all_stop_token_ids == {2, 5, 7}
    assert sorted(p.stop_token_ids) == [5, 7]
    q = SamplingParams(ignore_eos=True)
    q.update_from_generation_config({"eos_token_id": 7}, model_eos_token_id=2)
    assert q.all_stop_token_ids == {2, 7} and q.stop_token_ids == []


def test_clone_is_deep():
    p = SamplingParams(stop=["a"], logit_bias={1: 1.0}, stop_token_ids=[3])
    q = p.clone()
    q.stop.append("b")
    q.logit_bias[2] = 1.0
    q.all_stop_token_ids.add(9)
    assert p.stop == ["a"] and p.logit_bias == {1: 1.0} and p.all_stop_token_ids == {3}
    assert p.clone() == p and p.clone() is not p
    assert q.stop == ["a", "b"] and q.all_stop_token_ids == {3, 9}


def test_best_of_and_beam_search_fields():
    p = SamplingParams(n=2, best_of=5)
    assert p.num_seqs == 5 and p.needs_sample_logprobs
    assert not SamplingParams(n=2).needs_sample_logprobs and SamplingParams(n=2).num_seqs == 2
    beam = SamplingParams(n=4, use_beam_search=True, temperature=0.0, length_penalty=0.5, early_stopping="never")
    assert beam.needs_sample_logprobs and beam.num_seqs == 4 and beam.early_stopping == "never"
    bp = BeamSearchParams(beam_width=3, max_tokens=7, ignore_eos=True, length_penalty=1.5)
    sp = bp.to_sampling_params()
    assert (sp.n, sp.use_beam_search, sp.max_tokens, sp.ignore_eos, sp.length_penalty, sp.temperature) == \
        (3, True, 7, True, 1.5, 0.0)
