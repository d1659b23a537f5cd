"""Test-only helpers: drive a loaded port through the paged KV cache for one sequence, and compare
with HF transformers (PyTorch, float32, CPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.model_loader import LoadedModel, dummy_kv_caches
from models.attention_metadata import pack_attention_metadata


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(4,))
def _step(model, params, ids, positions, caches, md):
    hidden, caches = model.apply({"params": params}, ids, positions, caches, md)
    return hidden, caches


@functools.partial(jax.jit, static_argnums=(0,))
def _logits(model, params, hidden):
    return model.apply({"params": params}, hidden, method=model.compute_logits)


class PagedSequence:
    """One sequence's block table over a deliberately shuffled block pool."""

    def __init__(self, lm: LoadedModel, block_size: int = 4, num_blocks: int = 64, seed: int = 0):
        self.lm = lm
        self.block_size = block_size
        self.caches = dummy_kv_caches(lm.config, lm.dtype, num_blocks, block_size)
        # Poison the pool so any read of a slot this sequence never wrote shows up as NaN.
        self.caches = [(jnp.full_like(k, jnp.nan), jnp.full_like(v, jnp.nan)) for k, v in self.caches]
        self.free = list(np.random.default_rng(seed).permutation(num_blocks))
        self.table: list[int] = []
        self.num_cached = 0

    def forward(self, token_ids: list[int], all_logits: bool = False) -> np.ndarray:
        """Runs the next chunk of tokens; returns logits [chunk, V] or of the last token [V]."""
        q = len(token_ids)
        need = -(-(self.num_cached + q) // self.block_size)
        while len(self.table) < need:
            self.table.append(int(self.free.pop()))
        md, pos = pack_attention_metadata([q], [self.num_cached], [self.table], block_size=self.block_size)
        md = jax.tree.map(jnp.asarray, md)
        hidden, self.caches = _step(
            self.lm.model, self.lm.params, jnp.asarray(token_ids, jnp.int32), jnp.asarray(pos), self.caches, md
        )
        self.num_cached += q
        if all_logits:
            return np.asarray(_logits(self.lm.model, self.lm.params, hidden))
        return np.asarray(_logits(self.lm.model, self.lm.params, hidden[-1:]))[0]


def paged_greedy(lm: LoadedModel, prompt: list[int], max_new_tokens: int, block_size: int = 4,
                 prefill_chunk: int | None = None) -> tuple[list[int], np.ndarray]:
    """Greedy continuation through the paged cache. Returns (new tokens, prompt logits [P, V])."""
    seq = PagedSequence(lm, block_size=block_size, num_blocks=4 + (len(prompt) + max_new_tokens) // block_size * 2)
    chunk = prefill_chunk or len(prompt)
    prompt_logits = []
    for i in range(0, len(prompt), chunk):
        prompt_logits.append(seq.forward(prompt[i : i + chunk], all_logits=True))
    logits = np.concatenate(prompt_logits)
    out = [int(np.argmax(logits[-1]))]
    while len(out) < max_new_tokens:
        out.append(int(np.argmax(seq.forward([out[-1]]))))
    return out, logits


def hf_reference(model_dir: str, prompt: list[int], max_new_tokens: int) -> tuple[list[int], np.ndarray]:
    """HF generate (greedy, EOS disabled) and the prompt's logits, each from a fresh model instance
    (dynamic-rope modules keep state between calls)."""
    import torch
    from transformers import AutoModelForCausalLM

    def fresh():
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
        m.eval()
        m.generation_config.eos_token_id = None
        m.generation_config.pad_token_id = 0
        return m

    ids = torch.tensor([prompt])
    with torch.no_grad():
        gen = fresh().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               min_new_tokens=max_new_tokens, do_sample=False)
        logits = fresh()(ids).logits[0].float().numpy()
    return gen[0, len(prompt):].tolist(), logits


def max_rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
