"""Tiny random checkpoints, one per layout the tensor-parallel tests cover: every registered
architecture name, with 8 query heads (so tp = 2, 4 and 8 all split them) and KV heads from 8 down
to 1 (sharded, replicated, multi-query), written as the published checkpoints hold them (packed
projections included) so that loading re-lays them out exactly as it would a real one."""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np
import torch

from tests.helpers.parity_helpers import make_hf_model, save_hf, state_dict_numpy, write_checkpoint
from tests.helpers.remote_code_weights import baichuan_13b_weights, chatglm_weights

VOCAB = 256  # divides by 8: the embedding and LM head split over the devices
H = 64  # hidden size: 8 heads of 8
LLAMA = dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-6)


def _perturbed(model):
    # HF initialises biases to 0 and norm weights to 1: perturb every vector so a bias or norm
    # split or replicated wrongly changes the logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _native(config_cls: str, kwargs: dict) -> Callable[[str], str]:
    return lambda path: save_hf(_perturbed(make_hf_model(config_cls, kwargs)), path)


def _llama_weights(kwargs: dict, config_cls: str = "LlamaConfig") -> dict:
    return state_dict_numpy(_perturbed(make_hf_model(config_cls, kwargs)))


def _llama_config(kwargs: dict, **extra) -> dict:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "max_position_embeddings")
    return {**{k: kwargs[k] for k in keys if k in kwargs}, "hidden_act": "silu", "tie_word_embeddings": False, **extra}


def _aquila(path: str) -> str:
    kwargs = {**LLAMA, "num_key_value_heads": 8}
    return write_checkpoint(path, _llama_weights(kwargs),
                            _llama_config(kwargs, architectures=["AquilaForCausalLM"], model_type="aquila"))


def _yi(path: str) -> str:
    kwargs = {**LLAMA, "num_key_value_heads": 1, "rope_theta": 5_000_000.0}
    rename = lambda k: k.replace("input_layernorm", "ln1").replace("post_attention_layernorm", "ln2")  # noqa: E731
    sd = {rename(k): v for k, v in _llama_weights(kwargs).items()}
    return write_checkpoint(path, sd, _llama_config(kwargs, architectures=["YiForCausalLM"], model_type="Yi",
                                                   rope_theta=5_000_000.0))


def _internlm(path: str) -> str:
    kwargs = {**LLAMA, "num_key_value_heads": 8, "attention_bias": True}
    return write_checkpoint(path, _llama_weights(kwargs), _llama_config(
        kwargs, architectures=["InternLMForCausalLM"], model_type="internlm", bias=True,
        rotary={"base": 10000, "type": "origin"}))


def _baichuan_7b(path: str) -> str:
    kwargs = {**LLAMA, "num_key_value_heads": 8}
    sd = _llama_weights(kwargs)
    out = {}
    for name, w in sd.items():
        if ".self_attn.q_proj." in name:  # Baichuan's W_pack: [q | k | v] rows
            k, v = sd[name.replace("q_proj", "k_proj")], sd[name.replace("q_proj", "v_proj")]
            out[name.replace("q_proj", "W_pack")] = np.concatenate([w, k, v])
        elif ".self_attn.k_proj." not in name and ".self_attn.v_proj." not in name:
            out[name] = w
    cfg = _llama_config(kwargs, architectures=["BaiChuanForCausalLM"], model_type="baichuan")
    cfg.pop("num_key_value_heads")
    return write_checkpoint(path, out, cfg)


def _baichuan2_13b(path: str) -> str:
    cfg = dict(architectures=["BaichuanForCausalLM"], model_type="baichuan", vocab_size=VOCAB, hidden_size=H,
               intermediate_size=128, num_hidden_layers=2, num_attention_heads=8, model_max_length=256,
               rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False, z_loss_weight=0)
    return write_checkpoint(path, baichuan_13b_weights(cfg), cfg)


def _chatglm(arch: str, **flags) -> Callable[[str], str]:
    cfg = dict(architectures=[arch], model_type="chatglm", padded_vocab_size=VOCAB, hidden_size=H, num_layers=2,
               num_attention_heads=8, kv_channels=8, ffn_hidden_size=96, layernorm_epsilon=1e-5, seq_length=256,
               multi_query_attention=True, multi_query_group_num=2, add_qkv_bias=True, add_bias_linear=False,
               apply_residual_connection_post_layernorm=False, post_layer_norm=True, rmsnorm=True,
               original_rope=True, tie_word_embeddings=False, eos_token_id=2, pad_token_id=0)
    cfg.update(flags)
    return lambda path: write_checkpoint(path, chatglm_weights(cfg), cfg)


def _qwen_v1(path: str) -> str:
    kwargs = {**LLAMA, "num_key_value_heads": 8, "tie_word_embeddings": False}
    sd = _llama_weights(kwargs, "Qwen2Config")
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"], "transformer.ln_f.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(kwargs["num_hidden_layers"]):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.c_attn.{kind}"] = np.concatenate([sd[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
        out[dst + "attn.c_proj.weight"] = sd[src + "self_attn.o_proj.weight"]
        out[dst + "mlp.w1.weight"] = sd[src + "mlp.up_proj.weight"]
        out[dst + "mlp.w2.weight"] = sd[src + "mlp.gate_proj.weight"]
        out[dst + "mlp.c_proj.weight"] = sd[src + "mlp.down_proj.weight"]
        out[dst + "ln_1.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "ln_2.weight"] = sd[src + "post_attention_layernorm.weight"]
    cfg = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "vocab_size": VOCAB, "hidden_size": H,
           "num_hidden_layers": 2, "num_attention_heads": 8, "kv_channels": 8, "intermediate_size": 256,
           "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 256,
           "no_bias": True, "tie_word_embeddings": False}
    return write_checkpoint(path, out, cfg)


def _falcon_rw_alibi(path: str) -> str:
    kwargs = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2, num_attention_heads=8, initializer_range=0.1,
                  alibi=True, multi_query=False, parallel_attn=False, bias=True)
    save_hf(_perturbed(make_hf_model("FalconConfig", kwargs)), path)
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    rw = {k: v for k, v in cfg.items() if k not in ("num_attention_heads", "num_hidden_layers", "num_kv_heads")}
    rw.update(model_type="RefinedWebModel", architectures=["RWForCausalLM"], n_head=8, n_layer=2)
    json.dump(rw, open(cfg_path, "w"))
    return path


_GPT = dict(n_embd=H, n_layer=2, n_head=8, n_positions=256, initializer_range=0.1, bos_token_id=1, eos_token_id=2)

# name -> builder(path) -> path. Comments: KV heads of the 8 query heads, and what the case covers.
TP_CASES: dict[str, Callable[[str], str]] = {
    "llama_gqa": _native("LlamaConfig", LLAMA),  # 2 KV heads: split at tp 2, replicated at 4 and 8
    "aquila_mha": _aquila,
    "mistral_window": _native("MistralConfig", {**LLAMA, "num_key_value_heads": 4, "sliding_window": 6}),
    "qwen2_bias_tied": _native("Qwen2Config", {**LLAMA, "tie_word_embeddings": True}),
    "yi_mqa": _yi,  # 1 KV head
    "internlm_bias": _internlm,
    "baichuan_7b_w_pack": _baichuan_7b,  # packed [q | k | v]
    "baichuan2_13b_alibi": _baichuan2_13b,  # ALiBi, NormHead, packed
    "chatglm2_groups": _chatglm("ChatGLMModel"),  # 2 KV groups packed with q, packed SwiGLU halves
    "chatglm_mha_flags": _chatglm("ChatGLMForConditionalGeneration", multi_query_attention=False, rmsnorm=False,
                                  add_bias_linear=True, add_qkv_bias=False, post_layer_norm=False),
    "qwen_v1_c_attn": _qwen_v1,
    # 1001 tokens: no split of the vocabulary over 2, 4 or 8 devices, the embedding stays replicated.
    "gpt2_odd_vocab": _native("GPT2Config", {**_GPT, "vocab_size": 1001}),
    "bigcode_mqa": _native("GPTBigCodeConfig", {**_GPT, "vocab_size": VOCAB, "multi_query": True}),
    "bigcode_mha": _native("GPTBigCodeConfig", {**_GPT, "vocab_size": VOCAB, "multi_query": False}),
    "gptj_tied_bias": _native("GPTJConfig", {**_GPT, "vocab_size": VOCAB, "rotary_dim": 4, "tie_word_embeddings": True}),
    "neox": _native("GPTNeoXConfig", dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=8, max_position_embeddings=256, initializer_range=0.1)),
    "opt_proj": _native("OPTConfig", dict(vocab_size=VOCAB, hidden_size=H, ffn_dim=128, num_hidden_layers=2,
                                          num_attention_heads=8, max_position_embeddings=256, init_std=0.1,
                                          pad_token_id=1, word_embed_proj_dim=32)),
    "phi_gqa_qk_norm": _native("PhiConfig", dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                                 qk_layernorm=True, max_position_embeddings=256,
                                                 initializer_range=0.1)),
    "bloom_alibi": _native("BloomConfig", dict(vocab_size=VOCAB, hidden_size=H, n_layer=2, n_head=8,
                                               initializer_range=0.1)),
    "mpt_alibi": _native("MptConfig", dict(vocab_size=VOCAB, d_model=H, n_heads=8, n_layers=2, max_seq_len=256,
                                           initializer_range=0.1)),
    # falcon-7b layout: one KV head packed after all query heads, parallel attention + MLP.
    "falcon_7b_mqa": _native("FalconConfig", dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2,
                                                  num_attention_heads=8, multi_query=True, parallel_attn=True,
                                                  initializer_range=0.1)),
    # falcon-40b layout: 2 KV groups [q.., k, v], replicated at tp 4 and 8.
    "falcon_40b_gqa": _native("FalconConfig", dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2,
                                                   num_attention_heads=8, new_decoder_architecture=True, num_kv_heads=2,
                                                   initializer_range=0.1)),
    "falcon_rw_alibi": _falcon_rw_alibi,
}


def build(case: str, path: str) -> str:
    torch.manual_seed(0)
    return TP_CASES[case](path)
