"""Tiny HF checkpoints (with a real tokenizer) for engine and server tests."""

from __future__ import annotations

import os

import torch

from jaxpaged.default_model import _build_tokenizer


def tiny_llama_checkpoint(path: str, seed: int = 0, **overrides) -> str:
    """A 2-layer GQA Llama saved with save_pretrained, plus the default model's BPE tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(path, exist_ok=True)
    vocab = _build_tokenizer(path)
    cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, bos_token_id=1,
               eos_token_id=2, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**cfg)).eval().save_pretrained(path)
    return path
