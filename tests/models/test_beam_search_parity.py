"""Beam search against Hugging Face transformers: the beams, their order and their scores equal
``generate(num_beams=k, num_return_sequences=k, do_sample=False, length_penalty=..., early_stopping=...)``
on tiny random Llama, GPT-2 and Falcon checkpoints, widths 1/2/4/8, with an EOS the beams reach and
without one, in a roomy pool and in one so tight that beams are preempted (both modes)."""

import numpy as np
import pytest
import torch

from jaxpaged import LLM, BeamSearchParams, SamplingParams
from tests.helpers.parity_helpers import make_hf_model, save_hf
from tests.helpers.tiny_checkpoint import make_tiny_checkpoint

WIDTHS = [1, 2, 4, 8]
# (length_penalty, early_stopping) per width: every HF stopping rule is exercised.
RULES = {1: (1.0, False), 2: (0.6, True), 4: (1.5, "never"), 8: (2.0, False)}
MAX_TOKENS = 14
MODELS = {
    "gpt2": ("GPT2Config", dict(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                initializer_range=0.1)),
    "falcon": ("FalconConfig", dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    multi_query=True, parallel_attn=True, initializer_range=0.1,
                                    max_position_embeddings=128)),
}


def _checkpoint(name, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(f"beam_{name}") / "ckpt")
    if name == "llama":  # LlamaForCausalLM with a real tokenizer (text checked too)
        return make_tiny_checkpoint(path, max_position_embeddings=128)
    config_cls, kwargs = MODELS[name]
    return save_hf(make_hf_model(config_cls, kwargs), path)


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def hf_beams(model, prompt, width, eos):
    """HF's returned beams: (generated tokens, score) best first. ``num_beams=1`` is HF's greedy
    decoding: its one sequence, scored from its per-step scores the way a beam is."""
    lp, es = RULES[width]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=width, num_return_sequences=width,
                             do_sample=False, max_new_tokens=MAX_TOKENS, length_penalty=lp, early_stopping=es,
                             eos_token_id=eos, return_dict_in_generate=True, output_scores=True)
    if width == 1:
        gen = out.sequences[0, len(prompt):].tolist()
        logprobs = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)[0]
        return [(gen, float(logprobs.sum()) / len(gen) ** lp)]
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()
    return [(out.sequences[i, len(prompt) : len(prompt) + n].tolist(), float(out.sequences_scores[i]))
            for i, n in enumerate(lengths)]


def _params(width, eos):
    lp, es = RULES[width]
    # The model's own EOS is ignored; `eos` (a token the beams do reach) is the one stop id, as HF's.
    return SamplingParams(n=width, use_beam_search=True, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                          stop_token_ids=[] if eos is None else [eos], length_penalty=lp, early_stopping=es)


def _cases(model, vocab):
    """Two prompts; for each, no EOS, and as EOS the token greedy decoding emits third (so beams
    reach it early, and some of them finish before others)."""
    rng = np.random.default_rng(5)
    cases = []
    for plen in (6, 13):
        prompt = rng.integers(3, vocab - 1, plen).tolist()
        ids = torch.tensor([prompt])
        with torch.no_grad():
            greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        cases += [(prompt, None), (prompt, int(greedy[0, -1]))]
    return cases


def _check(llm, model, cases):
    jobs = [(prompt, eos, width) for prompt, eos in cases for width in WIDTHS]
    outs = llm.generate([{"prompt_token_ids": p} for p, _, _ in jobs], [_params(w, e) for _, e, w in jobs],
                        use_tqdm=False)
    reached_eos = False
    for (prompt, eos, width), out in zip(jobs, outs):
        want = hf_beams(model, prompt, width, eos)
        got = [(c.token_ids, c.cumulative_logprob / len(c.token_ids) ** RULES[width][0]) for c in out.outputs]
        assert [t for t, _ in got] == [t for t, _ in want], (prompt, eos, width)
        assert [s for _, s in got] == pytest.approx([s for _, s in want], rel=1e-4, abs=1e-5)
        assert [c.index for c in out.outputs] == list(range(width))
        reached_eos |= any(c.finish_reason == "stop" and c.token_ids[-1] == eos for c in out.outputs)
    assert reached_eos  # the EOS cases do finish beams early
    assert llm.get_stats()["num_compilations_after_warmup"] == 0


@pytest.mark.parametrize("name", ["llama", "gpt2", "falcon"])
def test_beams_match_hf(tmp_path_factory, name):
    path = _checkpoint(name, tmp_path_factory)
    model = _hf_model(path)
    llm = LLM(path, dtype="float32", block_size=4, max_num_seqs=16, max_num_batched_tokens=64,
              skip_tokenizer_init=name != "llama")
    _check(llm, model, _cases(model, model.config.vocab_size))
    stats = llm.get_stats()
    assert stats["num_free_blocks"] == stats["num_gpu_blocks"]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_beams_match_hf_through_preemption(tmp_path_factory, mode):
    path = _checkpoint("llama", tmp_path_factory)
    model = _hf_model(path)
    # Width 8 alone needs 8 x 7 blocks of 4 at most: the pool is that and no more.
    llm = LLM(path, dtype="float32", block_size=4, max_num_seqs=24, max_num_batched_tokens=64,
              num_gpu_blocks_override=56, preemption_mode=mode, swap_space=0.05)
    _check(llm, model, _cases(model, model.config.vocab_size))
    assert llm.get_stats()["num_preemptions_total"] > 0


def test_llm_beam_search_api(tmp_path_factory):
    """vLLM's ``LLM.beam_search``: per prompt, beam_width sequences of prompt + generated tokens,
    their text, cumulative logprob and score, best first."""
    path = _checkpoint("llama", tmp_path_factory)
    model = _hf_model(path)
    llm = LLM(path, dtype="float32", block_size=4, max_num_seqs=8, max_num_batched_tokens=32)
    prompt = [5, 61, 200, 17, 33, 9]
    params = BeamSearchParams(beam_width=4, max_tokens=MAX_TOKENS, ignore_eos=True, length_penalty=1.5)
    [res] = llm.beam_search([{"prompt_token_ids": prompt}], params)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=4, num_return_sequences=4,
                             do_sample=False, max_new_tokens=MAX_TOKENS, length_penalty=1.5,
                             return_dict_in_generate=True, output_scores=True)
    assert [s.tokens for s in res.sequences] == out.sequences.tolist()
    assert [s.score for s in res.sequences] == pytest.approx(out.sequences_scores.tolist(), rel=1e-4)
    tok = llm.get_tokenizer()
    for s in res.sequences:
        assert s.text == tok.decode(s.tokens) and s.finish_reason == "length"
        assert len(s.logprobs) == MAX_TOKENS
        assert s.cum_logprob == pytest.approx(sum(d[t].logprob for d, t in zip(s.logprobs, s.tokens[len(prompt):])))
    # Output logprobs may ask for more entries than the K candidates a step keeps (here 6 > K = 4).
    [out] = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(
        n=2, use_beam_search=True, temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=6), use_tqdm=False)
    for c in out.outputs:
        assert len(c.logprobs) == 5 and all(len(d) >= 6 and t in d for d, t in zip(c.logprobs, c.token_ids))
        assert c.cumulative_logprob == pytest.approx(sum(d[t].logprob for d, t in zip(c.logprobs, c.token_ids)))
    with pytest.raises(ValueError, match="temperature"):
        llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(beam_width=2, max_tokens=4, temperature=0.7))
    with pytest.raises(ValueError, match="max_logprobs"):
        llm.beam_search([{"prompt_token_ids": prompt}], BeamSearchParams(beam_width=11, max_tokens=4))
