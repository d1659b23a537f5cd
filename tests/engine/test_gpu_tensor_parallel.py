"""On a machine with at least two NVIDIA GPUs: the engine at tensor_parallel_size 2 on the Pallas
kernels (each GPU running them on its heads under shard_map) gives the unsplit engine's greedy tokens,
with a roomy pool and with one small enough to preempt, and compiles nothing after warm-up."""

import numpy as np
import pytest

from tests.helpers.tiny_checkpoint import make_tiny_checkpoint

pytestmark = pytest.mark.gpu

NEW = 24


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import jax

    if jax.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("gpu_tp") / "tiny"))  # 4 heads, 2 KV heads


@pytest.mark.parametrize("pool", ["roomy", "tiny-recompute", "tiny-swap"])
@pytest.mark.parametrize("backend", ["pallas", "reference"])
def test_tp2_engine_matches_tp1(ckpt, pool, backend):
    from jaxpaged import LLM, SamplingParams

    rng = np.random.default_rng(5)
    prompts = [{"prompt_token_ids": rng.integers(5, 300, n).tolist()} for n in (3, 20, 7, 15, 1, 11)]
    kw = dict(dtype="float32", attention_backend=backend, max_num_seqs=8, max_num_batched_tokens=32,
              num_gpu_blocks_override=256, skip_tokenizer_init=True)
    if pool != "roomy":
        kw.update(block_size=8, num_gpu_blocks_override=7, preemption_mode=pool.split("-")[1], swap_space=0.01)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True, detokenize=False)
    tokens = {}
    for tp in (1, 2):
        llm = LLM(ckpt, tensor_parallel_size=tp, **kw)
        tokens[tp] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        stats = llm.get_stats()
        assert stats["num_compilations_after_warmup"] == 0
        if pool != "roomy":
            assert stats["num_preemptions_total"] > 0
        del llm
    assert tokens[2] == tokens[1]
