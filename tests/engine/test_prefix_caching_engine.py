"""Prefix caching end to end on the tiny model: the same greedy tokens and logprobs with it on and
off - shared system prompts, multi-turn chats, chunked prefill resuming inside a cached prefix,
preemption in both modes, n > 1 and prompt logprobs - with hits counted, cached tokens reported,
and nothing compiled after warm-up."""

import numpy as np
import pytest

from jaxpaged import LLM, SamplingParams
from tests.helpers.tiny_checkpoint import make_tiny_checkpoint

NEW = 12
TOL = 2e-5  # float32: a hit reads K/V that another step computed (other shapes, other rounding)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("prefix") / "tiny"))


@pytest.fixture(scope="module")
def prompts():
    """Two system prompts (35 and 21 tokens) shared by several requests, a second chat turn that
    extends a first one, and unrelated prompts."""
    rng = np.random.default_rng(11)
    sys_a, sys_b = rng.integers(5, 300, 35).tolist(), rng.integers(5, 300, 21).tolist()
    turn1 = sys_b + rng.integers(5, 300, 6).tolist()
    out = [sys_a + rng.integers(5, 300, n).tolist() for n in (3, 9, 1, 14)]
    out += [sys_b + rng.integers(5, 300, n).tolist() for n in (2, 7)]
    out += [turn1, turn1 + rng.integers(5, 300, 12).tolist(), rng.integers(5, 300, 17).tolist(), sys_a]
    return out


def _llm(ckpt, caching, **kw):
    args = dict(dtype="float32", max_num_seqs=6, max_num_batched_tokens=16, block_size=4) | kw
    return LLM(ckpt, enable_prefix_caching=caching, **args)


@pytest.fixture(scope="module")
def llm_off(ckpt):
    return _llm(ckpt, False)


@pytest.fixture(scope="module")
def llm_on(ckpt, reference):
    # Built after the reference engine: the compilation counter sees the whole process.
    return _llm(ckpt, True)


def _run(llm, prompts, **params):
    p = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, logprobs=3, **params)
    outs = llm.generate([{"prompt_token_ids": x} for x in prompts], p, use_tqdm=False)
    return outs


def _assert_same(outs, ref):
    for o, r in zip(outs, ref):
        assert [c.token_ids for c in o.outputs] == [c.token_ids for c in r.outputs]
        for c, rc in zip(o.outputs, r.outputs):
            for got, want in zip(c.logprobs, rc.logprobs):
                assert got.keys() == want.keys()
                assert max(abs(got[t].logprob - want[t].logprob) for t in got) < TOL
        if r.prompt_logprobs is not None:
            assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == len(r.prompt_logprobs)
            for got, want in zip(o.prompt_logprobs[1:], r.prompt_logprobs[1:]):
                assert got.keys() == want.keys()
                assert max(abs(got[t].logprob - want[t].logprob) for t in got) < TOL


@pytest.fixture(scope="module")
def reference(llm_off, prompts):
    # One prompt at a time: nothing shared, nothing batched.
    return [_run(llm_off, [p])[0] for p in prompts]


def test_same_tokens_and_logprobs_with_the_cache(llm_on, prompts, reference):
    before = llm_on.get_stats()
    outs = _run(llm_on, prompts)
    _assert_same(outs, reference)
    stats = llm_on.get_stats()
    assert stats["prefix_cache_hits"] > before["prefix_cache_hits"]
    assert stats["num_compilations_after_warmup"] == 0
    # Requests admitted after a step registered the shared prompts' blocks report them cached.
    assert any(o.num_cached_tokens >= 20 for o in outs)
    assert all(o.num_cached_tokens % 4 == 0 and o.num_cached_tokens < len(o.prompt_token_ids) for o in outs)
    # Again: now every shared prefix is cached from the start; the second turn reuses the first.
    outs = _run(llm_on, prompts)
    _assert_same(outs, reference)
    assert outs[7].num_cached_tokens >= len(prompts[6]) - 4
    assert llm_on.get_stats()["num_compilations_after_warmup"] == 0


def test_chunked_prefill_resumes_inside_a_cached_prefix(llm_on, llm_off, prompts):
    """A 35-token system prompt cached, then a new 55-token prompt over it with a 16-token budget:
    it starts at the hit (32 tokens, inside what was the cached request's second chunk) and
    chunks the rest."""
    longer = prompts[9] + list(range(40, 60))
    ref = _run(llm_off, [longer])[0]
    _run(llm_on, [prompts[9]])
    out = _run(llm_on, [longer])[0]
    assert out.num_cached_tokens == 32
    _assert_same([out], [ref])


def _cacheable(prompt):
    return (len(prompt) - 1) // 4 * 4  # full blocks, the last token always computed


def test_prompt_logprobs_are_exact_on_a_hit(llm_on, llm_off, prompts):
    ref = _run(llm_off, [prompts[1]], prompt_logprobs=4)[0]
    _run(llm_on, [prompts[1]])  # cached now
    out = _run(llm_on, [prompts[1]], prompt_logprobs=4)[0]
    assert out.num_cached_tokens == 0  # computed whole: the logprob of every prompt position is needed
    _assert_same([out], [ref])
    again = _run(llm_on, [prompts[1]])[0]  # and its blocks are still shared with the next one
    assert again.num_cached_tokens == _cacheable(prompts[1])


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_tight_pool_preempts_and_still_matches(ckpt, prompts, reference, mode):
    llm = _llm(ckpt, True, num_gpu_blocks_override=16, preemption_mode=mode, swap_space=0.01)
    outs = _run(llm, prompts)
    _assert_same(outs, reference)
    stats = llm.get_stats()
    assert stats["num_preemptions_total"] > 0 and stats["prefix_cache_hits"] > 0
    assert stats["num_free_blocks"] == 16 and stats["num_compilations_after_warmup"] == 0


def test_n_samples_and_seeds_are_unchanged_by_the_cache(llm_on, llm_off, prompts):
    params = SamplingParams(n=3, temperature=0.8, seed=5, max_tokens=NEW, ignore_eos=True, logprobs=1)
    ref = llm_off.generate([{"prompt_token_ids": p} for p in prompts[:3]], params, use_tqdm=False)
    outs = llm_on.generate([{"prompt_token_ids": p} for p in prompts[:3]], params, use_tqdm=False)
    _assert_same(outs, ref)


def test_reset_prefix_cache_forgets_every_prefix(llm_on, prompts, reference):
    _run(llm_on, [prompts[0]])
    assert _run(llm_on, [prompts[0]])[0].num_cached_tokens == _cacheable(prompts[0])
    assert llm_on.reset_prefix_cache() is True
    out = _run(llm_on, [prompts[0]])[0]
    assert out.num_cached_tokens == 0
    _assert_same([out], [reference[0]])


def test_cache_salt_separates_tenants(llm_on, prompts):
    p = prompts[4]
    salted = lambda salt: {"prompt_token_ids": p, "cache_salt": salt}  # noqa: E731
    params = SamplingParams(temperature=0.0, max_tokens=2)
    llm_on.generate([salted("alice")], params, use_tqdm=False)
    bob, alice = (llm_on.generate([salted(s)], params, use_tqdm=False)[0] for s in ("bob", "alice"))
    assert bob.num_cached_tokens == 0 and alice.num_cached_tokens == _cacheable(p)
    with pytest.raises(ValueError, match="cache_salt"):
        llm_on.generate([{"prompt_token_ids": p, "cache_salt": ""}], params, use_tqdm=False)
