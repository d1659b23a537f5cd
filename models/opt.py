"""``OPTForCausalLM`` (Meta OPT-125m … 66B, Galactica-style OPT checkpoints) with a paged KV cache.

OPT learns absolute position embeddings with a table offset of 2 (row ``position + 2``); only the
embedding lookup applies the offset, attention works in KV indices. ``do_layer_norm_before=False``
(OPT-350m) makes the blocks post-LN and drops the final LayerNorm; ``word_embed_proj_dim`` smaller
than ``hidden_size`` (OPT-350m) adds ``project_in``/``project_out`` around the decoder stack.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from models.attention_metadata import AttentionMetadata
from models.config_utils import PortConfig, common_fields, divisible_head_dim, hf_get
from models.layers import KVCache, LayerNorm, dense, get_activation, lm_logits, paged_attention, run_layers
from models.sharding import ShardRule, megatron_table
from models.weight_table import WeightRule, rule, transpose

# OPT's learned position table has two leading rows (a fairseq padding-index artefact).
POSITION_OFFSET = 2


@dataclasses.dataclass(frozen=True)
class OPTConfig(PortConfig):
    """The subset of an HF OPT ``config.json`` the port uses."""

    vocab_size: int
    hidden_size: int
    ffn_dim: int
    num_hidden_layers: int
    num_attention_heads: int
    word_embed_proj_dim: int
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "OPTConfig":
        hidden = hf_get(hf, "hidden_size")
        heads = hf_get(hf, "num_attention_heads")
        divisible_head_dim(hidden, heads, "hidden_size", "num_attention_heads")
        return cls(
            vocab_size=hf_get(hf, "vocab_size"),
            hidden_size=hidden,
            ffn_dim=hf_get(hf, "ffn_dim"),
            num_hidden_layers=hf_get(hf, "num_hidden_layers"),
            num_attention_heads=heads,
            word_embed_proj_dim=hf_get(hf, "word_embed_proj_dim", default=hidden),
            max_position_embeddings=hf_get(hf, "max_position_embeddings", default=2048),
            do_layer_norm_before=bool(hf_get(hf, "do_layer_norm_before", default=True)),
            remove_final_layer_norm=bool(hf_get(hf, "_remove_final_layer_norm", default=False)),
            activation_function=hf_get(hf, "activation_function", default="relu"),
            enable_bias=bool(hf_get(hf, "enable_bias", default=True)),
            layer_norm_elementwise_affine=bool(hf_get(hf, "layer_norm_elementwise_affine", default=True)),
            tie_word_embeddings=bool(hf_get(hf, "tie_word_embeddings", default=True)),
            **common_fields(hf),
        )


def _layer_norm(c: OPTConfig, dtype: Any, name: str | None = None) -> LayerNorm:
    affine = c.layer_norm_elementwise_affine
    return LayerNorm(c.hidden_size, 1e-5, dtype, use_bias=affine, use_scale=affine, name=name)


class OPTAttention(nn.Module):
    config: OPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache: KVCache, metadata: AttentionMetadata):
        c = self.config
        T, H, D = x.shape[0], c.num_attention_heads, c.head_dim
        # HF scales the query projection itself and runs attention with scale 1: same order here.
        q = dense(c.hidden_size, c.enable_bias, self.dtype, "q_proj")(x) * (D**-0.5)
        k = dense(c.hidden_size, c.enable_bias, self.dtype, "k_proj")(x)
        v = dense(c.hidden_size, c.enable_bias, self.dtype, "v_proj")(x)
        out, kv_cache = paged_attention(
            q.reshape(T, H, D), k.reshape(T, H, D), v.reshape(T, H, D), kv_cache, positions, metadata,
            scale=1.0,
        )
        return dense(c.hidden_size, c.enable_bias, self.dtype, "out_proj")(out.reshape(T, -1)), kv_cache


class OPTDecoderLayer(nn.Module):
    config: OPTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache, metadata):
        c = self.config
        pre_ln = c.do_layer_norm_before
        attn_ln = _layer_norm(c, self.dtype, "self_attn_layer_norm")
        mlp_ln = _layer_norm(c, self.dtype, "final_layer_norm")

        h, kv_cache = OPTAttention(c, self.dtype, name="self_attn")(
            attn_ln(x) if pre_ln else x, positions, kv_cache, metadata
        )
        x = x + h
        if not pre_ln:
            x = attn_ln(x)

        h = dense(c.ffn_dim, c.enable_bias, self.dtype, "fc1")(mlp_ln(x) if pre_ln else x)
        h = dense(c.hidden_size, c.enable_bias, self.dtype, "fc2")(get_activation(c.activation_function)(h))
        x = x + h
        if not pre_ln:
            x = mlp_ln(x)
        return x, kv_cache


class OPTDecoder(nn.Module):
    config: OPTConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        emb = dict(dtype=self.dtype, param_dtype=self.dtype)
        self.embed_tokens = nn.Embed(c.vocab_size, c.word_embed_proj_dim, **emb)
        self.embed_positions = nn.Embed(c.max_position_embeddings + POSITION_OFFSET, c.hidden_size, **emb)
        if c.word_embed_proj_dim != c.hidden_size:
            self.project_in = dense(c.hidden_size, False, self.dtype, "project_in")
            self.project_out = dense(c.word_embed_proj_dim, False, self.dtype, "project_out")
        if c.has_final_layer_norm:
            self.final_layer_norm = _layer_norm(c, self.dtype)
        self.layers = [
            OPTDecoderLayer(c, self.dtype, name=f"layers_{i}")
            for i in range(c.num_hidden_layers)
        ]

    def __call__(self, input_ids, positions, kv_caches: Sequence[KVCache], metadata: AttentionMetadata):
        c = self.config
        x = self.embed_tokens(input_ids)
        if c.word_embed_proj_dim != c.hidden_size:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        x, new_caches = run_layers(self.layers, x, positions, kv_caches, metadata)
        if c.has_final_layer_norm:
            x = self.final_layer_norm(x)
        if c.word_embed_proj_dim != c.hidden_size:
            x = self.project_out(x)
        return x, new_caches


class OPTModel(nn.Module):
    config: OPTConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.decoder = OPTDecoder(self.config, self.dtype)

    def __call__(self, input_ids, positions, kv_caches, metadata):
        return self.decoder(input_ids, positions, kv_caches, metadata)


class OPTForCausalLM(nn.Module):
    """HF ``OPTForCausalLM`` with a paged KV cache. Hidden states it returns have
    ``word_embed_proj_dim`` features (after ``project_out``)."""

    config: OPTConfig
    dtype: Any = jnp.float32

    config_class: ClassVar[type] = OPTConfig
    hf_weight_table: ClassVar[Sequence[WeightRule]] = ()  # set below
    hf_sharding_table: ClassVar[Sequence[ShardRule]] = ()  # set below

    def setup(self):
        self.model = OPTModel(self.config, self.dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = dense(self.config.vocab_size, False, self.dtype, "lm_head")

    def __call__(self, input_ids, positions, kv_caches, metadata):
        return self.model(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
        tied = self.config.tie_word_embeddings
        return lm_logits(hidden, self.model.decoder.embed_tokens, None if tied else self.lm_head, tied=tied)


# facebook/opt-* checkpoints were saved from OPTModel: names start at "decoder.".
_D = r"(?:model\.)?decoder\."
_L = _D + r"layers\.(\d+)\."
OPT_WEIGHT_TABLE: tuple[WeightRule, ...] = (
    rule(_D + r"embed_tokens\.weight", "model/decoder/embed_tokens/embedding"),
    rule(_D + r"embed_positions\.weight", "model/decoder/embed_positions/embedding"),
    rule(_D + r"(project_in|project_out)\.weight", r"model/decoder/\1/kernel", transform=transpose),
    rule(_D + r"final_layer_norm\.(weight|bias)", r"model/decoder/final_layer_norm/\1"),
    rule(_L + r"self_attn\.(q|k|v|out)_proj\.weight", r"model/decoder/layers_\1/self_attn/\2_proj/kernel",
         transform=transpose),
    rule(_L + r"self_attn\.(q|k|v|out)_proj\.bias", r"model/decoder/layers_\1/self_attn/\2_proj/bias"),
    rule(_L + r"(self_attn_layer_norm|final_layer_norm)\.(weight|bias)", r"model/decoder/layers_\1/\2/\3"),
    rule(_L + r"(fc1|fc2)\.weight", r"model/decoder/layers_\1/\2/kernel", transform=transpose),
    rule(_L + r"(fc1|fc2)\.bias", r"model/decoder/layers_\1/\2/bias"),
    rule(r"lm_head\.weight", "lm_head/kernel", transform=transpose),
)
OPTForCausalLM.hf_weight_table = OPT_WEIGHT_TABLE

OPT_SHARDING_TABLE = megatron_table(
    embedding="model/decoder/embed_tokens/embedding", layers=r"model/decoder/layers_\d+/",
    qkv="self_attn/(q|k|v)_proj", attn_out="self_attn/out_proj", mlp_in="fc1", mlp_out="fc2", lm_head="lm_head")
OPTForCausalLM.hf_sharding_table = OPT_SHARDING_TABLE
