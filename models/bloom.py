"""BLOOM port: ``BloomForCausalLM`` (bigscience/bloom-560m … bloom-176b, bloomz).

ALiBi instead of position embeddings, a LayerNorm right after the word embeddings, a packed
``query_key_value`` projection laid out per head as ``[head][q|k|v][head_dim]``, GELU (tanh) MLP
and a head tied to the embeddings. Parameter names follow HF (``transformer/h_N/...``); the packed
projection is kept packed and split at run time, exactly as HF does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from models.attention_metadata import AttentionMetadata
from models.config_utils import PortConfig, common_fields, divisible_head_dim
from models.layers import DenseMLP, KVCache, LayerNorm, alibi_slopes, dense, lm_logits, paged_attention, run_layers
from models.sharding import Packed, ShardRule, megatron_table, tensor_parallel_size
from models.weight_table import WeightRule, rule, transpose


@dataclasses.dataclass(frozen=True)
class BloomConfig(PortConfig):
    """The subset of an HF BLOOM ``config.json`` the port uses."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    layer_norm_epsilon: float = 1e-5
    apply_residual_connection_post_layernorm: bool = False
    tie_word_embeddings: bool = True
    # ALiBi has no hard limit; BLOOM was trained on 2048-token sequences.
    max_position_embeddings: int = 2048

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "BloomConfig":
        hidden = hf.get("hidden_size", hf.get("n_embed"))
        n_head = hf.get("n_head", hf.get("num_attention_heads"))
        n_layer = hf.get("n_layer", hf.get("num_hidden_layers"))
        if hidden is None or n_head is None or n_layer is None:
            raise ValueError("BLOOM config needs hidden_size (or n_embed), n_head and n_layer")
        divisible_head_dim(hidden, n_head, "hidden_size", "n_head")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            apply_residual_connection_post_layernorm=bool(hf.get("apply_residual_connection_post_layernorm", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            max_position_embeddings=int(hf.get("seq_length") or hf.get("max_position_embeddings") or 2048),
            **common_fields(hf),
        )


def bloom_qkv(config: BloomConfig) -> Packed:
    """``query_key_value``'s per-head ``[q|k|v]`` layout."""
    return Packed.qkv(config.num_attention_heads, config.num_attention_heads, config.head_dim, grouped=True)


class BloomAttention(nn.Module):
    config: BloomConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache: KVCache, metadata: AttentionMetadata, slopes):
        c = self.config
        T, tp = x.shape[0], tensor_parallel_size(c)
        packed = bloom_qkv(c)
        q, k, v = packed.split(dense(packed.width(tp), True, self.dtype, "query_key_value")(x), tp)
        out, kv_cache = paged_attention(
            q, k, v, kv_cache, positions, metadata, scale=c.head_dim**-0.5,
            alibi_slopes=slopes,
        )
        return dense(c.hidden_size, True, self.dtype, "dense")(out.reshape(T, -1)), kv_cache


class BloomBlock(nn.Module):
    config: BloomConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache, metadata, slopes):
        c = self.config
        post_ln_residual = c.apply_residual_connection_post_layernorm
        h = LayerNorm(c.hidden_size, c.layer_norm_epsilon, self.dtype, name="input_layernorm")(x)
        attn, kv_cache = BloomAttention(c, self.dtype, name="self_attention")(h, positions, kv_cache, metadata, slopes)
        x = attn + (h if post_ln_residual else x)
        h = LayerNorm(c.hidden_size, c.layer_norm_epsilon, self.dtype, name="post_attention_layernorm")(x)
        mlp = DenseMLP(
            4 * c.hidden_size, c.hidden_size, "gelu_new", True,
            "dense_h_to_4h", "dense_4h_to_h", self.dtype, name="mlp",
        )
        return mlp(h) + (h if post_ln_residual else x), kv_cache


class BloomModel(nn.Module):
    config: BloomConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.word_embeddings = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        self.word_embeddings_layernorm = LayerNorm(c.hidden_size, c.layer_norm_epsilon, self.dtype)
        self.h = [BloomBlock(c, self.dtype, name=f"h_{i}") for i in range(c.num_hidden_layers)]
        self.ln_f = LayerNorm(c.hidden_size, c.layer_norm_epsilon, self.dtype)

    def __call__(self, input_ids, positions, kv_caches: Sequence[KVCache], metadata: AttentionMetadata):
        x = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
        slopes = alibi_slopes(self.config.num_attention_heads)
        x, new_caches = run_layers(self.h, x, positions, kv_caches, metadata, slopes)
        return self.ln_f(x), new_caches


class BloomForCausalLM(nn.Module):
    """HF ``BloomForCausalLM`` with a paged KV cache."""

    config: BloomConfig
    dtype: Any = jnp.float32

    config_class: ClassVar[type] = BloomConfig
    hf_weight_table: ClassVar[Sequence[WeightRule]] = ()  # set below
    hf_sharding_table: ClassVar[Sequence[ShardRule]] = ()  # set below

    def setup(self):
        self.transformer = BloomModel(self.config, self.dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = dense(self.config.vocab_size, False, self.dtype, "lm_head")

    def __call__(self, input_ids, positions, kv_caches, metadata):
        return self.transformer(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
        tied = self.config.tie_word_embeddings
        return lm_logits(hidden, self.transformer.word_embeddings, None if tied else self.lm_head, tied=tied)


# bigscience's own checkpoints were saved from BloomModel, so their names lack "transformer.".
_P = r"(?:transformer\.)?"
_H = _P + r"h\.(\d+)\."
BLOOM_WEIGHT_TABLE: tuple[WeightRule, ...] = (
    rule(_P + r"word_embeddings\.weight", "transformer/word_embeddings/embedding"),
    rule(_P + r"(word_embeddings_layernorm|ln_f)\.(weight|bias)", r"transformer/\1/\2"),
    rule(_H + r"(input_layernorm|post_attention_layernorm)\.(weight|bias)", r"transformer/h_\1/\2/\3"),
    rule(_H + r"self_attention\.(query_key_value|dense)\.weight", r"transformer/h_\1/self_attention/\2/kernel",
         transform=transpose),
    rule(_H + r"self_attention\.(query_key_value|dense)\.bias", r"transformer/h_\1/self_attention/\2/bias"),
    rule(_H + r"mlp\.(dense_h_to_4h|dense_4h_to_h)\.weight", r"transformer/h_\1/mlp/\2/kernel", transform=transpose),
    rule(_H + r"mlp\.(dense_h_to_4h|dense_4h_to_h)\.bias", r"transformer/h_\1/mlp/\2/bias"),
    rule(r"lm_head\.weight", "lm_head/kernel", transform=transpose),
)
BloomForCausalLM.hf_weight_table = BLOOM_WEIGHT_TABLE

BLOOM_SHARDING_TABLE = megatron_table(
    embedding="transformer/word_embeddings/embedding", layers=r"transformer/h_\d+/",
    qkv=("self_attention/query_key_value", bloom_qkv), attn_out="self_attention/dense", mlp_in="mlp/dense_h_to_4h",
    mlp_out="mlp/dense_4h_to_h", lm_head="lm_head")
BloomForCausalLM.hf_sharding_table = BLOOM_SHARDING_TABLE
