"""BLOOM port against HF transformers (float32, CPU) on tiny random configs."""

import pytest

from tests.helpers.parity_helpers import NEW_TOKENS, assert_port_matches, hf_reference, make_hf_model, prompt_for, save_hf

BASE = dict(vocab_size=1000, hidden_size=64, n_layer=2, n_head=4, initializer_range=0.1)

CASES = {
    "bloom_4_heads": {},
    # 6 heads: not a power of two, so the interleaved extra ALiBi slopes are exercised.
    "bloom_6_heads_post_ln_residual": dict(hidden_size=48, n_head=6, apply_residual_connection_post_layernorm=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bloom_matches_hf(tmp_path, case):
    kwargs = {**BASE, **CASES[case]}
    path = save_hf(make_hf_model("BloomConfig", kwargs), str(tmp_path / "ckpt"))
    prompt = prompt_for(kwargs["vocab_size"])
    ref_tokens, ref_logits = hf_reference(path, prompt, NEW_TOKENS)
    assert_port_matches(path, prompt, ref_tokens, ref_logits, "BloomForCausalLM")
