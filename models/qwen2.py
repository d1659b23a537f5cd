"""``Qwen2ForCausalLM``: Llama with biases on q/k/v (not o), usually tied embeddings, and an
optional sliding window on layers at or above ``max_window_layers``."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from models.llama import LLAMA_WEIGHT_TABLE, LlamaConfig, LlamaForCausalLM, llama_config_from_hf


class Qwen2Config(LlamaConfig):
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "Qwen2Config":
        # Qwen2 only windows attention when use_sliding_window is set (HF default: False).
        hf = dict(hf)
        hf.setdefault("use_sliding_window", False)
        return llama_config_from_hf(cls, hf, qkv_bias=True, o_bias=False)


class Qwen2ForCausalLM(LlamaForCausalLM):
    config_class: ClassVar[type] = Qwen2Config
    hf_weight_table = LLAMA_WEIGHT_TABLE
