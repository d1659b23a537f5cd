"""Tensor parallelism on 8 fake CPU devices: every layout (tests/helpers/tp_checkpoints.py) gives
the logits of the unsplit model (within float32 rounding: the all-reduces sum in another order) and,
through the engine, the same greedy tokens, logprobs and prompt logprobs, compiling nothing after
warm-up; also under a pool small enough to preempt, in both modes.

``make test`` runs a representative subset: through the engine, GQA (KV heads split at tp 2,
replicated at tp 4), falcon-7b's multi-query and BLOOM's ALiBi at tp 2 and 4, and the preempting
pool; at the model level BigCode's multi-query, MPT's ALiBi and ChatGLM's packed SwiGLU. The rest of
the every-family x (2, 4, 8) matrix is marked ``slow`` (``make test-all``)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxpaged import LLM, SamplingParams
from jaxpaged.model_loader import load_model
from jaxpaged.tensor_parallel import make_mesh
from tests.helpers.paged_driver import PagedSequence
from tests.helpers.tp_checkpoints import TP_CASES, build

TPS = (2, 4, 8)
CI_MODEL = {("bigcode_mqa", 2), ("mpt_alibi", 4), ("chatglm2_groups", 4)}
CI_ENGINE = {(case, tp) for case in ("llama_gqa", "falcon_7b_mqa", "bloom_alibi") for tp in (2, 4)}
NEW_TOKENS = 16
ENGINE = dict(dtype="float32", skip_tokenizer_init=True, block_size=4, max_num_seqs=4, max_num_batched_tokens=32,
              max_model_len=128, swap_space=0.01)


def _matrix(ci: set[tuple[str, int]]) -> list:
    return [pytest.param(case, tp, id=f"{case}-tp{tp}", marks=() if (case, tp) in ci else pytest.mark.slow)
            for case in sorted(TP_CASES) for tp in TPS]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    paths: dict[str, str] = {}

    def get(case: str) -> str:
        if case not in paths:
            paths[case] = build(case, str(tmp_path_factory.mktemp(case) / "ckpt"))
        return paths[case]

    return get


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [rng.integers(3, min(vocab, 256) - 3, n).tolist() for n in (5, 37, 12, 1, 23, 9)]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _greedy(lm, prompt: list[int], n: int) -> tuple[list[int], np.ndarray, list[np.ndarray]]:
    """Greedy continuation through the paged cache: tokens, prompt logits [P, V], and the logits
    each new token was drawn from."""
    seq = PagedSequence(lm, block_size=4, num_blocks=8 + 2 * (len(prompt) + n) // 4)
    prompt_logits = seq.forward(prompt, all_logits=True)
    steps, tokens = [prompt_logits[-1]], [int(np.argmax(prompt_logits[-1]))]
    while len(tokens) < n:
        steps.append(seq.forward([tokens[-1]]))
        tokens.append(int(np.argmax(steps[-1])))
    return tokens, prompt_logits, steps


_MODEL_REFERENCES: dict[str, list] = {}
_ENGINE_REFERENCES: dict[tuple, list] = {}


def _model_reference(path: str) -> list:
    """tp = 1, the first two prompts: (tokens, prompt logits, step logits), cached per checkpoint
    (each prefill length compiles a program; the decode steps share one)."""
    if path not in _MODEL_REFERENCES:
        lm = load_model(path, dtype="float32")
        _MODEL_REFERENCES[path] = [_greedy(lm, p, NEW_TOKENS) for p in _prompts(lm.config.vocab_size)[:2]]
    return _MODEL_REFERENCES[path]


def _max_rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("case,tp", _matrix(CI_MODEL))
def test_logits_match_unsplit_model(checkpoint, case, tp):
    path = checkpoint(case)
    lm = load_model(path, dtype="float32", mesh=make_mesh(tp))
    assert lm.config.tensor_parallel_size == tp
    for prompt, (ref_tokens, ref_prompt, ref_steps) in zip(_prompts(lm.config.vocab_size), _model_reference(path)):
        tokens, prompt_logits, steps = _greedy(lm, prompt, NEW_TOKENS)
        assert _max_rel_err(prompt_logits, ref_prompt) < 1e-5
        assert _max_rel_err(np.stack(steps), np.stack(ref_steps)) < 1e-5
        assert tokens == ref_tokens


def _generate(path: str, tp: int, **engine_kw) -> tuple[list, dict]:
    """Greedy outputs of the engine at ``tp`` for the six prompts (every other one with prompt
    logprobs): per prompt (tokens, their logprobs, prompt logprobs or None), and the stats."""
    llm = LLM(path, tensor_parallel_size=tp, **{**ENGINE, **engine_kw})
    prompts = _prompts(llm.llm_engine.vocab_size)
    params = [SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2, detokenize=False,
                             prompt_logprobs=2 if i % 2 else None) for i in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    results = []
    for prompt, out in zip(prompts, outs):
        got = out.outputs[0]
        lps = [d[t].logprob for d, t in zip(got.logprobs, got.token_ids)]
        plp = None if out.prompt_logprobs is None else [out.prompt_logprobs[j][prompt[j]].logprob
                                                        for j in range(1, len(prompt))]
        results.append((got.token_ids, lps, plp))
    return results, llm.get_stats()


def _engine_matches_reference(path: str, tp: int, **engine_kw) -> dict:
    """The engine at ``tp`` against the engine at 1 with the same pool: the same tokens, logprobs
    and prompt logprobs within float32 rounding, and no compilation after warm-up."""
    key = (path, tuple(sorted(engine_kw.items())))
    if key not in _ENGINE_REFERENCES:  # first: each engine counts every compilation in the process
        _ENGINE_REFERENCES[key] = _generate(path, 1, **engine_kw)
    (reference, ref_stats), (results, stats) = _ENGINE_REFERENCES[key], _generate(path, tp, **engine_kw)
    for (ref_tokens, ref_lps, ref_plp), (tokens, lps, plp) in zip(reference, results):
        assert tokens == ref_tokens
        np.testing.assert_allclose(lps, ref_lps, atol=1e-4)
        assert (plp is None) == (ref_plp is None)
        if plp is not None:
            np.testing.assert_allclose(plp, ref_plp, atol=1e-4)
    assert stats["num_compilations_after_warmup"] == 0
    assert stats["num_preemptions_total"] == ref_stats["num_preemptions_total"]
    return stats


@pytest.mark.parametrize("case,tp", _matrix(CI_ENGINE))
def test_engine_greedy_matches_unsplit_model(checkpoint, case, tp):
    _engine_matches_reference(checkpoint(case), tp)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_engine_under_a_preempting_pool(checkpoint, mode):
    """tp = 4 over 2 KV heads (each replicated on two devices): blocks are preempted and, in swap
    mode, copied out and back per device, and the tokens do not change."""
    stats = _engine_matches_reference(checkpoint("llama_gqa"), 4, num_gpu_blocks_override=18, preemption_mode=mode)
    assert stats["num_preemptions_total"] > 0


@pytest.mark.parametrize("case", ["falcon_7b_mqa", pytest.param("chatglm2_groups", marks=pytest.mark.slow),
                                  pytest.param("llama_gqa", marks=pytest.mark.slow)])
def test_dummy_weights_are_the_unsplit_draw(checkpoint, case):
    """load_format="dummy" draws each parameter straight into its shards (packed ones re-laid out)
    and gives the model the same dummy weights at every tensor_parallel_size."""
    path = checkpoint(case)
    ref = load_model(path, dtype="float32", load_format="dummy")
    lm = load_model(path, dtype="float32", load_format="dummy", mesh=make_mesh(4))
    prompt = _prompts(ref.config.vocab_size)[1]
    _, want, _ = _greedy(ref, prompt, 1)
    _, got, _ = _greedy(lm, prompt, 1)
    assert _max_rel_err(got, want) < 1e-5


def test_each_device_holds_only_its_slice(checkpoint):
    """Sharded parameters are never whole on a device: each shard is the global shape with the
    split axis divided by tp (the KV pool too, along its heads)."""
    tp = 4
    llm = LLM(checkpoint("llama_gqa"), tensor_parallel_size=tp, **ENGINE)
    params = llm.llm_engine.lm.params
    layer = params["model"]["layers_0"]
    expect = {  # path -> split axis
        ("model", "embed_tokens", "embedding"): 0, ("lm_head", "kernel"): 1,
        ("model", "layers_0", "self_attn", "q_proj", "kernel"): 1,
        ("model", "layers_0", "self_attn", "o_proj", "kernel"): 0,
        ("model", "layers_0", "mlp", "gate_proj", "kernel"): 1,
        ("model", "layers_0", "mlp", "down_proj", "kernel"): 0,
    }
    for path, axis in expect.items():
        arr = params
        for p in path:
            arr = arr[p]
        want = list(arr.shape)
        want[axis] //= tp
        assert [tuple(s.data.shape) for s in arr.addressable_shards] == [tuple(want)] * tp, path
    # 2 KV heads < 4 devices: the k projection is replicated; the cache holds one head per device.
    assert layer["self_attn"]["k_proj"]["kernel"].sharding.is_fully_replicated
    k_cache = llm.llm_engine.kv.caches[0][0]
    assert k_cache.shape[2] == tp and {s.data.shape[2] for s in k_cache.addressable_shards} == {1}
    assert len({s.device for s in k_cache.addressable_shards}) == tp


def _tiny_llama(path: str, **overrides) -> str:
    from tests.helpers.parity_helpers import make_hf_model, save_hf

    kw = dict(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=6,
              num_key_value_heads=6, max_position_embeddings=64)
    return save_hf(make_hf_model("LlamaConfig", {**kw, **overrides}), path)


@pytest.mark.parametrize("overrides,tp,reason", [
    ({}, 4, "does not divide the model's 6 attention heads"),
    ({"num_attention_heads": 12, "num_key_value_heads": 3}, 2, "3 KV heads: one must divide the other"),
    ({"num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 98}, 4,
     r"cannot shard model/layers_0/mlp/\w+_proj/kernel .* \(98\) does not divide"),
])
def test_models_that_cannot_be_split_are_refused_at_start(tmp_path, overrides, tp, reason):
    path = _tiny_llama(str(tmp_path / "ckpt"), **overrides)
    with pytest.raises(ValueError, match=reason) as err:
        LLM(path, tensor_parallel_size=tp, **ENGINE)
    assert "tensor_parallel_size" in str(err.value)


def test_more_devices_than_the_machine_has_is_refused():
    with pytest.raises(ValueError, match="tensor_parallel_size=16 needs 16 devices"):
        make_mesh(16)
    assert jax.device_count() == 8


@pytest.mark.slow
def test_the_cases_cover_every_registered_architecture(checkpoint):
    import json
    import os

    from models import supported_architectures

    archs = {json.load(open(os.path.join(checkpoint(c), "config.json")))["architectures"][0] for c in TP_CASES}
    assert archs == set(supported_architectures())
