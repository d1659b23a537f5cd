"""``GPTBigCodeForCausalLM`` (SantaCoder, StarCoder, WizardCoder, Octocoder) with a paged KV cache.

GPT-2's block structure with ``nn.Linear`` projections (``[out, in]``: transposed on load) and,
with ``multi_query`` (the default), one shared key/value head. The packed ``c_attn`` output is laid
out as ``[q (H*D) | k (D) | v (D)]`` under multi-query, and per head as ``[H, (q|k|v), D]``
otherwise; it stays packed here, as in the checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from models.attention_metadata import AttentionMetadata
from models.config_utils import PortConfig, common_fields, divisible_head_dim, hf_get
from models.layers import DenseMLP, KVCache, LayerNorm, dense, lm_logits, paged_attention, run_layers
from models.sharding import Packed, ShardRule, megatron_table, tensor_parallel_size
from models.weight_table import WeightRule, rule, transpose


@dataclasses.dataclass(frozen=True)
class GPTBigCodeConfig(PortConfig):
    """The subset of an HF GPT BigCode ``config.json`` the port uses."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    multi_query: bool = True
    max_position_embeddings: int = 1024
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_pytorch_tanh"
    scale_attn_weights: bool = True
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return 1 if self.multi_query else self.num_attention_heads

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "GPTBigCodeConfig":
        hidden = hf_get(hf, "n_embd", "hidden_size")
        heads = hf_get(hf, "n_head", "num_attention_heads")
        divisible_head_dim(hidden, heads, "n_embd", "n_head")
        if hf.get("add_cross_attention"):
            raise ValueError("add_cross_attention=True is not supported; allowed: false")
        return cls(
            vocab_size=hf_get(hf, "vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=hf_get(hf, "n_layer", "num_hidden_layers"),
            num_attention_heads=heads,
            intermediate_size=hf_get(hf, "n_inner", "intermediate_size", default=4 * hidden),
            multi_query=bool(hf_get(hf, "multi_query", default=True)),
            max_position_embeddings=hf_get(hf, "n_positions", "max_position_embeddings", default=1024),
            layer_norm_epsilon=hf_get(hf, "layer_norm_epsilon", default=1e-5),
            activation_function=hf_get(hf, "activation_function", default="gelu_pytorch_tanh"),
            scale_attn_weights=bool(hf_get(hf, "scale_attn_weights", default=True)),
            tie_word_embeddings=bool(hf_get(hf, "tie_word_embeddings", default=True)),
            **common_fields(hf),
        )


def bigcode_qkv(config: GPTBigCodeConfig) -> Packed:
    """``c_attn``'s layout: ``[q | k | v]`` under multi-query, per head ``[q|k|v]`` otherwise."""
    c = config
    return Packed.qkv(c.num_attention_heads, c.num_key_value_heads, c.head_dim, grouped=not c.multi_query)


class GPTBigCodeAttention(nn.Module):
    config: GPTBigCodeConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache: KVCache, metadata: AttentionMetadata):
        c = self.config
        T, D, tp = x.shape[0], c.head_dim, tensor_parallel_size(c)
        packed = bigcode_qkv(c)
        q, k, v = packed.split(dense(packed.width(tp), True, self.dtype, "c_attn")(x), tp)
        scale = D**-0.5 if c.scale_attn_weights else 1.0
        out, kv_cache = paged_attention(q, k, v, kv_cache, positions, metadata, scale=scale)
        return dense(c.hidden_size, True, self.dtype, "c_proj")(out.reshape(T, -1)), kv_cache


class GPTBigCodeBlock(nn.Module):
    config: GPTBigCodeConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache, metadata):
        c = self.config
        h = LayerNorm(c.hidden_size, c.layer_norm_epsilon, self.dtype, name="ln_1")(x)
        h, kv_cache = GPTBigCodeAttention(c, self.dtype, name="attn")(h, positions, kv_cache, metadata)
        x = x + h
        h = LayerNorm(c.hidden_size, c.layer_norm_epsilon, self.dtype, name="ln_2")(x)
        mlp = DenseMLP(
            c.intermediate_size, c.hidden_size, c.activation_function, True, "c_fc", "c_proj", self.dtype, name="mlp",
        )
        return x + mlp(h), kv_cache


class GPTBigCodeModel(nn.Module):
    config: GPTBigCodeConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.wte = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        self.wpe = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        self.h = [
            GPTBigCodeBlock(c, self.dtype, name=f"h_{i}") for i in range(c.num_hidden_layers)
        ]
        self.ln_f = LayerNorm(c.hidden_size, c.layer_norm_epsilon, self.dtype)

    def __call__(self, input_ids, positions, kv_caches: Sequence[KVCache], metadata: AttentionMetadata):
        x = self.wte(input_ids) + self.wpe(positions)
        x, new_caches = run_layers(self.h, x, positions, kv_caches, metadata)
        return self.ln_f(x), new_caches


class GPTBigCodeForCausalLM(nn.Module):
    """HF ``GPTBigCodeForCausalLM`` with a paged KV cache."""

    config: GPTBigCodeConfig
    dtype: Any = jnp.float32

    config_class: ClassVar[type] = GPTBigCodeConfig
    hf_weight_table: ClassVar[Sequence[WeightRule]] = ()  # set below
    hf_sharding_table: ClassVar[Sequence[ShardRule]] = ()  # set below

    def setup(self):
        self.transformer = GPTBigCodeModel(self.config, self.dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = dense(self.config.vocab_size, False, self.dtype, "lm_head")

    def __call__(self, input_ids, positions, kv_caches, metadata):
        return self.transformer(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
        tied = self.config.tie_word_embeddings
        return lm_logits(hidden, self.transformer.wte, None if tied else self.lm_head, tied=tied)


_H = r"transformer\.h\.(\d+)\."
GPT_BIGCODE_WEIGHT_TABLE: tuple[WeightRule, ...] = (
    rule(r"transformer\.wte\.weight", "transformer/wte/embedding"),
    rule(r"transformer\.wpe\.weight", "transformer/wpe/embedding"),
    rule(_H + r"(ln_1|ln_2)\.(weight|bias)", r"transformer/h_\1/\2/\3"),
    rule(_H + r"attn\.(c_attn|c_proj)\.weight", r"transformer/h_\1/attn/\2/kernel", transform=transpose),
    rule(_H + r"attn\.(c_attn|c_proj)\.bias", r"transformer/h_\1/attn/\2/bias"),
    rule(_H + r"mlp\.(c_fc|c_proj)\.weight", r"transformer/h_\1/mlp/\2/kernel", transform=transpose),
    rule(_H + r"mlp\.(c_fc|c_proj)\.bias", r"transformer/h_\1/mlp/\2/bias"),
    rule(r"transformer\.ln_f\.(weight|bias)", r"transformer/ln_f/\1"),
    rule(r"lm_head\.weight", "lm_head/kernel", transform=transpose),
    rule(r"transformer\.bias"),  # causal-mask buffer in old checkpoints
)
GPTBigCodeForCausalLM.hf_weight_table = GPT_BIGCODE_WEIGHT_TABLE

GPT_BIGCODE_SHARDING_TABLE = megatron_table(
    embedding="transformer/wte/embedding", layers=r"transformer/h_\d+/", qkv=("attn/c_attn", bigcode_qkv),
    attn_out="attn/c_proj", mlp_in="mlp/c_fc", mlp_out="mlp/c_proj", lm_head="lm_head")
GPTBigCodeForCausalLM.hf_sharding_table = GPT_BIGCODE_SHARDING_TABLE
