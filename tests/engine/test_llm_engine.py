"""The engine end to end on CPU: greedy parity with HF per prompt (with and without preemption, in
both preemption modes), no compilation after warm-up, bad input, seeds, n > 1, stop strings."""

import numpy as np
import pytest
import torch

from jaxpaged import LLM, SamplingParams
from tests.helpers.tiny_checkpoint import make_tiny_checkpoint

NEW = 24
PROMPT_LENS = [3, 20, 7, 15, 1, 11]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("engine") / "tiny"))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(3)
    return [rng.integers(5, 300, n).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def hf_greedy(ckpt, prompts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                               do_sample=False, pad_token_id=0)
        out.append(g[0, len(p):].tolist())
    return out


def _greedy(llm, prompts):
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], outs


def test_roomy_pool_matches_hf(ckpt, prompts, hf_greedy):
    llm = LLM(ckpt, dtype="float32", max_num_seqs=8, max_num_batched_tokens=32)
    tokens, outs = _greedy(llm, prompts)
    assert tokens == hf_greedy
    assert [o.prompt_token_ids for o in outs] == prompts
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    stats = llm.get_stats()
    assert stats["num_preemptions_total"] == 0
    assert stats["num_compilations_after_warmup"] == 0
    assert stats["kv_cache_usage"] == 0.0 and stats["num_kv_cache_tokens"] == 0
    # Every prompt token and every generated token but the last went through the model once.
    assert stats["num_computed_tokens_total"] == sum(len(p) + NEW - 1 for p in prompts)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_tiny_pool_preempts_and_still_matches_hf(ckpt, prompts, hf_greedy, mode):
    # 44 tokens at most per request = 11 blocks of 4; 14 blocks cannot hold two long requests.
    llm = LLM(ckpt, dtype="float32", block_size=4, num_gpu_blocks_override=14, max_num_seqs=6,
              max_num_batched_tokens=16, preemption_mode=mode, swap_space=0.01)
    tokens, _ = _greedy(llm, prompts)
    assert tokens == hf_greedy
    stats = llm.get_stats()
    assert stats["num_preemptions_total"] > 0
    assert stats["num_free_blocks"] == 14
    assert stats["num_compilations_after_warmup"] == 0
    exact = sum(len(p) + NEW - 1 for p in prompts)
    if mode == "recompute":  # a preempted request computes its tokens again
        assert stats["num_computed_tokens_total"] > exact
    else:  # swapping moves blocks instead of recomputing them
        assert stats["num_computed_tokens_total"] == exact


def test_mixed_workload_compiles_nothing_after_warmup(ckpt, prompts):
    llm = LLM(ckpt, dtype="float32", max_num_seqs=8, max_num_batched_tokens=32, max_logprobs=5)
    params = [
        SamplingParams(temperature=0.0, max_tokens=5),
        SamplingParams(temperature=0.9, top_p=0.8, top_k=20, max_tokens=9, seed=1),
        SamplingParams(temperature=1.0, max_tokens=3, logprobs=3, prompt_logprobs=2),
        SamplingParams(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5, min_p=0.05, max_tokens=12, n=2),
        SamplingParams(temperature=0.0, max_tokens=30, stop=["e"], logit_bias={5: 3.0}, min_tokens=2),
        SamplingParams(temperature=1.2, max_tokens=17),
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert len(outs) == len(prompts)
    assert len(outs[3].outputs) == 2
    assert llm.get_stats()["num_compilations_after_warmup"] == 0


def test_text_prompts_and_input_order(ckpt):
    llm = LLM(ckpt, dtype="float32", max_num_seqs=4, max_num_batched_tokens=32)
    texts = ["Hello, how are you?", "The quick brown fox jumps over the lazy dog. " * 3, "a"]
    outs = llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    tok = llm.get_tokenizer()
    assert [o.prompt for o in outs] == texts
    assert [o.prompt_token_ids for o in outs] == [tok(t).input_ids for t in texts]
    for o in outs:
        c = o.outputs[0]
        assert len(c.token_ids) == 6
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_seed_gives_same_tokens_alone_and_in_busy_batch(ckpt, prompts):
    llm = LLM(ckpt, dtype="float32", max_num_seqs=8, max_num_batched_tokens=32)
    seeded = SamplingParams(temperature=1.0, max_tokens=12, seed=1234, ignore_eos=True)
    alone = llm.generate([{"prompt_token_ids": prompts[1]}], seeded, use_tqdm=False)[0].outputs[0].token_ids
    noise = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    batch = [{"prompt_token_ids": p} for p in prompts]
    outs = llm.generate(batch, [noise, seeded, noise, noise, noise, noise], use_tqdm=False)
    assert outs[1].outputs[0].token_ids == alone
    again = llm.generate([{"prompt_token_ids": prompts[1]}], seeded, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone


def test_n_samples_share_prompt_and_differ(ckpt, prompts):
    llm = LLM(ckpt, dtype="float32", max_num_seqs=8, max_num_batched_tokens=32, block_size=4)
    out = llm.generate([{"prompt_token_ids": prompts[1]}],
                       SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=7, ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    seqs = [tuple(c.token_ids) for c in out.outputs]
    assert all(len(s) == 10 for s in seqs) and len(set(seqs)) > 1
    assert llm.get_stats()["num_free_blocks"] == llm.get_stats()["num_gpu_blocks"]


def test_logprobs_match_hf_log_softmax(ckpt, prompts):
    from transformers import AutoModelForCausalLM

    llm = LLM(ckpt, dtype="float32", max_num_seqs=4, max_num_batched_tokens=32, max_logprobs=5)
    p = prompts[1]
    out = llm.generate([{"prompt_token_ids": p}], SamplingParams(temperature=0.0, max_tokens=4, logprobs=3,
                                                                 prompt_logprobs=2, ignore_eos=True), use_tqdm=False)[0]
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    full = p + out.outputs[0].token_ids
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([full])).logits[0], -1).numpy()
    c = out.outputs[0]
    for i, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        pos = len(p) - 1 + i
        assert entry[tok].logprob == pytest.approx(lp[pos, tok], abs=1e-4)
        top = np.argsort(-lp[pos])[:3]
        assert set(top.tolist()) <= set(entry)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
    for j in range(1, len(p)):
        assert out.prompt_logprobs[j][p[j]].logprob == pytest.approx(lp[j - 1, p[j]], abs=1e-4)
    assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)), abs=1e-4)


def test_bad_input_raises_before_scheduling_and_others_go_on(ckpt, prompts):
    llm = LLM(ckpt, dtype="float32", max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64)
    engine = llm.llm_engine
    engine.add_request("good", {"prompt_token_ids": prompts[1]}, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    bad = [
        ({"prompt_token_ids": []}, SamplingParams(), "empty"),
        ({"prompt_token_ids": [1] * 65}, SamplingParams(), "max_model_len"),
        ({"prompt_token_ids": [1, 10**6]}, SamplingParams(), "vocabulary"),
        ({"prompt_token_ids": [1, -3]}, SamplingParams(), "vocabulary"),
        ({"prompt_token_ids": [1, 2]}, SamplingParams(logprobs=50), "max_logprobs"),
        ("", SamplingParams(), "empty"),
    ]
    for i, (prompt, params, match) in enumerate(bad):
        with pytest.raises(ValueError, match=match):
            engine.add_request(f"bad{i}", prompt, params)
    for field, kwargs in [("temperature", dict(temperature=-1)), ("top_p", dict(top_p=1.5)), ("top_p", dict(top_p=0)),
                          ("top_k", dict(top_k=-2)), ("min_p", dict(min_p=1.5)),
                          ("max_tokens", dict(max_tokens=0)), ("n", dict(n=0))]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="already"):
        engine.add_request("good", {"prompt_token_ids": [1, 2]}, SamplingParams())
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["good"]
    assert len(finished[0].outputs[0].token_ids) == 5


def test_abort_frees_blocks(ckpt, prompts):
    llm = LLM(ckpt, dtype="float32", max_num_seqs=4, max_num_batched_tokens=32, block_size=4)
    engine = llm.llm_engine
    for i, p in enumerate(prompts[:3]):
        engine.add_request(str(i), {"prompt_token_ids": p}, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.get_stats()["kv_cache_usage"] > 0
    engine.abort_request(["0", "1", "2"])
    assert not engine.has_unfinished_requests()
    assert engine.get_stats()["num_free_blocks"] == engine.get_stats()["num_gpu_blocks"]


def test_stop_strings_and_stop_tokens(ckpt, prompts):
    llm = LLM(ckpt, dtype="float32", max_num_seqs=4, max_num_batched_tokens=32)
    tok = llm.get_tokenizer()
    base = llm.generate([{"prompt_token_ids": prompts[1]}], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    text = base.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop and stop in text
    out = llm.generate([{"prompt_token_ids": prompts[1]}], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                                                         stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    incl = llm.generate([{"prompt_token_ids": prompts[1]}], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                        stop=[stop], include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert incl.text == text[: text.index(stop) + len(stop)]
    stop_tok = base.token_ids[5]
    out = llm.generate([{"prompt_token_ids": prompts[1]}], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                       stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[: base.token_ids.index(stop_tok) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    assert tok is not None


def test_output_kinds(ckpt, prompts):
    from jaxpaged.sampling_params import RequestOutputKind

    llm = LLM(ckpt, dtype="float32", max_num_seqs=4, max_num_batched_tokens=32)
    engine = llm.llm_engine
    engine.add_request("cum", {"prompt_token_ids": prompts[1]}, SamplingParams(max_tokens=5, ignore_eos=True, temperature=0))
    engine.add_request("final", {"prompt_token_ids": prompts[2]},
                       SamplingParams(max_tokens=5, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY))
    engine.add_request("delta", {"prompt_token_ids": prompts[1]},
                       SamplingParams(max_tokens=5, ignore_eos=True, temperature=0, output_kind=RequestOutputKind.DELTA))
    seen: dict[str, list] = {"cum": [], "final": [], "delta": []}
    tokens: dict[str, list] = {"cum": [], "delta": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append((out.finished, len(out.outputs[0].token_ids)))
            if out.request_id in tokens:
                assert out.prompt_token_ids == prompts[1]
                tokens[out.request_id].append(list(out.outputs[0].token_ids))
    assert seen["cum"] == [(False, 1), (False, 2), (False, 3), (False, 4), (True, 5)]
    assert seen["final"] == [(True, 5)]
    # DELTA: one new token a step, which joined are the cumulative request's (same prompt, greedy).
    assert seen["delta"] == [(False, 1), (False, 1), (False, 1), (False, 1), (True, 1)]
    assert sum(tokens["delta"], []) == tokens["cum"][-1] and len(tokens["cum"][-1]) == 5
    assert tokens["cum"][-2] == tokens["cum"][-1][:4]  # an earlier cumulative output was not changed later


def test_generate_freezes_the_heap_only_while_it_steps(ckpt, prompts):
    """LLM.generate exempts the caller's heap from collection while it steps (gc_heap.py) and
    unfreezes it after, also when a step raises; a heap the caller froze is left frozen."""
    import gc

    llm = LLM(ckpt, dtype="float32", max_num_seqs=4, max_num_batched_tokens=32)
    engine, step = llm.llm_engine, llm.llm_engine.step
    counts = []

    def counting_step():
        counts.append(gc.get_freeze_count())
        return step()

    engine.step = counting_step
    assert gc.get_freeze_count() == 0
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], SamplingParams(max_tokens=3, ignore_eos=True),
                        use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 3]
    assert counts and min(counts) > 0 and gc.get_freeze_count() == 0

    def failing_step():
        raise KeyboardInterrupt

    engine.step = failing_step
    with pytest.raises(KeyboardInterrupt):
        llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=3), use_tqdm=False)
    assert gc.get_freeze_count() == 0 and not engine.has_unfinished_requests()

    engine.step = counting_step
    gc.freeze()
    try:
        llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=2), use_tqdm=False)
        assert gc.get_freeze_count() > 0  # not unfrozen by generate
    finally:
        gc.unfreeze()


def test_parallel_compilation_lowers_each_program_once(ckpt, prompts, hf_greedy, monkeypatch):
    # The step and sampler programs compile on a thread pool before warm-up runs them; jit's cache
    # must hold what the pool built, or warm-up would lower (and compile) every program again.
    import jax
    from jax._src import monitoring

    lowerings = {}
    for threads in ("1", "3"):
        events = []

        def listen(event, duration, **_kw):
            if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
                events.append(duration)

        monkeypatch.setenv("JAXPAGED_COMPILE_THREADS", threads)
        jax.clear_caches()  # the first engine's programs would otherwise serve the second
        jax.monitoring.register_event_duration_secs_listener(listen)
        try:
            llm = LLM(ckpt, dtype="float32", max_num_seqs=8, max_num_batched_tokens=32)
        finally:
            monitoring.unregister_event_duration_listener(listen)
        lowerings[threads] = len(events)
        tokens, _ = _greedy(llm, prompts)
        assert tokens == hf_greedy
        assert llm.get_stats()["num_compilations_after_warmup"] == 0
        del llm
    assert lowerings["3"] == lowerings["1"] > 0


def test_compile_threads_rejects_a_bad_value(monkeypatch):
    from jaxpaged.warm_up import compile_threads

    monkeypatch.setenv("JAXPAGED_COMPILE_THREADS", "0")
    with pytest.raises(ValueError, match="JAXPAGED_COMPILE_THREADS"):
        compile_threads()
    monkeypatch.setenv("JAXPAGED_COMPILE_THREADS", "4")
    assert compile_threads() == 4
