"""``MistralForCausalLM``: the Llama architecture with a sliding attention window on every layer."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from models.llama import LLAMA_WEIGHT_TABLE, LlamaConfig, LlamaForCausalLM, llama_config_from_hf


class MistralConfig(LlamaConfig):
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "MistralConfig":
        return llama_config_from_hf(cls, hf, qkv_bias=False, o_bias=False)


class MistralForCausalLM(LlamaForCausalLM):
    config_class: ClassVar[type] = MistralConfig
    hf_weight_table = LLAMA_WEIGHT_TABLE
