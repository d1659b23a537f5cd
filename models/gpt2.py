"""``GPT2LMHeadModel`` (GPT-2, DistilGPT-2, and GPT-2-shaped fine-tunes) with a paged KV cache.

GPT-2 adds learned absolute position embeddings (``wpe``) to the token embeddings, uses pre-LN
blocks, and stores its projections as ``Conv1D`` whose weights are already ``[in, out]`` (no
transpose). The query/key/value projection stays packed as ``c_attn`` (``[q | k | v]`` along the
output axis), as in the checkpoint. The LM head is tied to ``wte`` unless the config says not.
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
class GPT2Config(PortConfig):
    """The subset of an HF GPT-2 ``config.json`` the port uses."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 1024
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    # HF's flag only changes where fp16/bf16 attention is upcast; the paged attention here always
    # computes scores and softmax in float32, so it is accepted and has no further effect.
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "GPT2Config":
        hidden = hf_get(hf, "n_embd", "hidden_size")
        heads = hf_get(hf, "n_head", "num_attention_heads")
        divisible_head_dim(hidden, heads, "n_embd", "n_head")
        if hf.get("add_cross_attention"):
            raise ValueError("add_cross_attention=True (encoder-decoder GPT-2) is not supported; allowed: false")
        return cls(
            vocab_size=hf_get(hf, "vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=hf_get(hf, "n_layer", "num_hidden_layers"),
            num_attention_heads=heads,
            intermediate_size=hf_get(hf, "n_inner", "intermediate_size", default=4 * hidden),
            max_position_embeddings=hf_get(hf, "n_positions", "max_position_embeddings", default=1024),
            layer_norm_epsilon=hf_get(hf, "layer_norm_epsilon", default=1e-5),
            activation_function=hf_get(hf, "activation_function", default="gelu_new"),
            scale_attn_weights=bool(hf_get(hf, "scale_attn_weights", default=True)),
            scale_attn_by_inverse_layer_idx=bool(hf_get(hf, "scale_attn_by_inverse_layer_idx", default=False)),
            reorder_and_upcast_attn=bool(hf_get(hf, "reorder_and_upcast_attn", default=False)),
            tie_word_embeddings=bool(hf_get(hf, "tie_word_embeddings", default=True)),
            **common_fields(hf),
        )


def gpt2_qkv(config: GPT2Config) -> Packed:
    """``c_attn``'s ``[q | k | v]`` layout."""
    return Packed.qkv(config.num_attention_heads, config.num_attention_heads, config.head_dim)


class GPT2Attention(nn.Module):
    config: GPT2Config
    layer_idx: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache: KVCache, metadata: AttentionMetadata):
        c = self.config
        T, tp = x.shape[0], tensor_parallel_size(c)
        packed = gpt2_qkv(c)
        q, k, v = packed.split(dense(packed.width(tp), True, self.dtype, "c_attn")(x), tp)
        scale = c.head_dim**-0.5 if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scale /= float(self.layer_idx + 1)
        out, kv_cache = paged_attention(q, k, v, kv_cache, positions, metadata, scale=scale)
        return dense(c.hidden_size, True, self.dtype, "c_proj")(out.reshape(T, -1)), kv_cache


class GPT2Block(nn.Module):
    config: GPT2Config
    layer_idx: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache, metadata):
        c = self.config
        h = LayerNorm(c.hidden_size, c.layer_norm_epsilon, self.dtype, name="ln_1")(x)
        h, kv_cache = GPT2Attention(c, self.layer_idx, self.dtype, name="attn")(h, positions, kv_cache, metadata)
        x = x + h
        h = LayerNorm(c.hidden_size, c.layer_norm_epsilon, self.dtype, name="ln_2")(x)
        mlp = DenseMLP(
            c.intermediate_size, c.hidden_size, c.activation_function, True, "c_fc", "c_proj", self.dtype, name="mlp",
        )
        return x + mlp(h), kv_cache


class GPT2Model(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.wte = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        self.wpe = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        self.h = [
            GPT2Block(c, i, self.dtype, name=f"h_{i}") for i in range(c.num_hidden_layers)
        ]
        self.ln_f = LayerNorm(c.hidden_size, c.layer_norm_epsilon, self.dtype)

    def __call__(self, input_ids, positions, kv_caches: Sequence[KVCache], metadata: AttentionMetadata):
        x = self.wte(input_ids) + self.wpe(positions)
        x, new_caches = run_layers(self.h, x, positions, kv_caches, metadata)
        return self.ln_f(x), new_caches


class GPT2LMHeadModel(nn.Module):
    """HF ``GPT2LMHeadModel`` with a paged KV cache."""

    config: GPT2Config
    dtype: Any = jnp.float32

    config_class: ClassVar[type] = GPT2Config
    hf_weight_table: ClassVar[Sequence[WeightRule]] = ()  # set below
    hf_sharding_table: ClassVar[Sequence[ShardRule]] = ()  # set below

    def setup(self):
        self.transformer = GPT2Model(self.config, self.dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = dense(self.config.vocab_size, False, self.dtype, "lm_head")

    def __call__(self, input_ids, positions, kv_caches, metadata):
        return self.transformer(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
        tied = self.config.tie_word_embeddings
        return lm_logits(hidden, self.transformer.wte, None if tied else self.lm_head, tied=tied)


# The original openai-community checkpoints were saved from GPT2Model: no "transformer." prefix.
_P = r"(?:transformer\.)?"
_H = _P + r"h\.(\d+)\."
GPT2_WEIGHT_TABLE: tuple[WeightRule, ...] = (
    rule(_P + r"wte\.weight", "transformer/wte/embedding"),
    rule(_P + r"wpe\.weight", "transformer/wpe/embedding"),
    rule(_H + r"(ln_1|ln_2)\.(weight|bias)", r"transformer/h_\1/\2/\3"),
    # Conv1D stores [in, out] already.
    rule(_H + r"attn\.(c_attn|c_proj)\.weight", r"transformer/h_\1/attn/\2/kernel"),
    rule(_H + r"attn\.(c_attn|c_proj)\.bias", r"transformer/h_\1/attn/\2/bias"),
    rule(_H + r"mlp\.(c_fc|c_proj)\.weight", r"transformer/h_\1/mlp/\2/kernel"),
    rule(_H + r"mlp\.(c_fc|c_proj)\.bias", r"transformer/h_\1/mlp/\2/bias"),
    rule(_P + r"ln_f\.(weight|bias)", r"transformer/ln_f/\1"),
    rule(r"lm_head\.weight", "lm_head/kernel", transform=transpose),
    rule(_H + r"attn\.(bias|masked_bias)"),  # causal-mask buffers in old checkpoints
)
GPT2LMHeadModel.hf_weight_table = GPT2_WEIGHT_TABLE

GPT2_SHARDING_TABLE = megatron_table(
    embedding="transformer/wte/embedding", layers=r"transformer/h_\d+/", qkv=("attn/c_attn", gpt2_qkv),
    attn_out="attn/c_proj", mlp_in="mlp/c_fc", mlp_out="mlp/c_proj", lm_head="lm_head")
GPT2LMHeadModel.hf_sharding_table = GPT2_SHARDING_TABLE
