import numpy as np
import pytest
import torch

from jaxpaged.outputs import Logprob
from jaxpaged.sampler import (
    PAD_TOKEN_ID,
    SamplerFlags,
    SamplingRow,
    SamplingTensors,
    apply_logit_bias,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    build_logprob_dict,
    compute_prompt_logprobs_jit,
    sample_jit,
    seeded_prng_key,
)
from jaxpaged.sampling_params import SamplingParams

V = 64


def _logits(rows, seed=0, vocab=V):
    return np.random.default_rng(seed).normal(0, 2, size=(rows, vocab)).astype(np.float32)


def _run(rows, logits, num_rows_padded=None, seed=0, flags=None, **flag_kwargs):
    rows = [SamplingRow(*r) for r in rows]
    s = num_rows_padded or logits.shape[0]
    tensors = SamplingTensors.from_rows(rows, logits.shape[1], s, np.random.default_rng(seed))
    flags = flags or SamplerFlags.from_rows(rows, **flag_kwargs)
    logits = np.vstack([logits, np.zeros((s - logits.shape[0], logits.shape[1]), np.float32)])
    out = sample_jit(logits, tensors, flags)
    return [np.asarray(x) for x in out]


def _many(params, logits_row, n, seed=0):
    """n independent draws of one row (unseeded rows get distinct keys)."""
    rows = [(params, [], [])] * n
    return _run(rows, np.tile(logits_row, (n, 1)), seed=seed)[0]


# vLLM v1 reference (torch): top-k then top-p on the sorted logits, scattered back.
def _torch_top_k_top_p(logits, k, p):
    logits = torch.tensor(logits)
    k = torch.tensor(k)
    p = torch.tensor(p)
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    kth = logits_sort.gather(1, (logits_sort.size(1) - k).unsqueeze(1))
    logits_sort = logits_sort.masked_fill(logits_sort < kth, -float("inf"))
    probs_sum = torch.cumsum(logits_sort.softmax(dim=-1), dim=-1)
    top_p_mask = probs_sum <= 1 - p.unsqueeze(1)
    top_p_mask[:, -1] = False
    logits_sort = logits_sort.masked_fill(top_p_mask, -float("inf"))
    return logits_sort.scatter(-1, logits_idx, logits_sort).numpy()


def _torch_min_p(logits, min_p):
    logits = torch.tensor(logits)
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * torch.tensor(min_p).unsqueeze(1)
    return logits.masked_fill(probs < threshold, -float("inf")).numpy()


def test_greedy_is_argmax():
    logits = _logits(7)
    rows = [(SamplingParams(temperature=0.0), [1], [])] * 7
    flags = SamplerFlags.from_rows(rows)
    assert flags.all_greedy and not flags.do_top_k_top_p
    tokens = _run(rows, logits)[0]
    np.testing.assert_array_equal(tokens, logits.argmax(-1))


def test_greedy_rows_in_a_random_batch_are_argmax():
    logits = _logits(6)
    greedy = SamplingParams(temperature=0.0)
    rnd = SamplingParams(temperature=1.5, top_p=0.9, top_k=10, min_p=0.05)
    rows = [(greedy if i % 2 == 0 else rnd, [], []) for i in range(6)]
    tokens = _run(rows, logits, num_rows_padded=8)[0]
    np.testing.assert_array_equal(tokens[[0, 2, 4]], logits[[0, 2, 4]].argmax(-1))


def test_top_k_mask_exact():
    logits = _logits(3)
    k = np.array([1, 5, 0], np.int32)  # 0 = off
    masked = np.asarray(apply_top_k_top_p(logits, k, np.ones(3, np.float32)))
    for row, kk in enumerate([1, 5, V]):
        keep = np.argsort(-logits[row])[:kk]
        expected = np.full(V, -np.inf, np.float32)
        expected[keep] = logits[row, keep]
        np.testing.assert_array_equal(masked[row], expected)


def test_top_p_mask_exact_on_crafted_probs():
    probs = np.array([0.04, 0.5, 0.06, 0.25, 0.15], np.float32)
    logits = np.log(probs)[None].repeat(3, 0)
    top_p = np.array([0.7, 0.8, 0.3], np.float32)
    masked = np.asarray(apply_top_k_top_p(logits, np.zeros(3, np.int32), top_p))
    kept = [set(np.flatnonzero(np.isfinite(m))) for m in masked]
    assert kept == [{1, 3}, {1, 3, 4}, {1}]
    np.testing.assert_array_equal(masked[1, [1, 3, 4]], logits[1, [1, 3, 4]])


def test_top_k_top_p_match_vllm_reference():
    logits = _logits(32, seed=3)
    rng = np.random.default_rng(4)
    k = rng.integers(1, V + 1, size=32).astype(np.int32)
    p = rng.uniform(0.05, 1.0, size=32).astype(np.float32)
    ours = np.asarray(apply_top_k_top_p(logits, k, p))
    np.testing.assert_array_equal(ours, _torch_top_k_top_p(logits, k, p))


def test_min_p_matches_reference_and_crafted():
    logits = _logits(16, seed=5)
    min_p = np.random.default_rng(6).uniform(0.0, 0.9, size=16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(apply_min_p(logits, min_p)), _torch_min_p(logits, min_p))
    probs = np.array([0.5, 0.3, 0.12, 0.08], np.float32)  # min_p 0.2: keep p >= 0.1
    masked = np.asarray(apply_min_p(np.log(probs)[None], np.array([0.2], np.float32)))
    assert set(np.flatnonzero(np.isfinite(masked[0]))) == {0, 1, 2}
    unmasked = np.asarray(apply_min_p(logits, np.zeros(16, np.float32)))
    np.testing.assert_array_equal(unmasked, logits)


def test_only_allowed_tokens_are_ever_drawn():
    # Near-uniform head so every allowed token is drawn often.
    logits = np.linspace(0.0, -0.3, V).astype(np.float32)
    logits[10] = 0.1
    allowed_k = set(np.argsort(-logits)[:4])
    assert set(_many(SamplingParams(top_k=4), logits, 1000)) == allowed_k
    probs = np.exp(logits) / np.exp(logits).sum()
    order = np.argsort(-probs)
    mass_above = np.cumsum(probs[order]) - probs[order]
    allowed_p = set(order[mass_above < 0.3])
    assert set(_many(SamplingParams(top_p=0.3), logits, 2000, seed=1)) == allowed_p
    allowed_min_p = set(np.flatnonzero(probs >= 0.9 * probs.max()))
    assert set(_many(SamplingParams(min_p=0.9), logits, 2000, seed=2)) == allowed_min_p


def _chi_square(draws, probs):
    counts = np.bincount(draws, minlength=len(probs))
    expected = probs * len(draws)
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_distribution(temperature):
    logits = np.array([1.0, 0.5, 0.0, -0.5, -1.0, 0.2], np.float32)
    n = 20000
    draws = _many(SamplingParams(temperature=temperature), logits, n, seed=7)
    expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    # df = 5: P(chi2 > 30) ~ 1.5e-5.
    assert _chi_square(draws, expected) < 30.0
    other = 1.0 if temperature != 1.0 else 0.5
    wrong = np.exp(logits / other) / np.exp(logits / other).sum()
    assert _chi_square(draws, wrong) > 100.0


def _torch_penalties(logits, prompts, outputs, presence, frequency, repetition):
    logits = torch.tensor(logits).clone()
    s, v = logits.shape
    prompt_mask = torch.zeros(s, v, dtype=torch.bool)
    counts = torch.zeros(s, v)
    for i in range(s):
        prompt_mask[i, prompts[i]] = True
        for t in outputs[i]:
            counts[i, t] += 1
    output_mask = counts > 0
    rep = torch.tensor(repetition).unsqueeze(1).repeat(1, v)
    rep[~(prompt_mask | output_mask)] = 1.0
    logits = torch.where(logits > 0, logits / rep, logits * rep)
    logits -= torch.tensor(frequency).unsqueeze(1) * counts
    logits -= torch.tensor(presence).unsqueeze(1) * output_mask
    return logits.numpy()


def test_penalties_exact():
    logits = _logits(3, seed=8, vocab=12)
    logits[:, 3], logits[:, 4] = 2.0, -2.0
    prompts = [[3, 4, 5], [3], [7, 7]]
    outputs = [[4, 6, 6, 6], [], [3, 4, 4]]
    params = [
        SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(repetition_penalty=0.8),
        SamplingParams(presence_penalty=-1.0, frequency_penalty=1.5),
    ]
    rows = [SamplingRow(p, a, b) for p, a, b in zip(params, prompts, outputs)]
    tensors = SamplingTensors.from_rows(rows, 12, 4)
    assert tensors.prompt_token_ids.shape == (4, 16)
    got = np.asarray(apply_penalties(np.vstack([logits, logits[:1]]), tensors))[:3]
    ref = _torch_penalties(logits, prompts, outputs, [p.presence_penalty for p in params],
                           [p.frequency_penalty for p in params], [p.repetition_penalty for p in params])
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    assert got[0, 3] == pytest.approx(2.0 / 1.3)  # prompt token, positive: divided
    assert got[0, 6] == pytest.approx((logits[0, 6] / 1.3 if logits[0, 6] > 0 else logits[0, 6] * 1.3) - 0.5 - 0.75)
    assert got[2, 5] == logits[2, 5]  # unseen token untouched


def test_repetition_penalty_changes_greedy_choice():
    logits = np.zeros((1, 8), np.float32)
    logits[0, 2], logits[0, 5] = 3.0, 2.0
    plain = SamplingParams(temperature=0.0)
    penalised = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert _run([(plain, [2], [])], logits)[0][0] == 2
    assert _run([(penalised, [2], [])], logits)[0][0] == 5


def test_logit_bias_and_min_tokens():
    logits = _logits(3, seed=9)
    top = logits.argmax(-1)
    bias_params = SamplingParams(temperature=0.0, logit_bias={7: 100.0, int(top[1]): -100.0})
    rows = [(bias_params, [], []), (SamplingParams(temperature=0.0, logit_bias={int(top[1]): -100.0}), [], [])]
    tokens = _run(rows, logits[:2])[0]
    assert tokens[0] == 7
    second = np.argsort(-logits[1])[1]
    assert tokens[1] == second
    tensors = SamplingTensors.from_rows([SamplingRow(*r) for r in rows], V, 2)
    biased = np.asarray(apply_logit_bias(logits[:2], tensors.bias_token_ids, tensors.bias_values))
    expected = logits[:2].copy()
    expected[0, 7] += 100.0
    expected[0, top[1]] -= 100.0
    expected[1, top[1]] -= 100.0
    np.testing.assert_allclose(biased, expected, rtol=1e-6)
    # min_tokens: the EOS (the argmax here) and stop ids are banned until 2 tokens are out.
    eos = int(top[2])
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[int(np.argsort(-logits[2])[1])])
    early = [SamplingRow(p, [], [1])]
    t_early = SamplingTensors.from_rows(early, V, 1, eos_token_id=eos)
    f_early = SamplerFlags.from_rows(early, eos_token_id=eos)
    assert f_early.do_logit_bias
    assert int(sample_jit(logits[2:], t_early, f_early)[0][0]) == np.argsort(-logits[2])[2]
    late = [SamplingRow(p, [], [1, 1])]
    t_late = SamplingTensors.from_rows(late, V, 1, eos_token_id=eos)
    assert not SamplerFlags.from_rows(late, eos_token_id=eos).do_logit_bias
    assert int(sample_jit(logits[2:], t_late, SamplerFlags.from_rows(late))[0][0]) == eos


def test_seeded_rows_do_not_depend_on_the_batch():
    logits_row = _logits(1, seed=10)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    other = SamplingParams(temperature=1.3, top_k=20)
    alone, busy = [], []
    for step in range(12):
        out_ids = list(range(step))
        alone.append(_run([(seeded, [1, 2], out_ids)], logits_row[None])[0][0])
        rows = [(other, [], [])] * 3 + [(seeded, [1, 2], out_ids)] + [(SamplingParams(seed=99), [], [])] * 3
        logits = np.vstack([_logits(3, seed=step)[:3], logits_row, _logits(3, seed=step + 50)])
        busy.append(_run(rows, logits, num_rows_padded=16, seed=step + 100)[0][3])
    assert alone == busy
    assert len(set(alone)) > 3  # it is actually sampling, not stuck on one token
    shifted = [_run([(SamplingParams(temperature=1.0, top_p=0.95, seed=1235), [1, 2], list(range(s)))],
                    logits_row[None])[0][0] for s in range(12)]
    assert shifted != alone
    second_sample = [_run([SamplingRow(seeded, [1, 2], list(range(s)), 1)], logits_row[None])[0][0]
                     for s in range(12)]
    assert second_sample == shifted  # sample i of a seeded request draws with seed + i


def test_seeded_key_is_pure():
    np.testing.assert_array_equal(seeded_prng_key(5, 3), seeded_prng_key(5, 3))
    assert not np.array_equal(seeded_prng_key(5, 3), seeded_prng_key(5, 4))
    assert seeded_prng_key(-1, 0).dtype == np.uint32


def _torch_logprobs(logits):
    return torch.log_softmax(torch.tensor(logits), dim=-1).numpy()


def test_logprobs_are_of_the_raw_distribution():
    logits = _logits(5, seed=11)
    params = [
        SamplingParams(temperature=0.8, logprobs=3, repetition_penalty=1.5, logit_bias={3: 5.0}),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=1.0, top_k=5, logprobs=5),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0, logprobs=2, presence_penalty=1.0),
    ]
    rows = [(p, [3, 4], [5, 6]) for p in params]
    tokens, lps, ranks, topk_ids, topk_lps = _run(rows, logits, num_rows_padded=8)
    assert topk_ids.shape == (8, 5)
    ref = _torch_logprobs(logits)
    np.testing.assert_allclose(lps[:5], ref[np.arange(5), tokens[:5]], rtol=1e-5, atol=1e-6)
    expected_ranks = (ref >= ref[np.arange(5), tokens[:5]][:, None]).sum(-1)
    np.testing.assert_array_equal(ranks[:5], expected_ranks)
    top_ref = torch.topk(torch.tensor(ref), 5)
    np.testing.assert_array_equal(topk_ids[:5], top_ref.indices.numpy())
    np.testing.assert_allclose(topk_lps[:5], top_ref.values.numpy(), rtol=1e-5, atol=1e-6)


def test_processed_logprobs_mode():
    logits = _logits(2, seed=12)
    rows = [(SamplingParams(temperature=0.5, top_k=3, logprobs=4), [], []),
            (SamplingParams(temperature=0.5, logprobs=1), [], [])]
    _, lps, _, topk_ids, topk_lps = _run(rows, logits, logprobs_mode="processed_logprobs")
    np.testing.assert_allclose(topk_lps[1, 0], _torch_logprobs(logits / 0.5)[1].max(), rtol=1e-5)
    assert np.isneginf(topk_lps[0, 3])  # outside the top 3: impossible under the sampled distribution
    masked = _torch_top_k_top_p(logits[:1] / 0.5, np.array([3]), np.array([1.0], np.float32))
    np.testing.assert_allclose(topk_lps[0, :3], np.sort(_torch_logprobs(masked)[0])[::-1][:3], rtol=1e-5)
    with pytest.raises(ValueError, match="logprobs_mode"):
        SamplerFlags(logprobs_mode="raw")


def test_prompt_logprobs():
    logits = _logits(6, seed=13)
    next_ids = np.array([4, 9, 0, 63, 17, 4], np.int32)
    out = compute_prompt_logprobs_jit(logits, next_ids, 3)
    ref = _torch_logprobs(logits)
    np.testing.assert_allclose(np.asarray(out.token_logprobs), ref[np.arange(6), next_ids], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.ranks), (ref >= ref[np.arange(6), next_ids][:, None]).sum(-1))
    top_ref = torch.topk(torch.tensor(ref), 3)
    np.testing.assert_array_equal(np.asarray(out.topk_ids), top_ref.indices.numpy())
    np.testing.assert_allclose(np.asarray(out.topk_logprobs), top_ref.values.numpy(), rtol=1e-5, atol=1e-6)


def test_build_logprob_dict():
    d = build_logprob_dict(9, -3.0, 7, [1, 9, 2], [-0.1, -0.2, -0.5], 2)
    assert d == {9: Logprob(-3.0, 7), 1: Logprob(-0.1, 1)}
    d = build_logprob_dict(1, -0.1, 1, [1, 9, 2], [-0.1, -0.2, -0.5], 2)
    assert d == {1: Logprob(-0.1, 1), 9: Logprob(-0.2, 2)}


def test_superset_flags_give_the_same_tokens():
    logits = _logits(4, seed=14)
    rows = [(SamplingParams(temperature=0.0), [], []), (SamplingParams(temperature=0.9, seed=3), [], [2])]
    minimal = _run(rows, logits[:2], num_rows_padded=4)
    everything = SamplerFlags(all_greedy=False, do_min_p=True, do_top_k_top_p=True, do_penalties=True,
                              do_logit_bias=True, return_logprobs=True, num_top_logprobs=4)
    full = _run(rows, logits[:2], num_rows_padded=4, flags=everything)
    np.testing.assert_array_equal(minimal[0][:2], full[0][:2])


def test_from_rows_padding_and_errors():
    rows = [SamplingRow(SamplingParams(temperature=0.7, top_k=1000, seed=1), [1, 2, 3], [4])]
    t = SamplingTensors.from_rows(rows, V, 4)
    assert t.temperature.tolist() == pytest.approx([0.7, 0, 0, 0])
    assert t.top_k.tolist() == [V, 0, 0, 0]
    assert t.bias_token_ids.shape == (4, 0) and t.prompt_token_ids.shape == (4, 0)
    rows.append(SamplingRow(SamplingParams(frequency_penalty=1.0, logit_bias={2: 1.0}), list(range(20)), []))
    t = SamplingTensors.from_rows(rows, V, 4)
    assert t.prompt_token_ids.shape == (4, 32) and t.output_token_ids.shape == (4, 0)
    assert (t.prompt_token_ids[0] == PAD_TOKEN_ID).all()  # row 0 has no penalty
    assert t.bias_token_ids.shape == (4, 8)
    with pytest.raises(ValueError, match="num_rows_padded"):
        SamplingTensors.from_rows(rows, V, 1)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingTensors.from_rows([(SamplingParams(logit_bias={V: 1.0}), [], [])], V, 1)
    with pytest.raises(ValueError, match="logprobs must be at most 2"):
        SamplerFlags.from_rows([(SamplingParams(logprobs=5), [], [])], num_top_logprobs=2)
