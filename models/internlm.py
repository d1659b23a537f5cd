"""InternLM (v1) port: ``InternLMForCausalLM`` (internlm/internlm-7b, internlm-chat-7b,
internlm-20b; remote code).

The Llama architecture with biases on q/k/v/o when the config's ``bias`` key is true, and RoPE
settings in a ``rotary`` object: ``{"base": …, "type": "origin" | "dynamic", "scaling_factor": …}``
("dynamic" is HF's dynamic NTK scaling, which only acts past ``max_position_embeddings``).
Tensor names are Llama's, so the Llama weight table applies unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from models.llama import LLAMA_WEIGHT_TABLE, LlamaConfig, LlamaForCausalLM, llama_config_from_hf

_ROTARY_TYPES = {"origin": "default", "dynamic": "dynamic"}


class InternLMConfig(LlamaConfig):
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "InternLMConfig":
        hf = dict(hf)
        rotary = hf.pop("rotary", None) or {}
        rtype = rotary.get("type", "origin")
        if rtype not in _ROTARY_TYPES:
            raise ValueError(f"rotary.type={rtype!r} is not supported; allowed: {', '.join(_ROTARY_TYPES)}")
        hf["rope_theta"] = float(rotary.get("base", hf.get("rope_theta", 10000.0)))
        if _ROTARY_TYPES[rtype] == "dynamic":
            hf["rope_scaling"] = {"rope_type": "dynamic", "factor": float(rotary.get("scaling_factor", 1.0))}
        bias = bool(hf.get("bias", True))  # InternLMConfig's default is bias=True
        return llama_config_from_hf(cls, hf, qkv_bias=bias, o_bias=bias)


class InternLMForCausalLM(LlamaForCausalLM):
    config_class: ClassVar[type] = InternLMConfig
    hf_weight_table = LLAMA_WEIGHT_TABLE
