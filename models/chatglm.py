"""ChatGLM2 / ChatGLM3 (and GLM-4-9B remote code) port: ``ChatGLMModel`` /
``ChatGLMForConditionalGeneration`` (THUDM/chatglm2-6b, chatglm3-6b, chatglm3-6b-32k, glm-4-9b-chat).

Names and keys as the published ``modeling_chatglm.py``/``config.json``:
``transformer.embedding.word_embeddings``, ``transformer.encoder.layers.N.{input_layernorm,
self_attention.query_key_value, self_attention.dense, post_attention_layernorm, mlp.dense_h_to_4h,
mlp.dense_4h_to_h}``, ``transformer.encoder.final_layernorm``, ``transformer.output_layer``;
``num_layers``, ``padded_vocab_size``, ``kv_channels``, ``ffn_hidden_size``, ``layernorm_epsilon``,
``multi_query_attention`` + ``multi_query_group_num`` (KV heads), ``add_bias_linear``,
``add_qkv_bias``, ``apply_residual_connection_post_layernorm``, ``post_layer_norm``, ``rmsnorm``,
``seq_length``, ``rope_ratio`` (RoPE base = 10000 * rope_ratio).

Attention packs ``[q (all heads) | k (groups) | v (groups)]``; RoPE covers only the first half of
each head's dims and rotates adjacent pairs (x0, x1), (x2, x3), … with frequencies over that half;
the MLP is SwiGLU over the two halves of ``dense_h_to_4h``'s output (silu(first) * second).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from models.attention_metadata import AttentionMetadata
from models.config_utils import PortConfig, common_fields
from models.layers import KVCache, LayerNorm, RMSNorm, dense, lm_logits, paged_attention, run_layers
from models.rotary import RopeConfig, apply_rotary, rope_cos_sin
from models.sharding import Packed, ShardRule, megatron_table, tensor_parallel_size
from models.weight_table import WeightRule, rule, transpose


@dataclasses.dataclass(frozen=True)
class ChatGLMConfig(PortConfig):
    """The subset of a ChatGLM2/3 ``config.json`` the port uses."""

    vocab_size: int  # padded_vocab_size
    hidden_size: int
    num_hidden_layers: int  # num_layers
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # kv_channels
    ffn_hidden_size: int
    rope: RopeConfig
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    apply_residual_connection_post_layernorm: bool = False
    post_layer_norm: bool = True
    max_position_embeddings: int = 2048  # seq_length
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "ChatGLMConfig":
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("kv_channels") or hf["hidden_size"] // n_heads
        n_kv = hf.get("multi_query_group_num", 1) if hf.get("multi_query_attention", False) else n_heads
        if n_heads % n_kv:
            raise ValueError(f"num_attention_heads={n_heads} must be a multiple of multi_query_group_num={n_kv}")
        if head_dim % 4:
            raise ValueError(f"kv_channels={head_dim} must be a multiple of 4 (RoPE rotates pairs in half the dims)")
        seq_length = int(hf.get("seq_length", 2048))
        rope = RopeConfig.from_hf({"rope_theta": 10000.0 * float(hf.get("rope_ratio", 1.0) or 1.0)},
                                  head_dim // 2, interleaved=True, max_position_embeddings=seq_length)
        return cls(
            vocab_size=hf.get("padded_vocab_size") or hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_hidden_layers=hf.get("num_layers", hf.get("num_hidden_layers")),
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            ffn_hidden_size=hf["ffn_hidden_size"],
            rope=rope,
            layernorm_epsilon=hf.get("layernorm_epsilon", 1e-5),
            rmsnorm=bool(hf.get("rmsnorm", True)),
            add_bias_linear=bool(hf.get("add_bias_linear", False)),
            add_qkv_bias=bool(hf.get("add_qkv_bias", False)),
            apply_residual_connection_post_layernorm=bool(hf.get("apply_residual_connection_post_layernorm", False)),
            post_layer_norm=bool(hf.get("post_layer_norm", True)),
            max_position_embeddings=seq_length,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **common_fields(hf),
        )


def _norm(c: ChatGLMConfig, dtype: Any, name: str | None = None) -> nn.Module:
    if c.rmsnorm:
        return RMSNorm(c.hidden_size, c.layernorm_epsilon, dtype, name=name)
    return LayerNorm(c.hidden_size, c.layernorm_epsilon, dtype, name=name)


def chatglm_qkv(config: ChatGLMConfig) -> Packed:
    """``query_key_value``'s ``[q (all heads) | k (groups) | v (groups)]`` layout."""
    return Packed.qkv(config.num_attention_heads, config.num_key_value_heads, config.head_dim)


def chatglm_gate_up(config: ChatGLMConfig) -> Packed:
    """``dense_h_to_4h``'s two halves, SwiGLU's gate and up."""
    return Packed.concat(config.ffn_hidden_size, config.ffn_hidden_size)


class SelfAttention(nn.Module):
    config: ChatGLMConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache: KVCache, metadata: AttentionMetadata, cos, sin):
        c = self.config
        T, D, tp = x.shape[0], c.head_dim, tensor_parallel_size(c)
        packed = chatglm_qkv(c)
        qkv = dense(packed.width(tp), c.add_bias_linear or c.add_qkv_bias, self.dtype, "query_key_value")(x)
        q, k, v = packed.split(qkv, tp)
        q = apply_rotary(q, cos, sin, interleaved=True)
        k = apply_rotary(k, cos, sin, interleaved=True)
        out, kv_cache = paged_attention(q, k, v, kv_cache, positions, metadata, scale=D**-0.5)
        return dense(c.hidden_size, c.add_bias_linear, self.dtype, "dense")(out.reshape(T, -1)), kv_cache


class MLP(nn.Module):
    config: ChatGLMConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        tp = tensor_parallel_size(c)
        packed = chatglm_gate_up(c)
        h = dense(packed.width(tp), c.add_bias_linear, self.dtype, "dense_h_to_4h")(x)
        gate, up = (t.reshape(x.shape[0], -1) for t in packed.split(h, tp))
        return dense(c.hidden_size, c.add_bias_linear, self.dtype, "dense_4h_to_h")(nn.silu(gate) * up)


class GLMBlock(nn.Module):
    config: ChatGLMConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache, metadata, cos, sin):
        c = self.config
        post_ln_residual = c.apply_residual_connection_post_layernorm
        h = _norm(c, self.dtype, "input_layernorm")(x)
        attn, kv_cache = SelfAttention(c, self.dtype, name="self_attention")(h, positions, kv_cache, metadata, cos, sin)
        x = attn + (h if post_ln_residual else x)
        h = _norm(c, self.dtype, "post_attention_layernorm")(x)
        return MLP(c, self.dtype, name="mlp")(h) + (h if post_ln_residual else x), kv_cache


class GLMTransformer(nn.Module):
    config: ChatGLMConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.layers = [GLMBlock(c, self.dtype, name=f"layers_{i}")
                       for i in range(c.num_hidden_layers)]
        if c.post_layer_norm:
            self.final_layernorm = _norm(c, self.dtype)

    def __call__(self, x, positions, kv_caches, metadata, cos, sin):
        x, new_caches = run_layers(self.layers, x, positions, kv_caches, metadata, cos, sin)
        if self.config.post_layer_norm:
            x = self.final_layernorm(x)
        return x, new_caches


class Embedding(nn.Module):
    config: ChatGLMConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.word_embeddings = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype)

    def __call__(self, input_ids):
        return self.word_embeddings(input_ids)


class ChatGLMModel(nn.Module):
    config: ChatGLMConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.embedding = Embedding(c, self.dtype)
        self.encoder = GLMTransformer(c, self.dtype)
        self.output_layer = dense(c.vocab_size, False, self.dtype, "output_layer")

    def __call__(self, input_ids, positions, kv_caches: Sequence[KVCache], metadata: AttentionMetadata):
        cos, sin = rope_cos_sin(self.config.rope, positions)
        return self.encoder(self.embedding(input_ids), positions, kv_caches, metadata, cos, sin)


class ChatGLMForConditionalGeneration(nn.Module):
    """ChatGLM2/3's remote-code ``ChatGLMForConditionalGeneration`` with a paged KV cache."""

    config: ChatGLMConfig
    dtype: Any = jnp.float32

    config_class: ClassVar[type] = ChatGLMConfig
    hf_weight_table: ClassVar[Sequence[WeightRule]] = ()  # set below
    hf_sharding_table: ClassVar[Sequence[ShardRule]] = ()  # set below

    def setup(self):
        self.transformer = ChatGLMModel(self.config, self.dtype)

    def __call__(self, input_ids, positions, kv_caches, metadata):
        return self.transformer(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
        return lm_logits(hidden, None, self.transformer.output_layer, tied=False)


_L = r"transformer\.encoder\.layers\.(\d+)\."
CHATGLM_WEIGHT_TABLE: tuple[WeightRule, ...] = (
    rule(r"transformer\.embedding\.word_embeddings\.weight", "transformer/embedding/word_embeddings/embedding"),
    rule(_L + r"(input_layernorm|post_attention_layernorm)\.(weight|bias)", r"transformer/encoder/layers_\1/\2/\3"),
    rule(_L + r"self_attention\.(query_key_value|dense)\.weight",
         r"transformer/encoder/layers_\1/self_attention/\2/kernel", transform=transpose),
    rule(_L + r"self_attention\.(query_key_value|dense)\.bias", r"transformer/encoder/layers_\1/self_attention/\2/bias"),
    rule(_L + r"mlp\.(dense_h_to_4h|dense_4h_to_h)\.weight", r"transformer/encoder/layers_\1/mlp/\2/kernel",
         transform=transpose),
    rule(_L + r"mlp\.(dense_h_to_4h|dense_4h_to_h)\.bias", r"transformer/encoder/layers_\1/mlp/\2/bias"),
    rule(r"transformer\.encoder\.final_layernorm\.(weight|bias)", r"transformer/encoder/final_layernorm/\1"),
    rule(r"transformer\.output_layer\.weight", "transformer/output_layer/kernel", transform=transpose),
    rule(r"transformer\.rotary_pos_emb\.inv_freq"),  # buffer saved in the checkpoints, recomputed here
)
ChatGLMForConditionalGeneration.hf_weight_table = CHATGLM_WEIGHT_TABLE

CHATGLM_SHARDING_TABLE = megatron_table(
    embedding="transformer/embedding/word_embeddings/embedding", layers=r"transformer/encoder/layers_\d+/",
    qkv=("self_attention/query_key_value", chatglm_qkv), attn_out="self_attention/dense",
    mlp_in=("mlp/dense_h_to_4h", chatglm_gate_up), mlp_out="mlp/dense_4h_to_h", lm_head="transformer/output_layer")
ChatGLMForConditionalGeneration.hf_sharding_table = CHATGLM_SHARDING_TABLE
