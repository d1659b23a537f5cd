"""ChatGLM2/3 and Baichuan-13B (ALiBi) ports against independent NumPy forward passes of their
published modeling code (no HF-native architecture computes the same function)."""

import functools

import numpy as np
import pytest

from tests.helpers.numpy_references import baichuan_13b_logits, chatglm_logits, greedy
from tests.helpers.parity_helpers import NEW_TOKENS, assert_port_matches, prompt_for, write_checkpoint
from tests.helpers.remote_code_weights import baichuan_13b_weights, chatglm_weights

VOCAB = 1000


CHATGLM_BASE = dict(architectures=["ChatGLMModel"], model_type="chatglm", padded_vocab_size=VOCAB, hidden_size=64,
                    num_layers=2, num_attention_heads=4, kv_channels=16, ffn_hidden_size=96, layernorm_epsilon=1e-5,
                    seq_length=256, multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True,
                    add_bias_linear=False, apply_residual_connection_post_layernorm=False, post_layer_norm=True,
                    rmsnorm=True, original_rope=True, tie_word_embeddings=False, eos_token_id=2, pad_token_id=0)

CHATGLM_CASES = {
    # chatglm2-6b / chatglm3-6b layout: MQA groups, qkv bias only, RMSNorm, final norm.
    "chatglm2_mqa": {},
    # every other flag flipped: full MHA, LayerNorm with biases, all linear biases, post-LN residuals,
    # no final norm, rope_ratio (chatglm3-6b-32k) and the ChatGLMForConditionalGeneration name.
    "chatglm_flags_flipped": dict(multi_query_attention=False, rmsnorm=False, add_bias_linear=True,
                                  add_qkv_bias=False, apply_residual_connection_post_layernorm=True,
                                  post_layer_norm=False, rope_ratio=50.0,
                                  architectures=["ChatGLMForConditionalGeneration"]),
}


@pytest.mark.parametrize("case", sorted(CHATGLM_CASES))
def test_chatglm_matches_numpy_reference(tmp_path, case):
    cfg = {**CHATGLM_BASE, **CHATGLM_CASES[case]}
    w = chatglm_weights(cfg)
    path = write_checkpoint(str(tmp_path / "ckpt"), w, cfg)
    # The reference sees the weights as stored (float32), computed in float64.
    w64 = {k: v.astype(np.float32).astype(np.float64) for k, v in w.items()}
    prompt = prompt_for(VOCAB)
    tokens, logits = greedy(functools.partial(chatglm_logits, w64, cfg), prompt, NEW_TOKENS)
    assert_port_matches(path, prompt, tokens, logits, cfg["architectures"][0])


BAICHUAN_13B = dict(architectures=["BaichuanForCausalLM"], model_type="baichuan", vocab_size=VOCAB, hidden_size=48,
                    intermediate_size=96, num_hidden_layers=2, num_attention_heads=6, model_max_length=256,
                    rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False)


@pytest.mark.parametrize("variant", ["baichuan_13b", "baichuan2_13b_norm_head"])
def test_baichuan_13b_alibi_matches_numpy_reference(tmp_path, variant):
    # 6 heads: not a power of two, so the interleaved extra slopes are exercised.
    cfg = dict(BAICHUAN_13B, **({"z_loss_weight": 0} if variant == "baichuan2_13b_norm_head" else {}))
    w = baichuan_13b_weights(cfg)
    path = write_checkpoint(str(tmp_path / "ckpt"), w, cfg)
    w64 = {k: v.astype(np.float32).astype(np.float64) for k, v in w.items()}
    prompt = prompt_for(VOCAB)
    tokens, logits = greedy(functools.partial(baichuan_13b_logits, w64, cfg), prompt, NEW_TOKENS)
    lm = assert_port_matches(path, prompt, tokens, logits, "BaichuanForCausalLM")
    assert lm.config.use_alibi and lm.config.norm_head == (variant == "baichuan2_13b_norm_head")
