"""Falcon port against HF transformers (float32, CPU) on tiny random configs, one per layout flag,
plus the same weights under the pre-transformers ``RWForCausalLM`` config keys."""

import json
import os
import shutil

import pytest
import torch

from tests.helpers.parity_helpers import (NEW_TOKENS, assert_port_matches, hf_reference, make_hf_model, prompt_for,
                                  save_hf, torch_reference)

BASE = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, initializer_range=0.1,
            max_position_embeddings=256)

CASES = {
    # falcon-7b: one KV head, attention and MLP in parallel off one input_layernorm.
    "falcon_7b_multi_query_parallel": dict(multi_query=True, parallel_attn=True),
    # falcon-40b/180b: grouped KV heads, ln_attn + ln_mlp.
    "falcon_40b_new_decoder_gqa": dict(new_decoder_architecture=True, num_attention_heads=8, num_kv_heads=2),
    # falcon-11b: new decoder with a single shared layer norm, here with biases too.
    "falcon_11b_new_decoder_one_ln_bias": dict(new_decoder_architecture=True, num_attention_heads=8, num_kv_heads=2,
                                                num_ln_in_parallel_attn=1, bias=True),
    # sequential block, per-head [q|k|v] packing (multi_query false), biases.
    "falcon_sequential_mha_bias": dict(multi_query=False, parallel_attn=False, bias=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_falcon_matches_hf(tmp_path, case):
    kwargs = {**BASE, **CASES[case]}
    path = save_hf(make_hf_model("FalconConfig", kwargs), str(tmp_path / "ckpt"))
    prompt = prompt_for(kwargs["vocab_size"])
    ref_tokens, ref_logits = hf_reference(path, prompt, NEW_TOKENS)
    assert_port_matches(path, prompt, ref_tokens, ref_logits, "FalconForCausalLM")


def test_falcon_rw_alibi_matches_hf(tmp_path):
    """falcon-rw-1b layout. HF's eager Falcon attention adds ALiBi twice (once itself, once through
    the mask it is merged into), so the reference is HF's SDPA path, which applies it once."""
    from transformers import AutoModelForCausalLM

    kwargs = {**BASE, "alibi": True, "multi_query": False, "parallel_attn": False, "bias": True}
    path = save_hf(make_hf_model("FalconConfig", kwargs), str(tmp_path / "ckpt"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    prompt = prompt_for(kwargs["vocab_size"])
    ref_tokens, ref_logits = torch_reference(model, prompt, NEW_TOKENS)
    assert_port_matches(path, prompt, ref_tokens, ref_logits, "FalconForCausalLM")


def _as_rw(src: str, dst: str, model_type: str, drop: tuple[str, ...], extra: dict) -> str:
    """The same weights with a configuration_RW.py-style config.json."""
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "model.safetensors"), dst)
    cfg = json.load(open(os.path.join(src, "config.json")))
    rw = {k: v for k, v in cfg.items() if k not in drop + ("num_attention_heads", "num_hidden_layers")}
    rw.update(model_type=model_type, architectures=["RWForCausalLM"], n_head=cfg["num_attention_heads"],
              n_layer=cfg["num_hidden_layers"], **extra)
    json.dump(rw, open(os.path.join(dst, "config.json"), "w"))
    return dst


@pytest.mark.parametrize("model_type", ["RefinedWebModel", "RefinedWeb"])
def test_rw_config_keys_load_the_same_model(tmp_path, model_type):
    if model_type == "RefinedWebModel":  # falcon-7b's original config: parallel_attn spelled out
        kwargs = {**BASE, "multi_query": True, "parallel_attn": True}
        drop, extra = ("num_kv_heads",), {"parallel_attn": True}
    else:  # falcon-40b's: no new_decoder_architecture key, n_head_kv for the KV groups
        kwargs = {**BASE, "new_decoder_architecture": True, "num_attention_heads": 8, "num_kv_heads": 2}
        drop, extra = ("num_kv_heads", "new_decoder_architecture", "num_ln_in_parallel_attn"), {"n_head_kv": 2}
    path = save_hf(make_hf_model("FalconConfig", kwargs), str(tmp_path / "ckpt"))
    prompt = prompt_for(kwargs["vocab_size"])
    ref_tokens, ref_logits = hf_reference(path, prompt, NEW_TOKENS)
    rw_path = _as_rw(path, str(tmp_path / "rw"), model_type, drop, extra)
    assert_port_matches(rw_path, prompt, ref_tokens, ref_logits, "RWForCausalLM")
