"""GPT-2 / GPT BigCode / GPT-J / GPT-NeoX / OPT / Phi ports against HF transformers (float32, CPU) on
tiny random configs: prompt logits and a greedy continuation through the paged cache."""

import numpy as np
import pytest
import torch

from jaxpaged.model_loader import load_model
from tests.helpers.paged_driver import hf_reference, max_rel_err, paged_greedy

VOCAB = 1000
PROMPT_LEN = 20
NEW_TOKENS = 32

# HF's default init (std 0.02) gives near-uniform logits on models this small; a wider init keeps
# greedy argmaxes well separated so token identity tests the port, not float rounding.
GPT2_BASE = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.1)
BIGCODE_BASE = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.1)
GPTJ_BASE = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, rotary_dim=16,
                 initializer_range=0.1)
NEOX_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=128, initializer_range=0.1)
OPT_BASE = dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, init_std=0.1, pad_token_id=1)
PHI_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128, initializer_range=0.1)

CASES = {
    "gpt2": ("GPT2Config", GPT2_BASE, {}),
    "gpt2_untied_scale_by_layer_upcast": ("GPT2Config", GPT2_BASE, dict(
        tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True)),
    "gpt2_relu_no_scale": ("GPT2Config", GPT2_BASE, dict(activation_function="relu", scale_attn_weights=False)),
    "bigcode_multi_query": ("GPTBigCodeConfig", BIGCODE_BASE, dict(multi_query=True)),
    "bigcode_multi_head": ("GPTBigCodeConfig", BIGCODE_BASE, dict(multi_query=False)),
    "gptj_full_rotary": ("GPTJConfig", GPTJ_BASE, dict(rotary_dim=16)),
    "gptj_partial_rotary": ("GPTJConfig", GPTJ_BASE, dict(rotary_dim=6)),
    "gptj_tied_head_bias": ("GPTJConfig", GPTJ_BASE, dict(rotary_dim=8, tie_word_embeddings=True)),
    "neox_parallel_residual": ("GPTNeoXConfig", NEOX_BASE, dict(use_parallel_residual=True)),
    "neox_sequential_no_bias": ("GPTNeoXConfig", NEOX_BASE, dict(use_parallel_residual=False, attention_bias=False)),
    "neox_rotary_pct_half_theta": ("GPTNeoXConfig", NEOX_BASE, dict(rotary_pct=0.5, rotary_emb_base=500.0)),
    "opt_pre_ln": ("OPTConfig", OPT_BASE, {}),
    "opt_post_ln_word_embed_proj": ("OPTConfig", OPT_BASE, dict(do_layer_norm_before=False, word_embed_proj_dim=32)),
    "opt_pre_ln_word_embed_proj": ("OPTConfig", OPT_BASE, dict(word_embed_proj_dim=32)),
    "opt_no_bias_no_affine_untied": ("OPTConfig", OPT_BASE, dict(
        enable_bias=False, layer_norm_elementwise_affine=False, tie_word_embeddings=False)),
    "phi_partial_rotary_half": ("PhiConfig", PHI_BASE, dict(partial_rotary_factor=0.5)),
    "phi_qk_layernorm_gqa": ("PhiConfig", PHI_BASE, dict(qk_layernorm=True, num_key_value_heads=2,
                                                         partial_rotary_factor=0.25)),
    "phi_full_rotary_tied_head_bias": ("PhiConfig", PHI_BASE, dict(partial_rotary_factor=1.0, tie_word_embeddings=True)),
}


def make_checkpoint(tmp_path, config_cls: str, base: dict, overrides: dict, seed: int = 0) -> str:
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**{**base, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    # HF initialises biases to 0 and norm weights to 1; perturb every vector so a bias or norm
    # parameter loaded into the wrong place (or not at all) changes the logits.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    path = str(tmp_path / "ckpt")
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_logits_and_greedy_match_hf(tmp_path, case):
    config_cls, base, overrides = CASES[case]
    path = make_checkpoint(tmp_path, config_cls, base, overrides)
    prompt = np.random.default_rng(1).integers(3, VOCAB - 10, PROMPT_LEN).tolist()
    ref_tokens, ref_logits = hf_reference(path, prompt, NEW_TOKENS)

    lm = load_model(path, dtype="float32")
    tokens, logits = paged_greedy(lm, prompt, NEW_TOKENS, block_size=4)
    assert max_rel_err(logits, ref_logits) <= 1e-4
    assert tokens == ref_tokens


def _rewrite_checkpoint(src: str, dst, rename, edit_config, extra: dict | None = None) -> str:
    """Copies a checkpoint under hub-era tensor names / config spellings."""
    import json
    import os

    from jaxpaged.safetensors_file import SafetensorsFile, save_safetensors

    os.makedirs(dst)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    edit_config(cfg)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    f = SafetensorsFile(os.path.join(src, "model.safetensors"))
    tensors = {rename(name): np.array(f.get(name)) for name in f.keys()}
    f.close()
    tensors.update(extra or {})
    save_safetensors(tensors, os.path.join(dst, "model.safetensors"))
    return str(dst)


def _legacy_neox_config(cfg: dict) -> None:
    rope = cfg.pop("rope_parameters")
    cfg["rotary_pct"] = rope["partial_rotary_factor"]
    cfg["rotary_emb_base"] = rope["rope_theta"]


def _legacy_phi_config(cfg: dict) -> None:
    rope = cfg.pop("rope_parameters")
    cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
    cfg["rope_theta"] = rope["rope_theta"]


HUB_FORMATS = {
    # openai-community/gpt2 was saved from GPT2Model: no "transformer." prefix, plus mask buffers.
    "gpt2": ("gpt2", lambda n: n.removeprefix("transformer."), lambda c: None,
             {"h.0.attn.bias": np.ones((1, 1, 8, 8), np.float32)}),
    # facebook/opt-* were saved from OPTModel: names start at "decoder.".
    "opt": ("opt_post_ln_word_embed_proj", lambda n: n.removeprefix("model."), lambda c: None, None),
    # Pythia: head named embed_out, rotary_pct / rotary_emb_base, inv_freq buffers.
    "neox": ("neox_rotary_pct_half_theta", lambda n: n.replace("lm_head.", "embed_out."), _legacy_neox_config,
             {"gpt_neox.layers.0.attention.rotary_emb.inv_freq": np.ones((4,), np.float32)}),
    # microsoft/phi-1_5 (transformers 4.x): top-level partial_rotary_factor and rope_theta.
    "phi": ("phi_qk_layernorm_gqa", lambda n: n, _legacy_phi_config, None),
}


@pytest.mark.parametrize("family", sorted(HUB_FORMATS))
def test_hub_tensor_names_and_legacy_config_keys_load_the_same_model(tmp_path, family):
    case, rename, edit_config, extra = HUB_FORMATS[family]
    config_cls, base, overrides = CASES[case]
    path = make_checkpoint(tmp_path, config_cls, base, overrides)
    hub_path = _rewrite_checkpoint(path, tmp_path / "hub", rename, edit_config, extra)
    prompt = list(range(5, 17))
    want_tokens, want_logits = paged_greedy(load_model(path, dtype="float32"), prompt, 4)
    lm = load_model(hub_path, dtype="float32")
    tokens, logits = paged_greedy(lm, prompt, 4)
    assert lm.config == load_model(path, dtype="float32").config
    np.testing.assert_array_equal(logits, want_logits)
    assert tokens == want_tokens


MODELS_A_ARCHITECTURES = ("GPT2LMHeadModel", "GPTBigCodeForCausalLM", "GPTJForCausalLM", "GPTNeoXForCausalLM",
                          "OPTForCausalLM", "PhiForCausalLM")


def test_unknown_architecture_error_lists_supported_ones(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPTNeoForCausalLM"], "vocab_size": 10}))
    with pytest.raises(ValueError) as err:
        load_model(str(tmp_path), load_format="dummy")
    msg = str(err.value)
    assert "GPTNeoForCausalLM" in msg
    for arch in MODELS_A_ARCHITECTURES + ("LlamaForCausalLM",):
        assert arch in msg


@pytest.mark.parametrize("arch", MODELS_A_ARCHITECTURES)
def test_registry_resolves_each_port_with_its_hf_class_name(arch):
    from models import MODEL_REGISTRY, get_model_class

    cls = get_model_class(arch)
    assert MODEL_REGISTRY[arch][1] == arch == cls.__name__
    assert cls.hf_weight_table and hasattr(cls.config_class, "from_hf_config")


@pytest.mark.parametrize("case", ["gpt2", "bigcode_multi_query", "gptj_tied_head_bias", "neox_parallel_residual",
                                  "opt_post_ln_word_embed_proj", "phi_qk_layernorm_gqa"])
def test_dummy_weights_need_only_config_json(tmp_path, case):
    import json

    import transformers

    config_cls, base, overrides = CASES[case]
    cfg = getattr(transformers, config_cls)(**{**base, **overrides})
    hf = cfg.to_dict()
    hf["architectures"] = [transformers.AutoModelForCausalLM._model_mapping[type(cfg)].__name__]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    lm = load_model(str(tmp_path), dtype="float32", load_format="dummy")
    tokens, logits = paged_greedy(lm, [5, 6, 7], 3)
    assert logits.shape == (3, VOCAB) and np.isfinite(logits).all()
    assert len(tokens) == 3 and all(0 <= t < VOCAB for t in tokens)
