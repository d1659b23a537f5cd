"""Random weights under the published tensor names of remote-code families with no HF-native
twin (ChatGLM2/3, Baichuan-13B), as their checkpoints hold them (float64; written as float32)."""

from __future__ import annotations

import numpy as np


def _random(rng, shape, scale=0.1):
    return rng.standard_normal(shape) * scale


def chatglm_weights(cfg: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    H, nh, hn, ff = cfg["hidden_size"], cfg["num_attention_heads"], cfg["kv_channels"], cfg["ffn_hidden_size"]
    ng = cfg["multi_query_group_num"] if cfg["multi_query_attention"] else nh
    qkv_bias = cfg["add_bias_linear"] or cfg["add_qkv_bias"]
    V = cfg["padded_vocab_size"]
    w = {"transformer.embedding.word_embeddings.weight": _random(rng, (V, H), 1.0),
         "transformer.output_layer.weight": _random(rng, (V, H), 0.2),
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
