"""Test-only helpers shared by the per-family parity tests: build a tiny random HF checkpoint, run
the greedy reference from an in-memory torch model, and write a checkpoint under another family's
published names (for ports of remote-code families)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from jaxpaged.model_loader import load_model
from jaxpaged.safetensors_file import save_safetensors
from tests.helpers.paged_driver import hf_reference, max_rel_err, paged_greedy

PROMPT_LEN = 20
NEW_TOKENS = 32


def prompt_for(vocab_size: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab_size - 10, PROMPT_LEN).tolist()


def make_hf_model(config_cls: str, kwargs: dict, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**kwargs)
    return transformers.AutoModelForCausalLM.from_config(cfg).float().eval()


def save_hf(model, path: str) -> str:
    model.save_pretrained(path, safe_serialization=True)
    return path


def torch_reference(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy ``generate`` (EOS off) and prompt logits from an already-built torch model."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = torch.tensor([prompt])
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False)
        logits = model(ids).logits[0].float().numpy()
    return gen[0, len(prompt):].tolist(), logits


def write_checkpoint(path: str, tensors: dict[str, np.ndarray], config: dict) -> str:
    """Writes ``config.json`` and ``model.safetensors`` (float32) the way a published repo holds them."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    save_safetensors({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
                     os.path.join(path, "model.safetensors"))
    return path


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def assert_port_matches(path: str, prompt: list[int], ref_tokens: list[int], ref_logits: np.ndarray,
                        architecture: str | None = None):
    lm = load_model(path, dtype="float32")
    if architecture is not None:
        assert lm.architecture == architecture
    tokens, logits = paged_greedy(lm, prompt, len(ref_tokens), block_size=4)
    err = max_rel_err(logits, ref_logits)
    assert err <= 1e-4, f"prefill logits max rel err {err:.3g}"
    assert tokens == ref_tokens
    return lm


__all__ = ["PROMPT_LEN", "NEW_TOKENS", "prompt_for", "make_hf_model", "save_hf", "torch_reference",
           "write_checkpoint", "state_dict_numpy", "assert_port_matches", "hf_reference"]
