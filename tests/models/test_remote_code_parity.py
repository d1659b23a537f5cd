"""Ports of remote-code families (Baichuan-7B / Baichuan2-7B, InternLM, Qwen v1, Aquila, Yi),
checked by writing an HF-native model's weights under the family's published tensor names and
config keys, loading that through our loader, and comparing with the HF-native model."""

import numpy as np
import torch

from tests.helpers.parity_helpers import (NEW_TOKENS, assert_port_matches, hf_reference, make_hf_model, prompt_for,
                                  save_hf, state_dict_numpy, write_checkpoint)

LLAMA = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-6)


def _reference(tmp_path, config_cls, kwargs, edit=None):
    model = make_hf_model(config_cls, kwargs)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    path = save_hf(model, str(tmp_path / "hf"))
    prompt = prompt_for(kwargs["vocab_size"])
    tokens, logits = hf_reference(path, prompt, NEW_TOKENS)
    return state_dict_numpy(model), prompt, tokens, logits


def _llama_keys(kw: dict) -> dict:
    return {k: kw[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "rms_norm_eps")}


def _w_pack(sd: dict) -> dict:
    """Llama q/k/v → Baichuan's W_pack ([q | k | v] rows)."""
    out = {}
    for name, w in sd.items():
        if ".self_attn.q_proj." in name:
            k, v = sd[name.replace("q_proj", "k_proj")], sd[name.replace("q_proj", "v_proj")]
            out[name.replace("q_proj", "W_pack")] = np.concatenate([w, k, v])
        elif ".self_attn.k_proj." not in name and ".self_attn.v_proj." not in name:
            out[name] = w
    return out


def test_baichuan_7b_rope(tmp_path):
    sd, prompt, tokens, logits = _reference(tmp_path, "LlamaConfig", LLAMA)
    cfg = {**_llama_keys(LLAMA), "architectures": ["BaiChuanForCausalLM"], "model_type": "baichuan",
           "hidden_act": "silu", "max_position_embeddings": 256, "tie_word_embeddings": False}
    path = write_checkpoint(str(tmp_path / "baichuan"), _w_pack(sd), cfg)
    lm = assert_port_matches(path, prompt, tokens, logits, "BaiChuanForCausalLM")
    assert not lm.config.use_alibi and not lm.config.norm_head


def test_baichuan2_7b_norm_head(tmp_path):
    """The HF model's head has unit rows; the Baichuan2 checkpoint stores them rescaled, as a trained
    NormHead does, so only a port that normalises them matches."""
    def unit_rows(model):
        w = model.lm_head.weight
        w.copy_(w / w.norm(dim=1, keepdim=True))

    sd, prompt, tokens, logits = _reference(tmp_path, "LlamaConfig", LLAMA, unit_rows)
    scales = np.random.default_rng(4).uniform(0.2, 5.0, (LLAMA["vocab_size"], 1)).astype(np.float32)
    sd["lm_head.weight"] = sd["lm_head.weight"] * scales
    cfg = {**_llama_keys(LLAMA), "architectures": ["BaichuanForCausalLM"], "model_type": "baichuan",
           "hidden_act": "silu", "max_position_embeddings": 256, "model_max_length": 256, "z_loss_weight": 0,
           "tie_word_embeddings": False}
    path = write_checkpoint(str(tmp_path / "baichuan2"), _w_pack(sd), cfg)
    lm = assert_port_matches(path, prompt, tokens, logits, "BaichuanForCausalLM")
    assert lm.config.norm_head


def test_internlm_biases_and_rotary_base(tmp_path):
    kwargs = {**LLAMA, "attention_bias": True, "rope_theta": 50000.0}
    sd, prompt, tokens, logits = _reference(tmp_path, "LlamaConfig", kwargs)
    assert "model.layers.0.self_attn.o_proj.bias" in sd
    cfg = {**_llama_keys(kwargs), "architectures": ["InternLMForCausalLM"], "model_type": "internlm",
           "bias": True, "hidden_act": "silu", "max_position_embeddings": 256, "tie_word_embeddings": False,
           "rotary": {"base": 50000, "type": "dynamic"}}
    path = write_checkpoint(str(tmp_path / "internlm"), sd, cfg)
    assert_port_matches(path, prompt, tokens, logits, "InternLMForCausalLM")


def test_qwen_v1(tmp_path):
    kwargs = {**LLAMA, "rope_theta": 20000.0, "tie_word_embeddings": False}
    sd, prompt, tokens, logits = _reference(tmp_path, "Qwen2Config", kwargs)
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"], "transformer.ln_f.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(kwargs["num_hidden_layers"]):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.c_attn.{kind}"] = np.concatenate(
                [sd[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
        out[dst + "attn.c_proj.weight"] = sd[src + "self_attn.o_proj.weight"]
        out[dst + "mlp.w1.weight"] = sd[src + "mlp.up_proj.weight"]  # Qwen: w1(x) * silu(w2(x))
        out[dst + "mlp.w2.weight"] = sd[src + "mlp.gate_proj.weight"]
        out[dst + "mlp.c_proj.weight"] = sd[src + "mlp.down_proj.weight"]
        out[dst + "ln_1.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "ln_2.weight"] = sd[src + "post_attention_layernorm.weight"]
    cfg = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "vocab_size": kwargs["vocab_size"],
           "hidden_size": kwargs["hidden_size"], "num_hidden_layers": kwargs["num_hidden_layers"],
           "num_attention_heads": kwargs["num_attention_heads"], "kv_channels": 16,
           "intermediate_size": 2 * kwargs["intermediate_size"], "layer_norm_epsilon": kwargs["rms_norm_eps"],
           "rotary_emb_base": 20000, "rotary_pct": 1.0, "seq_length": 256, "max_position_embeddings": 8192,
           "use_dynamic_ntk": True, "use_logn_attn": True, "no_bias": True, "tie_word_embeddings": False}
    path = write_checkpoint(str(tmp_path / "qwen"), out, cfg)
    lm = assert_port_matches(path, prompt, tokens, logits, "QWenLMHeadModel")
    assert lm.config.max_position_embeddings == 256  # capped: dynamic NTK / logn not implemented


def _same_weights_other_config(tmp_path, kwargs, name: str, cfg_edit: dict, rename=None):
    sd, prompt, tokens, logits = _reference(tmp_path, "LlamaConfig", kwargs)
    if rename:
        sd = {rename(k): v for k, v in sd.items()}
    import json
    cfg = {**json.load(open(tmp_path / "hf" / "config.json")), **cfg_edit}
    path = write_checkpoint(str(tmp_path / name), sd, cfg)
    return path, prompt, tokens, logits


def test_aquila_loads_as_llama(tmp_path):
    path, prompt, tokens, logits = _same_weights_other_config(
        tmp_path, LLAMA, "aquila", {"architectures": ["AquilaForCausalLM"], "model_type": "aquila"})
    assert_port_matches(path, prompt, tokens, logits, "AquilaForCausalLM")


YI = {**LLAMA, "num_attention_heads": 8, "num_key_value_heads": 1, "rope_theta": 5_000_000.0, "rms_norm_eps": 1e-5}


def test_yi_llama_checkpoint(tmp_path):
    path, prompt, tokens, logits = _same_weights_other_config(tmp_path, YI, "yi", {})
    assert_port_matches(path, prompt, tokens, logits, "LlamaForCausalLM")


def test_yi_remote_code_names(tmp_path):
    rename = lambda k: k.replace("input_layernorm", "ln1").replace("post_attention_layernorm", "ln2")
    path, prompt, tokens, logits = _same_weights_other_config(
        tmp_path, YI, "yi_remote", {"architectures": ["YiForCausalLM"], "model_type": "Yi"}, rename)
    assert_port_matches(path, prompt, tokens, logits, "YiForCausalLM")
