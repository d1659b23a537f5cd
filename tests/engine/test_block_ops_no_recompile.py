"""Swaps and copy-on-write copies of any size run through the programs compiled at start-up (in
chunks of the largest warmed size): a pool small enough to swap and fork large n > 1 requests
moves more block pairs per step than any warmed program takes, in both preemption modes, and
nothing compiles while the outputs stay those of a roomy pool."""

import pytest

from jaxpaged import LLM, SamplingParams
from tests.helpers.tiny_checkpoint import make_tiny_checkpoint

PROMPTS = [{"prompt_token_ids": [5 + (7 * i + j) % 290 for j in range(n)]} for i, n in enumerate((20, 13, 17))]
PARAMS = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=36, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("blockops") / "tiny"), max_position_embeddings=64)


def _engine(ckpt, num_blocks, mode):
    return LLM(ckpt, dtype="float32", max_num_seqs=12, max_num_batched_tokens=64, block_size=4,
               num_gpu_blocks_override=num_blocks, preemption_mode=mode, swap_space=0.01, seed=0)


@pytest.fixture(scope="module")
def roomy(ckpt):
    outs = _engine(ckpt, 512, "recompute").generate(PROMPTS, PARAMS, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_large_block_moves_compile_nothing(ckpt, roomy, mode):
    llm = _engine(ckpt, 56, mode)
    kv = llm.llm_engine.kv
    sizes = {"copy": [], "swap_out": [], "swap_in": []}
    for name in sizes:
        op = getattr(kv, name)

        def record(pairs, _op=op, _name=name):
            sizes[_name].append(len(pairs))
            return _op(pairs)

        setattr(kv, name, record)
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in outs] == roomy
    stats = llm.get_stats()
    assert stats["num_preemptions_total"] > 0
    assert stats["num_compilations_after_warmup"] == 0
    warmed = kv.max_pairs_per_call
    assert warmed == 16  # next_pow2(64 / 4 blocks per sequence)
    if mode == "swap":  # a whole forked request moved at once: more pairs than one program takes
        assert max(sizes["swap_out"]) > warmed and max(sizes["swap_in"]) > warmed
    assert max(sizes["copy"]) >= 1
