"""On the GPU: the engine with the Pallas kernels gives HF's greedy tokens (float32), with a roomy
pool and with a pool small enough to preempt, and compiles nothing after warm-up."""

import numpy as np
import pytest
import torch

from tests.tiny_checkpoint import make_tiny_checkpoint

pytestmark = pytest.mark.gpu

NEW = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    ckpt = make_tiny_checkpoint(str(tmp_path_factory.mktemp("gpu") / "tiny"))
    rng = np.random.default_rng(5)
    prompts = [rng.integers(5, 300, n).tolist() for n in (3, 20, 7, 15, 1, 11)]
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    ref = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                               do_sample=False, pad_token_id=0)
        ref.append(g[0, len(p):].tolist())
    return ckpt, prompts, ref


@pytest.mark.parametrize("pool", ["roomy", "tiny-recompute", "tiny-swap"])
def test_pallas_engine_matches_hf(setup, pool):
    from jaxpaged import LLM, SamplingParams

    ckpt, prompts, ref = setup
    kw = dict(dtype="float32", attention_backend="pallas", max_num_seqs=8, max_num_batched_tokens=32,
              num_gpu_blocks_override=256)
    if pool != "roomy":
        kw.update(block_size=8, num_gpu_blocks_override=7, preemption_mode=pool.split("-")[1], swap_space=0.01)
    llm = LLM(ckpt, **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref
    stats = llm.get_stats()
    assert stats["num_compilations_after_warmup"] == 0
    if pool != "roomy":
        assert stats["num_preemptions_total"] > 0
