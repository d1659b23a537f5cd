"""Flax ports of HF decoder-only architectures and the explicit registry that maps an HF
``architectures`` name to its port (module path, class name). Imported lazily on lookup."""

from __future__ import annotations

import importlib

MODEL_REGISTRY: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("models.llama", "LlamaForCausalLM"),
    "AquilaForCausalLM": ("models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("models.mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("models.qwen2", "Qwen2ForCausalLM"),
    "BloomForCausalLM": ("models.bloom", "BloomForCausalLM"),
    "MptForCausalLM": ("models.mpt", "MptForCausalLM"),
    "FalconForCausalLM": ("models.falcon", "FalconForCausalLM"),
    "RWForCausalLM": ("models.falcon", "FalconForCausalLM"),
    "BaichuanForCausalLM": ("models.baichuan", "BaichuanForCausalLM"),
    "BaiChuanForCausalLM": ("models.baichuan", "BaichuanForCausalLM"),
    "InternLMForCausalLM": ("models.internlm", "InternLMForCausalLM"),
    "QWenLMHeadModel": ("models.qwen", "QWenLMHeadModel"),
    "YiForCausalLM": ("models.yi", "YiForCausalLM"),
    "ChatGLMModel": ("models.chatglm", "ChatGLMForConditionalGeneration"),
    "ChatGLMForConditionalGeneration": ("models.chatglm", "ChatGLMForConditionalGeneration"),
    "GPT2LMHeadModel": ("models.gpt2", "GPT2LMHeadModel"),
    "GPTBigCodeForCausalLM": ("models.gpt_bigcode", "GPTBigCodeForCausalLM"),
    "GPTJForCausalLM": ("models.gptj", "GPTJForCausalLM"),
    "GPTNeoXForCausalLM": ("models.gpt_neox", "GPTNeoXForCausalLM"),
    "OPTForCausalLM": ("models.opt", "OPTForCausalLM"),
    "PhiForCausalLM": ("models.phi", "PhiForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def get_model_class(architecture: str) -> type:
    """Returns the port for an HF architecture name; unknown names raise with the supported list."""
    if architecture not in MODEL_REGISTRY:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported architectures: "
            f"{', '.join(supported_architectures())}"
        )
    module, name = MODEL_REGISTRY[architecture]
    return getattr(importlib.import_module(module), name)
