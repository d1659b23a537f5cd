"""best_of: ``best_of`` samples on the prompt's shared blocks, the ``n`` with the highest cumulative
logprob returned. A seeded sample i draws with seed + i, so ``n=best_of`` with the same seed yields
the very samples best_of ranked: its choice must be their brute-force ranking."""

import pytest

from jaxpaged import LLM, SamplingParams
from jaxpaged.sampling_params import RequestOutputKind
from tests.helpers.tiny_checkpoint import make_tiny_checkpoint

PROMPTS = [[5, 17, 230, 41, 9, 88, 101], [300, 2, 77, 150, 150, 61, 4, 4, 9, 12, 250]]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    ckpt = make_tiny_checkpoint(str(tmp_path_factory.mktemp("best_of") / "tiny"))
    return LLM(ckpt, dtype="float32", max_num_seqs=8, max_num_batched_tokens=32, block_size=4)


@pytest.mark.parametrize("n, best_of", [(1, 4), (2, 5), (3, 3)])
def test_best_of_returns_the_best_of_the_same_samples(llm, n, best_of):
    kw = dict(temperature=1.0, seed=1234, max_tokens=10, stop_token_ids=[7])
    ranked = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(n=n, best_of=best_of, **kw),
                          use_tqdm=False)
    every = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                         SamplingParams(n=best_of, logprobs=0, **kw), use_tqdm=False)
    for got, all_samples in zip(ranked, every):
        assert len(all_samples.outputs) == best_of
        brute = sorted(all_samples.outputs, key=lambda c: -c.cumulative_logprob)[:n]
        assert [c.index for c in got.outputs] == list(range(n))
        if best_of == n:  # nothing to rank: the samples in their own order
            brute = all_samples.outputs
        assert [c.token_ids for c in got.outputs] == [c.token_ids for c in brute]
        assert [c.text for c in got.outputs] == [c.text for c in brute]
        if best_of > n:
            assert [c.cumulative_logprob for c in got.outputs] == pytest.approx([c.cumulative_logprob for c in brute])
    assert llm.get_stats()["num_compilations_after_warmup"] == 0


def test_best_of_runs_its_samples_on_shared_blocks(llm):
    engine = llm.llm_engine
    prompt = list(range(40, 72))  # 8 full blocks
    engine.add_request("shared", {"prompt_token_ids": prompt},
                       SamplingParams(n=1, best_of=4, temperature=1.0, max_tokens=6, ignore_eos=True,
                                      output_kind=RequestOutputKind.DELTA))
    outputs, ratios = [], []
    while engine.has_unfinished_requests():
        outputs += engine.step()
        stats = engine.get_stats()
        if stats["num_logical_blocks"]:
            ratios.append(stats["num_used_blocks"] / stats["num_logical_blocks"])
    # One output, when all four have finished (the ranking is not known before), even under DELTA.
    assert len(outputs) == 1 and outputs[0].finished and len(outputs[0].outputs) == 1
    assert len(outputs[0].outputs[0].token_ids) == 6 and outputs[0].outputs[0].cumulative_logprob < 0
    assert min(ratios) < 0.5  # the 8 prompt blocks are held once for the four samples


def test_best_of_bad_values_are_refused(llm):
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match="best_of"):
        llm.generate([{"prompt_token_ids": [1, 2]}], SamplingParams(n=1, best_of=9), use_tqdm=False)
