"""MPT port against HF transformers (float32, CPU) on tiny random configs.

HF's ``MptForCausalLM`` has no biases whatever ``no_bias`` says, while MosaicML's published code
adds them when ``no_bias`` is false; that variant is checked against the HF model with bias
parameters added to every linear and LayerNorm (the same forward as MosaicML's)."""

import json
import os

import pytest
import torch

from tests.helpers.parity_helpers import (NEW_TOKENS, assert_port_matches, hf_reference, make_hf_model, prompt_for,
                                  save_hf, state_dict_numpy, torch_reference, write_checkpoint)

BASE = dict(vocab_size=1000, d_model=64, n_heads=4, n_layers=2, max_seq_len=128, initializer_range=0.1)

CASES = {
    "mpt_4_heads": {},
    # 6 heads: MPT's odd/even slope interleave; clip_qkv small enough to clamp many activations.
    "mpt_6_heads_clip_qkv": dict(d_model=48, n_heads=6, attn_config={"clip_qkv": 0.5}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mpt_matches_hf(tmp_path, case):
    kwargs = {**BASE, **CASES[case]}
    path = save_hf(make_hf_model("MptConfig", kwargs), str(tmp_path / "ckpt"))
    prompt = prompt_for(kwargs["vocab_size"])
    ref_tokens, ref_logits = hf_reference(path, prompt, NEW_TOKENS)
    assert_port_matches(path, prompt, ref_tokens, ref_logits, "MptForCausalLM")


def test_mpt_with_biases_matches_biased_hf_forward(tmp_path):
    model = make_hf_model("MptConfig", {**BASE, "no_bias": False})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in model.transformer.blocks:
            for parent, name in ((block.attn, "Wqkv"), (block.attn, "out_proj"), (block.ffn, "up_proj"),
                                 (block.ffn, "down_proj")):
                old = getattr(parent, name)
                new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
                new.weight.copy_(old.weight)
                new.bias.copy_(torch.randn(old.out_features, generator=g) * 0.1)
                setattr(parent, name, new)
            for norm in (block.norm_1, block.norm_2):
                norm.bias = torch.nn.Parameter(torch.randn(norm.weight.shape, generator=g) * 0.1)
        model.transformer.norm_f.bias = torch.nn.Parameter(torch.randn(BASE["d_model"], generator=g) * 0.1)
    tensors = state_dict_numpy(model)
    assert "transformer.blocks.0.attn.Wqkv.bias" in tensors and "transformer.norm_f.bias" in tensors
    config = {**model.config.to_dict(), "no_bias": False, "architectures": ["MptForCausalLM"]}
    path = write_checkpoint(str(tmp_path / "ckpt"), tensors, config)
    prompt = prompt_for(BASE["vocab_size"])
    ref_tokens, ref_logits = torch_reference(model, prompt, NEW_TOKENS)
    assert_port_matches(path, prompt, ref_tokens, ref_logits, "MptForCausalLM")


def test_mpt_rejects_unsupported_attention(tmp_path):
    from jaxpaged.model_loader import load_model

    path = save_hf(make_hf_model("MptConfig", BASE), str(tmp_path / "ckpt"))
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["attn_config"]["qk_ln"] = True
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ValueError, match="qk_ln"):
        load_model(path, dtype="float32")
