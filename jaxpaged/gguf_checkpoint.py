"""A GGUF file as an HF checkpoint: its ``config.json``, its tensors under HF names, and the
side directory (config, generation config, tokenizer) the engine reads beside the weights.

Architectures: llama.cpp's ``llama`` (Llama 1/2, Mistral, SmolLM, TinyLlama ... all
``LlamaForCausalLM``) and ``qwen2``; anything else is refused by name. GGUF tensor names
(``token_embd``, ``blk.N.attn_q`` ...) map to HF names, so each family's HF weight table applies
unchanged. llama.cpp's converter permutes the rows of Llama's Q and K projections (its rotary
embedding pairs adjacent dimensions, HF's pairs the two halves of a head); ``unpermute_rows``
undoes that. Qwen2 files are written with HF's rotary layout and are not permuted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Iterator

import numpy as np

from jaxpaged.gguf_file import GGUFFile
from jaxpaged.gguf_tokenizer import TOKEN_TYPE_CONTROL, build_tokenizer, read_tokenizer_metadata
from jaxpaged.safetensors_file import CheckpointError

_LLAMA_NAMES: tuple[tuple[str, str], ...] = (
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.attn_(q|k|v)\.(weight|bias)", r"model.layers.\1.self_attn.\2_proj.\3"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.weight", r"model.layers.\1.mlp.\2_proj.weight"),
)
# Tokens llama.cpp treats as the end of a turn besides EOS (llama-vocab.cpp's EOG list), when the
# vocabulary has them as control tokens: they become generation_config's eos_token_id list.
EOG_TOKEN_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
                   "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>")


@dataclasses.dataclass(frozen=True)
class GGUFArchitecture:
    hf_architecture: str
    model_type: str
    permute_qk: bool  # llama.cpp permuted Q/K rows for its adjacent-pair rotary embedding
    names: tuple[tuple[str, str], ...] = _LLAMA_NAMES


GGUF_ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture("LlamaForCausalLM", "llama", permute_qk=True),
    "qwen2": GGUFArchitecture("Qwen2ForCausalLM", "qwen2", permute_qk=False),
}


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute``: per head, rows (2i, 2i+1) go back to (i, i + d/2)."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's ``permute`` (HF layout -> GGUF layout); what its converter writes."""
    rows = w.shape[0]
    return w.reshape(num_heads, 2, rows // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _architecture(gguf: GGUFFile) -> GGUFArchitecture:
    arch = gguf.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise CheckpointError(f"GGUF architecture {arch!r} (general.architecture) is not supported; supported: "
                              f"{', '.join(sorted(GGUF_ARCHITECTURES))}")
    return GGUF_ARCHITECTURES[arch]


def _one_value(value: Any, key: str) -> Any:
    if isinstance(value, list):  # a per-layer list; only uniform ones have an HF equivalent
        if len(set(value)) != 1:
            raise CheckpointError(f"GGUF metadata {key} varies per layer ({value[:4]}...), which is not supported")
        return value[0]
    return value


def hf_config_from_gguf(gguf: GGUFFile) -> dict[str, Any]:
    """The ``config.json`` an HF checkpoint of this file would have."""
    spec = _architecture(gguf)
    arch = gguf.architecture
    names = set(gguf.tensor_names)

    def key(name: str, default: Any = ...) -> Any:
        full = f"{arch}.{name}"
        value = gguf.require(full) if default is ... else gguf.get(full, default)
        return _one_value(value, full)

    if "token_embd.weight" not in names:
        raise CheckpointError(f"GGUF file {os.path.basename(gguf.path)!r} has no 'token_embd.weight' tensor")
    if "rope_freqs.weight" in names:
        raise CheckpointError("GGUF tensor 'rope_freqs.weight' (per-frequency rotary factors, Llama-3.1 style) "
                              "is not supported")
    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    rotary = key("rope.dimension_count", None)
    if rotary is not None and int(rotary) != head_dim:
        raise CheckpointError(f"GGUF {arch}.rope.dimension_count={rotary} differs from the head size {head_dim} "
                              "(partial rotary embedding), which is not supported for this architecture")
    cfg: dict[str, Any] = {
        "architectures": [spec.hf_architecture],
        "model_type": spec.model_type,
        "vocab_size": gguf.shape("token_embd.weight")[0],
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
    }
    scaling = key("rope.scaling.type", None) or ("linear" if key("rope.scale_linear", None) else None)
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear",
                               "factor": float(key("rope.scaling.factor", None) or key("rope.scale_linear"))}
    elif scaling == "yarn":
        cfg["rope_scaling"] = {"rope_type": "yarn", "factor": float(key("rope.scaling.factor")),
                               "original_max_position_embeddings": int(key("rope.scaling.original_context_length"))}
    elif scaling not in (None, "none"):
        raise CheckpointError(f"GGUF {arch}.rope.scaling.type={scaling!r} is not supported; supported: none, linear, yarn")
    if spec.model_type == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        value = gguf.get(f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            cfg[hf_key] = int(value)
    return cfg


def hf_tensors(gguf: GGUFFile, hf_config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every tensor, Q/K rows un-permuted where llama.cpp permuted
    them; a tensor with no HF name is yielded under its GGUF name (the loader refuses it)."""
    spec = _architecture(gguf)
    gguf.check_tensor_types()
    heads = {"q": hf_config["num_attention_heads"], "k": hf_config["num_key_value_heads"]}
    for name in gguf.tensor_names:
        hf_name = map_gguf_name(spec.names, name)
        array = gguf.tensor(name)
        if hf_name is not None and spec.permute_qk:
            m = re.fullmatch(r"model\.layers\.\d+\.self_attn\.(q|k)_proj\.(weight|bias)", hf_name)
            if m:
                array = unpermute_rows(array, heads[m.group(1)])
        yield (hf_name or name), array


def map_gguf_name(table: tuple[tuple[str, str], ...], name: str) -> str | None:
    for pattern, target in table:
        m = re.fullmatch(pattern, name)
        if m:
            return m.expand(target)
    return None


def generation_config_from_gguf(gguf: GGUFFile, meta: dict[str, Any]) -> dict[str, Any]:
    """BOS and every end-of-generation id (EOS, EOT, EOM and llama.cpp's EOG control tokens)."""
    tokens, types = meta.get("tokens") or [], meta.get("token_type") or []
    eos = [meta.get("eos_token_id"), gguf.get("tokenizer.ggml.eot_token_id"), gguf.get("tokenizer.ggml.eom_token_id")]
    eos += [i for i, (t, k) in enumerate(zip(tokens, types)) if k == TOKEN_TYPE_CONTROL and t in EOG_TOKEN_TEXTS]
    ids = list(dict.fromkeys(int(i) for i in eos if i is not None))
    out: dict[str, Any] = {}
    if meta.get("bos_token_id") is not None:
        out["bos_token_id"] = int(meta["bos_token_id"])
    if ids:
        out["eos_token_id"] = ids if len(ids) > 1 else ids[0]
    return out


def write_gguf_side_files(gguf_path: str, out_dir: str, gguf: GGUFFile | None = None) -> None:
    """Writes config.json, generation_config.json and the tokenizer files built from the metadata."""
    gguf = gguf or GGUFFile(gguf_path)
    config = hf_config_from_gguf(gguf)
    meta = read_tokenizer_metadata(gguf)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(generation_config_from_gguf(gguf, meta), f, indent=2)
    if meta.get("tokens"):
        build_tokenizer(meta, config["max_position_embeddings"]).save_pretrained(out_dir)


def _file_key(path: str) -> str:
    st = os.stat(path)
    return hashlib.sha256(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def ensure_side_dir(gguf_path: str, out_dir: str, build: Callable[[str], None] | None = None) -> str:
    """``out_dir`` holding the side files for ``gguf_path``, built atomically on first use."""
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        return out_dir
    parent = os.path.dirname(out_dir) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".building-")
    try:
        (build or (lambda d: write_gguf_side_files(gguf_path, d)))(tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process finished first; use its copy
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def gguf_side_dir(gguf_path: str, cache_root: str) -> str:
    """The cached side directory of a GGUF file (keyed by its path, size and mtime)."""
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    return ensure_side_dir(gguf_path, os.path.join(cache_root, "gguf", f"{stem}-{_file_key(gguf_path)}"))
