"""Test-only: write an HF Llama/Qwen2 checkpoint as a GGUF file the way llama.cpp's
``convert_hf_to_gguf.py`` does (its tensor names, its Q/K row permutation for ``llama``, its
tokenizer metadata), with ``gguf``'s own writer and quantisers. The permutation is written out
here from llama.cpp's source, independently of ``jaxpaged.gguf_checkpoint``."""

from __future__ import annotations

import json
import os

import numpy as np

from jaxpaged.safetensors_file import SafetensorsFile

_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """``LlamaModel.permute`` from llama.cpp's convert_hf_to_gguf.py."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def gguf_name(hf_name: str) -> str:
    if hf_name in _NAMES:
        return _NAMES[hf_name]
    parts = hf_name.split(".")  # model.layers.N.<rest>
    return f"blk.{parts[2]}.{_NAMES['.'.join(parts[3:])]}"


def _tokenizer_metadata(writer, model_dir: str, pre: str = "default") -> None:
    import gguf

    with open(os.path.join(model_dir, "tokenizer.json")) as f:
        tj = json.load(f)
    with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
        tc = json.load(f)
    vocab = dict(tj["model"]["vocab"])
    for added in tj["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == max(vocab.values()) + 1
    specials = {a["content"] for a in tj["added_tokens"] if a["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    merges = tj["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for key, adder in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                       ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        if tc.get(key):
            adder(vocab[tc[key]])
    writer.add_add_bos_token(tj.get("post_processor") is not None)
    template = tc.get("chat_template")
    if template is None and os.path.isfile(os.path.join(model_dir, "chat_template.jinja")):
        template = open(os.path.join(model_dir, "chat_template.jinja")).read()
    if template:
        writer.add_chat_template(template)


# K-quant -> (offset of d, offset of dmin or None, mean of the unsigned quant values)
_K_FIELDS = {"Q2_K": (80, 82, 1.5), "Q3_K": (108, None, 0.0), "Q4_K": (0, 2, 7.5), "Q5_K": (0, 2, 15.5),
             "Q6_K": (208, None, 0.0)}


def random_k_blocks(data: np.ndarray, qtype) -> np.ndarray:
    """Random K-quant blocks for a tensor of ``data``'s shape (gguf has no K-quant quantiser).

    The quant bits are random; the scales are set so the weights are about zero-mean (a random
    model with all-positive weights collapses to one token): where a block has mins, each
    sub-block's min equals its scale and dmin = d * mean(q)."""
    import gguf

    name = qtype.name
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = data.shape
    rng = np.random.default_rng(rows * 7919 + cols)
    raw = rng.integers(0, 256, size=(rows * cols // block_values, block_bytes), dtype=np.uint8)
    d_at, dmin_at, mean_q = _K_FIELDS[name]
    d = (np.abs(rng.standard_normal(len(raw))) * 0.002 + 0.0005).astype(np.float16)
    if name == "Q2_K":  # 16 bytes: low nibble scale, high nibble min
        raw[:, :16] = (raw[:, :16] & 0x0F) * 0x11
        d = (d * 8).astype(np.float16)
    elif name in ("Q4_K", "Q5_K"):  # 12 bytes of 6-bit scales and mins (get_scale_min_k4's packing)
        raw[:, 8:12] = raw[:, 4:8]
        raw[:, 12:16] = (raw[:, 12:16] & 0x0F) * 0x11
    elif name in ("Q3_K", "Q6_K"):  # signed quant values and scales: zero-mean already
        d = (d * (0.2 if name == "Q6_K" else 1.0)).astype(np.float16)
    raw[:, d_at:d_at + 2] = d.reshape(-1, 1).view(np.uint8)
    if dmin_at is not None:
        raw[:, dmin_at:dmin_at + 2] = (d.astype(np.float32) * mean_q).astype(np.float16).reshape(-1, 1).view(np.uint8)
    return raw.reshape(rows, -1)


def write_gguf(model_dir: str, path: str, qtype: str = "F32", arch: str = "llama",
               with_tokenizer: bool = True, keep_f32: tuple[str, ...] = ("norm",), quantize=None) -> str:
    """Writes ``model_dir`` (config.json + model.safetensors) as ``path``. Matrices are stored as
    ``qtype`` (1-D tensors and names containing ``keep_f32`` stay F32, as llama.cpp keeps norms),
    quantised by ``quantize(data, qtype)`` (default: gguf's own quantiser)."""
    import gguf

    quantize = quantize or gguf.quants.quantize

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(path, arch)
    w.add_name(os.path.basename(model_dir))
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if with_tokenizer:
        _tokenizer_metadata(w, model_dir)
    st = SafetensorsFile(os.path.join(model_dir, "model.safetensors"))
    for name in st.keys():
        if cfg.get("tie_word_embeddings") and name == "lm_head.weight":
            continue  # llama.cpp writes no output tensor for a tied head
        data = np.asarray(st.get(name), dtype=np.float32)
        if arch == "llama" and "q_proj" in name:
            data = llama_cpp_permute(data, heads, heads)
        elif arch == "llama" and "k_proj" in name:
            data = llama_cpp_permute(data, heads, kv_heads)
        kind = "F32" if data.ndim == 1 or any(k in name for k in keep_f32) else qtype
        if kind == "F32":
            w.add_tensor(gguf_name(name), data)
        elif kind == "F16":
            w.add_tensor(gguf_name(name), data.astype(np.float16))
        else:
            qt = gguf.GGMLQuantizationType[kind]
            w.add_tensor(gguf_name(name), quantize(data, qt), raw_dtype=qt)
    st.close()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
