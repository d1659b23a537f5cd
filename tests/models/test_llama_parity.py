"""Llama / Mistral / Qwen2 ports against HF transformers (float32, CPU) on tiny random configs."""

import numpy as np
import pytest
import torch

from jaxpaged.model_loader import load_model
from tests.helpers.paged_driver import hf_reference, max_rel_err, paged_greedy

BASE = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            initializer_range=0.1)

CASES = {
    "llama_mha": ("LlamaConfig", {}),
    "llama_gqa_4to1": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2)),
    "llama_mqa": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=1)),
    "llama_head_dim_80": ("LlamaConfig", dict(hidden_size=96, num_attention_heads=2, num_key_value_heads=1, head_dim=80)),
    "llama_vocab_odd": ("LlamaConfig", dict(vocab_size=997)),
    "llama_attention_bias": ("LlamaConfig", dict(attention_bias=True)),
    "rope_linear": ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "rope_dynamic": ("LlamaConfig", dict(max_position_embeddings=24, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "rope_llama3": ("LlamaConfig", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "rope_yarn": ("LlamaConfig", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    "rope_theta": ("LlamaConfig", dict(rope_theta=500000.0)),
    "mistral_sliding_window": ("MistralConfig", dict(sliding_window=7, num_key_value_heads=2)),
    "qwen2_tied_bias": ("Qwen2Config", dict(tie_word_embeddings=True, num_key_value_heads=2)),
    "qwen2_sliding_upper_layers": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=6,
                                                       max_window_layers=1, num_key_value_heads=2)),
}

PROMPT_LEN = 20
NEW_TOKENS = 32


def make_checkpoint(tmp_path, config_cls: str, overrides: dict, seed: int = 0) -> str:
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**{**BASE, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    path = str(tmp_path / "ckpt")
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_logits_and_greedy_match_hf(tmp_path, case):
    config_cls, overrides = CASES[case]
    path = make_checkpoint(tmp_path, config_cls, overrides)
    prompt = np.random.default_rng(1).integers(3, BASE["vocab_size"] - 10, PROMPT_LEN).tolist()
    ref_tokens, ref_logits = hf_reference(path, prompt, NEW_TOKENS)

    lm = load_model(path, dtype="float32")
    tokens, logits = paged_greedy(lm, prompt, NEW_TOKENS, block_size=4)
    assert max_rel_err(logits, ref_logits) <= 1e-4
    assert tokens == ref_tokens


def test_chunked_prefill_matches_one_shot(tmp_path):
    path = make_checkpoint(tmp_path, "LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2))
    lm = load_model(path, dtype="float32")
    prompt = list(range(5, 5 + 23))
    one, logits_one = paged_greedy(lm, prompt, 8)
    chunked, logits_chunked = paged_greedy(lm, prompt, 8, prefill_chunk=5)
    assert one == chunked
    np.testing.assert_allclose(logits_chunked, logits_one, rtol=0, atol=1e-4 * np.abs(logits_one).max())
