"""Baichuan / Baichuan2 port: ``BaichuanForCausalLM`` and ``BaiChuanForCausalLM`` (remote code).

Covers baichuan-inc/Baichuan-7B, Baichuan-13B-Base/Chat, Baichuan2-7B/13B-Base/Chat. The published
modeling code is Llama's layout with q, k, v packed in one ``W_pack`` ([q | k | v] rows) and:

* 7B models rotate q/k with RoPE; 13B models use ALiBi (BLOOM's slopes, added after the
  1/sqrt(head_dim) scaling) and no RoPE. The configs tell them apart by their length key: the
  RoPE models' configs carry ``max_position_embeddings``, the ALiBi ones only ``model_max_length``.
  (vLLM keys on ``hidden_size == 4096`` instead; the key test also holds for small test configs.)
* Baichuan2 normalises each ``lm_head`` row to unit L2 norm before use (``NormHead``). Baichuan2 is
  recognised by its ``z_loss_weight`` config key (absent from Baichuan 1 configs) or by its
  125696-token vocabulary (vLLM's rule); the rows are normalised once, when the weights load.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from models.attention_metadata import AttentionMetadata
from models.layers import KVCache, RMSNorm, alibi_slopes, dense, lm_logits, paged_attention, run_layers
from models.llama import LlamaConfig, LlamaMLP, llama_config_from_hf
from models.rotary import apply_rotary, rope_cos_sin
from models.sharding import Packed, ShardRule, megatron_table, tensor_parallel_size
from models.weight_table import WeightRule, rule, transpose

BAICHUAN2_VOCAB_SIZE = 125696


@dataclasses.dataclass(frozen=True)
class BaichuanConfig(LlamaConfig):
    use_alibi: bool = False
    norm_head: bool = False

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "BaichuanConfig":
        use_alibi = "max_position_embeddings" not in hf
        norm_head = "z_loss_weight" in hf or hf.get("vocab_size") == BAICHUAN2_VOCAB_SIZE
        hf = dict(hf)
        hf["max_position_embeddings"] = hf.get("max_position_embeddings") or hf.get("model_max_length", 4096)
        for key in ("num_key_value_heads", "head_dim", "sliding_window", "rope_scaling", "rope_parameters"):
            hf.pop(key, None)  # not part of Baichuan's architecture; never let a stray key change it
        base = llama_config_from_hf(cls, hf, qkv_bias=False, o_bias=False)
        return dataclasses.replace(base, use_alibi=use_alibi, norm_head=norm_head)


def baichuan_qkv(config: BaichuanConfig) -> Packed:
    """``W_pack``'s ``[q | k | v]`` layout."""
    return Packed.qkv(config.num_attention_heads, config.num_attention_heads, config.head_dim)


class BaichuanAttention(nn.Module):
    config: BaichuanConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache: KVCache, metadata: AttentionMetadata, cos, sin):
        c = self.config
        T, H, D, tp = x.shape[0], c.num_attention_heads, c.head_dim, tensor_parallel_size(c)
        packed = baichuan_qkv(c)
        q, k, v = packed.split(dense(packed.width(tp), False, self.dtype, "W_pack")(x), tp)
        slopes = None
        if c.use_alibi:
            slopes = alibi_slopes(H)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out, kv_cache = paged_attention(q, k, v, kv_cache, positions, metadata, scale=D**-0.5, alibi_slopes=slopes)
        return dense(c.hidden_size, False, self.dtype, "o_proj")(out.reshape(T, -1)), kv_cache


class BaichuanLayer(nn.Module):
    config: BaichuanConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache, metadata, cos, sin):
        c = self.config
        h = RMSNorm(c.hidden_size, c.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        h, kv_cache = BaichuanAttention(c, self.dtype, name="self_attn")(h, positions, kv_cache, metadata, cos, sin)
        x = x + h
        h = RMSNorm(c.hidden_size, c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        return x + LlamaMLP(c, self.dtype, name="mlp")(h), kv_cache


class BaichuanModel(nn.Module):
    config: BaichuanConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        self.layers = [BaichuanLayer(c, self.dtype, name=f"layers_{i}")
                       for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, self.dtype)

    def __call__(self, input_ids, positions, kv_caches: Sequence[KVCache], metadata: AttentionMetadata):
        c = self.config
        x = self.embed_tokens(input_ids)
        cos = sin = None
        if not c.use_alibi:
            cos, sin = rope_cos_sin(c.rope, positions, metadata.seq_lens[metadata.token_seq_ids()])
        x, new_caches = run_layers(self.layers, x, positions, kv_caches, metadata, cos, sin)
        return self.norm(x), new_caches


class BaichuanForCausalLM(nn.Module):
    """Baichuan's remote-code ``BaichuanForCausalLM`` (and Baichuan-7B's ``BaiChuanForCausalLM``)."""

    config: BaichuanConfig
    dtype: Any = jnp.float32

    config_class: ClassVar[type] = BaichuanConfig
    hf_weight_table: ClassVar[Sequence[WeightRule]] = ()  # set below
    hf_sharding_table: ClassVar[Sequence[ShardRule]] = ()  # set below

    def setup(self):
        self.model = BaichuanModel(self.config, self.dtype)
        self.lm_head = dense(self.config.vocab_size, False, self.dtype, "lm_head")

    def __call__(self, input_ids, positions, kv_caches, metadata):
        return self.model(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
        return lm_logits(hidden, None, self.lm_head, tied=False)


def lm_head_kernel(w: np.ndarray, config: BaichuanConfig) -> np.ndarray:
    """[vocab, hidden] → Dense kernel; Baichuan2's NormHead rows are L2-normalised first
    (``F.normalize``: w / max(||w||, 1e-12))."""
    if config.norm_head:
        w32 = w.astype(np.float32)
        w = (w32 / np.maximum(np.linalg.norm(w32, axis=1, keepdims=True), 1e-12)).astype(w.dtype)
    return transpose(w)


_L = r"model\.layers\.(\d+)\."
BAICHUAN_WEIGHT_TABLE: tuple[WeightRule, ...] = (
    rule(r"model\.embed_tokens\.weight", "model/embed_tokens/embedding"),
    rule(_L + r"self_attn\.(W_pack|o_proj)\.weight", r"model/layers_\1/self_attn/\2/kernel", transform=transpose),
    rule(_L + r"mlp\.(gate|up|down)_proj\.weight", r"model/layers_\1/mlp/\2_proj/kernel", transform=transpose),
    rule(_L + r"(input_layernorm|post_attention_layernorm)\.weight", r"model/layers_\1/\2/weight"),
    rule(r"model\.norm\.weight", "model/norm/weight"),
    rule(r"lm_head\.weight", "lm_head/kernel", transform=lm_head_kernel),
    rule(_L + r"self_attn\.rotary_emb\.inv_freq"),  # buffer in the 7B checkpoints, recomputed here
)
BaichuanForCausalLM.hf_weight_table = BAICHUAN_WEIGHT_TABLE

BAICHUAN_SHARDING_TABLE = megatron_table(
    embedding="model/embed_tokens/embedding", layers=r"model/layers_\d+/", qkv=("self_attn/W_pack", baichuan_qkv),
    attn_out="self_attn/o_proj", mlp_in="mlp/(gate|up)_proj", mlp_out="mlp/down_proj", lm_head="lm_head")
BaichuanForCausalLM.hf_sharding_table = BAICHUAN_SHARDING_TABLE
