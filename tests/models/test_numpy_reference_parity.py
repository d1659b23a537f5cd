"""ChatGLM2/3 and Baichuan-13B (ALiBi) ports against independent NumPy forward passes of their
published modeling code (no HF-native architecture computes the same function)."""

import functools

import numpy as np
import pytest

from tests.helpers.numpy_references import baichuan_13b_logits, chatglm_logits, greedy
from tests.helpers.parity_helpers import NEW_TOKENS, assert_port_matches, prompt_for, write_checkpoint

VOCAB = 1000


def _random(rng, shape, scale=0.1):
    return rng.standard_normal(shape) * scale


def chatglm_weights(cfg: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    H, nh, hn, ff = cfg["hidden_size"], cfg["num_attention_heads"], cfg["kv_channels"], cfg["ffn_hidden_size"]
    ng = cfg["multi_query_group_num"] if cfg["multi_query_attention"] else nh
    qkv_bias = cfg["add_bias_linear"] or cfg["add_qkv_bias"]
    w = {"transformer.embedding.word_embeddings.weight": _random(rng, (VOCAB, H), 1.0),
         "transformer.output_layer.weight": _random(rng, (VOCAB, H), 0.2),
         "transformer.rotary_pos_emb.inv_freq": np.arange(hn // 4, dtype=np.float64)}  # ignored buffer

    def norm(name):
        w[name + ".weight"] = 1.0 + _random(rng, (H,))
        if not cfg["rmsnorm"]:
            w[name + ".bias"] = _random(rng, (H,))

    def lin(name, out, inp, bias):
        w[name + ".weight"] = _random(rng, (out, inp), 0.15)
        if bias:
            w[name + ".bias"] = _random(rng, (out,))

    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        norm(p + "input_layernorm")
        lin(p + "self_attention.query_key_value", (nh + 2 * ng) * hn, H, qkv_bias)
        lin(p + "self_attention.dense", H, nh * hn, cfg["add_bias_linear"])
        norm(p + "post_attention_layernorm")
        lin(p + "mlp.dense_h_to_4h", 2 * ff, H, cfg["add_bias_linear"])
        lin(p + "mlp.dense_4h_to_h", H, ff, cfg["add_bias_linear"])
    if cfg["post_layer_norm"]:
        norm("transformer.encoder.final_layernorm")
    return w


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


def baichuan_13b_weights(cfg: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    w = {"model.embed_tokens.weight": _random(rng, (V, H), 1.0), "model.norm.weight": 1.0 + _random(rng, (H,)),
         "lm_head.weight": _random(rng, (V, H), 0.2) * rng.uniform(0.2, 5.0, (V, 1))}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1.0 + _random(rng, (H,))
        w[p + "post_attention_layernorm.weight"] = 1.0 + _random(rng, (H,))
        w[p + "self_attn.W_pack.weight"] = _random(rng, (3 * H, H), 0.15)
        w[p + "self_attn.o_proj.weight"] = _random(rng, (H, H), 0.15)
        w[p + "mlp.gate_proj.weight"] = _random(rng, (I, H), 0.15)
        w[p + "mlp.up_proj.weight"] = _random(rng, (I, H), 0.15)
        w[p + "mlp.down_proj.weight"] = _random(rng, (H, I), 0.15)
    return w


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
