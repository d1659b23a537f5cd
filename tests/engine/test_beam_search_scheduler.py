"""Beam search in the scheduler: beams are the sequences of one request, reassigned after every step
with forks and frees on shared blocks. The simulated runner checks every step's cache against each
beam's current history; the result must equal the same search run on plain token lists, whatever
the pool size, preemption mode or chunking.

The rules themselves are checked against Hugging Face's ``generate(num_beams=...)`` on real
models in tests/models/test_beam_search_parity.py.
"""

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest

from jaxpaged.beam_search import BeamSearchState
from tests.helpers.sched_harness import EOS, Harness

VOCAB = [EOS] + list(range(1000, 1031))
TOP = 20


def top_fn(history):
    """A deterministic next-token distribution of the whole history (a stand-in model)."""
    rng = np.random.default_rng(abs(hash(tuple(history))) % (1 << 32))
    logits = rng.normal(0.0, 1.5, len(VOCAB))
    logits[0] -= 1.0  # EOS a little less likely
    lp = logits - np.log(np.exp(logits).sum())
    order = np.argsort(-lp, kind="stable")[:TOP]
    return [VOCAB[i] for i in order], [float(lp[i]) for i in order]


def reference(prompt, width, max_tokens, eos=True, length_penalty=1.0, early_stopping=False):
    """The same BeamSearchState on plain token lists (no blocks, no scheduler)."""
    state = BeamSearchState(width, length_penalty, early_stopping, max_tokens, frozenset([EOS]) if eos else frozenset())
    beams = [SimpleNamespace(seq_id=0, output_token_ids=[], output_logprobs=[], output_top_logprobs=[],
                             cumulative_logprob=0.0)]
    while True:
        for b in beams:
            ids, lps = top_fn(tuple(prompt + b.output_token_ids))
            state.add_candidates(b.seq_id, SimpleNamespace(top_ids=ids, top_logprobs=lps))
        choices = state.step(beams)
        if not choices:
            return state.results()
        beams = [SimpleNamespace(seq_id=i, output_token_ids=c.parent.output_token_ids + [c.token.token_id],
                                 output_logprobs=c.parent.output_logprobs + [c.token.logprob],
                                 output_top_logprobs=c.parent.output_top_logprobs + [c.token],
                                 cumulative_logprob=c.parent.cumulative_logprob + c.token.logprob)
                 for i, c in enumerate(choices)]


def _results(req):
    return [(h.token_ids, round(h.score, 9), h.finish_reason) for h in req.beam_search.results()]


def _expected(prompt, width, max_tokens, **kw):
    return [(h.token_ids, round(h.score, 9), h.finish_reason) for h in reference(prompt, width, max_tokens, **kw)]


@pytest.mark.parametrize("width", [1, 2, 4, 6])
def test_beams_share_blocks_and_match_the_plain_search(width):
    h = Harness(num_blocks=60, max_num_batched_tokens=32, top_fn=top_fn)
    prompt = [11, 12, 13, 14, 15, 16]
    req = h.add("a", prompt, n=width, max_tokens=10, use_beam_search=True)
    h.step()  # the prompt, computed once by beam 0
    assert [s.num_output_tokens for s in req.seqs] == [1] * width  # first step: k children of beam 0
    tables = [h.bm.get_block_table(s.seq_id) for s in req.seqs]
    assert all(t == tables[0] for t in tables)  # all share the prompt's blocks
    shared = False
    while h.sched.has_unfinished_requests():
        h.step()
        stats = h.sched.get_stats()
        shared |= stats.num_used_blocks < stats.num_logical_blocks
    assert _results(req) == _expected(prompt, width, 10)
    assert len(req.beam_search.results()) == width
    assert h.bm.get_num_free_blocks() == h.bm.num_device_blocks
    if width > 1:
        assert shared and h.runner.num_copied > 0  # the shared last block was copied on write


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("caching", [False, True])
def test_tight_pool_preempts_beams_and_still_matches(mode, caching):
    """Three beam searches and a plain request through a pool that cannot hold them together."""
    h = Harness(num_blocks=20, num_host_blocks=30, max_num_batched_tokens=12, max_num_seqs=12,
                preemption_mode=mode, top_fn=top_fn, enable_caching=caching)
    rng = random.Random(7)
    cases = []
    for i, width in enumerate([4, 2, 3]):
        prompt = [rng.randrange(3, 900) for _ in range(rng.randint(3, 9))]
        es = [False, True, "never"][i]
        req = h.add(f"b{i}", prompt, n=width, max_tokens=12, use_beam_search=True, early_stopping=es,
                    length_penalty=[1.0, 0.5, 2.0][i])
        cases.append((req, prompt, width, dict(early_stopping=es, length_penalty=[1.0, 0.5, 2.0][i])))
        h.step()
    plain = h.add("plain", [5, 6, 7], max_tokens=20, ignore_eos=True)
    h.run()
    assert h.sched.get_stats().num_preemptions > 0
    if mode == "swap":
        assert h.runner.num_swapped_out > 0 and h.runner.num_swapped_in > 0
    for req, prompt, width, kw in cases:
        assert _results(req) == _expected(prompt, width, 12, **kw)
    assert len(plain.seqs[0].output_token_ids) == 20


def test_ignore_eos_runs_every_beam_to_max_tokens():
    h = Harness(num_blocks=60, top_fn=top_fn)
    prompt = [21, 22, 23]
    req = h.add("a", prompt, n=3, max_tokens=9, use_beam_search=True, ignore_eos=True)
    h.run()
    res = req.beam_search.results()
    assert [len(r.token_ids) for r in res] == [9, 9, 9] and {r.finish_reason for r in res} == {"length"}
    assert _results(req) == _expected(prompt, 3, 9, eos=False)
    assert all(math.isclose(r.score, r.cumulative_logprob / 9) for r in res)


def test_aborting_a_beam_search_frees_every_block():
    h = Harness(num_blocks=40, top_fn=top_fn)
    req = h.add("a", [1, 2, 3, 4, 5], n=4, max_tokens=10, use_beam_search=True, ignore_eos=True)
    for _ in range(4):
        h.step()
    assert h.sched.abort_request("a") is req
    assert h.bm.get_num_free_blocks() == h.bm.num_device_blocks
