"""The random tiny model: a small Llama-architecture checkpoint in HF format, created
deterministically on first use with no download.

Its tokenizer is a byte-level BPE trained on the text below; its weights are RANDOM (seeded), so it
produces fluent-looking gibberish. It serves fast tests and notebooks that count rather than read
text, and is the fallback default when the trained default (``default_gguf``) cannot be fetched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from jaxpaged.cache_dir import cache_root
from jaxpaged.safetensors_file import save_safetensors

DEFAULT_MODEL_VERSION = "1"
TINY_MODEL_NOTE = (
    "the tiny model has RANDOM weights, so its text is gibberish; pass --model (an HF checkpoint "
    "directory, a .gguf file or a Hub name) for a real model"
)

# Vicuna v1.1-style template, the format the seed tutorial's prompts use.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
    "{% set loop_messages = messages[1:] %}{% else %}"
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.\n\n"
    "{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_CORPUS = """\
The key-value cache of a language model grows with every generated token. PagedAttention stores it
in fixed-size blocks, the way an operating system stores a process's memory in pages: a block table
maps each sequence's logical blocks to physical blocks, which are allocated only when needed,
shared between sequences with reference counts, and copied on write. Continuous batching lets new
requests join the running batch at every iteration instead of waiting for the slowest request.
Hello, how are you? I am fine, thank you. What are the differences between alpacas, vicunas and
llamas? Alpacas are bred for their fiber, llamas are larger pack animals, and vicunas are wild.
Convert the following to JSON: Name, About, address, street, city, state, zip.
{"name": "E2E Networks", "city": "New Delhi", "zip": "110044"} [1, 2, 3] (a, b) 0123456789
A conversation between an inquisitive user and an AI assistant. USER: ASSISTANT:
The quick brown fox jumps over the lazy dog. Once upon a time, in a land far away, there lived a
curious engineer who wanted to serve large language models quickly and cheaply.
Caf\u00e9, na\u00efve, \u00fcber, se\u00f1or, \u65e5\u672c\u8a9e, \u4e2d\u6587, emoji \U0001F642 \u2764.
"""

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "dtype": "float32",
}


def tiny_model_dir() -> str:
    """Where the tiny model lives (under ``cache_root()``)."""
    return os.path.join(cache_root(), f"default-model-v{DEFAULT_MODEL_VERSION}")


def _build_tokenizer(out_dir: str) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=CONFIG["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return len(fast)


def _build_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd, nh, nkv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    t = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": np.ones(h, np.float32), "lm_head.weight": w(v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        t[p + "self_attn.q_proj.weight"] = w(nh * hd, h)
        t[p + "self_attn.k_proj.weight"] = w(nkv * hd, h)
        t[p + "self_attn.v_proj.weight"] = w(nkv * hd, h)
        t[p + "self_attn.o_proj.weight"] = w(h, nh * hd)
        t[p + "mlp.gate_proj.weight"] = w(i, h)
        t[p + "mlp.up_proj.weight"] = w(i, h)
        t[p + "mlp.down_proj.weight"] = w(h, i)
        t[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
    return t


def build_default_model(out_dir: str) -> None:
    """Writes config.json, model.safetensors and tokenizer files into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    vocab = _build_tokenizer(out_dir)
    config = dict(CONFIG, vocab_size=vocab)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f, indent=2)
    save_safetensors(_build_weights(config), os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(f"# jaxpaged random tiny model (v{DEFAULT_MODEL_VERSION})\n\nNote: {TINY_MODEL_NOTE}.\n")


def ensure_tiny_model() -> str:
    """Returns the tiny model's directory, creating it (atomically) on first use."""
    path = tiny_model_dir()
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".building-")
    try:
        build_default_model(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race; use its copy
            pass
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path
