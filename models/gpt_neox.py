"""``GPTNeoXForCausalLM`` (GPT-NeoX-20B, Pythia, Dolly v2, StableLM-alpha, RedPajama-INCITE) with a
paged KV cache.

The packed ``query_key_value`` projection is laid out per head (``[H, (q|k|v), D]`` along its
output axis) and stays packed here, as in the checkpoint. RoPE rotates the first
``rotary_pct * head_dim`` features (NeoX/Llama half-split style). ``use_parallel_residual``
computes ``x + attn(ln1(x)) + mlp(ln2(x))``; without it the block is sequential pre-LN.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from models.attention_metadata import AttentionMetadata
from models.config_utils import PortConfig, common_fields, divisible_head_dim, hf_get, partial_rotary_factor
from models.layers import DenseMLP, KVCache, LayerNorm, dense, lm_logits, paged_attention, run_layers
from models.rotary import RopeConfig, apply_rotary, rope_cos_sin
from models.sharding import Packed, ShardRule, megatron_table, tensor_parallel_size
from models.weight_table import WeightRule, rule, transpose


@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig(PortConfig):
    """The subset of an HF GPT-NeoX ``config.json`` the port uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    rope: RopeConfig
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    use_parallel_residual: bool = True
    attention_bias: bool = True
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "GPTNeoXConfig":
        hidden = hf_get(hf, "hidden_size")
        heads = hf_get(hf, "num_attention_heads")
        head_dim = divisible_head_dim(hidden, heads, "hidden_size", "num_attention_heads")
        factor = partial_rotary_factor(hf, "rotary_pct", default=0.25)
        rope = RopeConfig.from_hf(
            hf, int(head_dim * factor), default_theta=float(hf.get("rotary_emb_base") or 10000.0)
        )
        return cls(
            vocab_size=hf_get(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=hf_get(hf, "intermediate_size"),
            num_hidden_layers=hf_get(hf, "num_hidden_layers"),
            num_attention_heads=heads,
            rope=rope,
            max_position_embeddings=hf_get(hf, "max_position_embeddings", default=2048),
            layer_norm_eps=hf_get(hf, "layer_norm_eps", default=1e-5),
            hidden_act=hf_get(hf, "hidden_act", default="gelu"),
            use_parallel_residual=bool(hf_get(hf, "use_parallel_residual", default=True)),
            attention_bias=bool(hf_get(hf, "attention_bias", default=True)),
            tie_word_embeddings=bool(hf_get(hf, "tie_word_embeddings", default=False)),
            **common_fields(hf),
        )


def neox_qkv(config: GPTNeoXConfig) -> Packed:
    """``query_key_value``'s per-head ``[q|k|v]`` layout."""
    return Packed.qkv(config.num_attention_heads, config.num_attention_heads, config.head_dim, grouped=True)


class GPTNeoXAttention(nn.Module):
    config: GPTNeoXConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache: KVCache, metadata: AttentionMetadata, cos, sin):
        c = self.config
        T, D, tp = x.shape[0], c.head_dim, tensor_parallel_size(c)
        packed = neox_qkv(c)
        q, k, v = packed.split(dense(packed.width(tp), c.attention_bias, self.dtype, "query_key_value")(x), tp)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        out, kv_cache = paged_attention(q, k, v, kv_cache, positions, metadata, scale=D**-0.5)
        return dense(c.hidden_size, c.attention_bias, self.dtype, "dense")(out.reshape(T, -1)), kv_cache


class GPTNeoXLayer(nn.Module):
    config: GPTNeoXConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache, metadata, cos, sin):
        c = self.config
        ln1 = LayerNorm(c.hidden_size, c.layer_norm_eps, self.dtype, name="input_layernorm")
        ln2 = LayerNorm(c.hidden_size, c.layer_norm_eps, self.dtype, name="post_attention_layernorm")
        mlp = DenseMLP(
            c.intermediate_size, c.hidden_size, c.hidden_act, True,
            "dense_h_to_4h", "dense_4h_to_h", self.dtype, name="mlp",
        )
        attn, kv_cache = GPTNeoXAttention(c, self.dtype, name="attention")(
            ln1(x), positions, kv_cache, metadata, cos, sin
        )
        if c.use_parallel_residual:
            return mlp(ln2(x)) + attn + x, kv_cache
        x = attn + x
        return mlp(ln2(x)) + x, kv_cache


class GPTNeoXModel(nn.Module):
    config: GPTNeoXConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.embed_in = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        self.layers = [
            GPTNeoXLayer(c, self.dtype, name=f"layers_{i}") for i in range(c.num_hidden_layers)
        ]
        self.final_layer_norm = LayerNorm(c.hidden_size, c.layer_norm_eps, self.dtype)

    def __call__(self, input_ids, positions, kv_caches: Sequence[KVCache], metadata: AttentionMetadata):
        x = self.embed_in(input_ids)
        seq_lens_per_token = metadata.seq_lens[metadata.token_seq_ids()]
        cos, sin = rope_cos_sin(self.config.rope, positions, seq_lens_per_token)
        x, new_caches = run_layers(self.layers, x, positions, kv_caches, metadata, cos, sin)
        return self.final_layer_norm(x), new_caches


class GPTNeoXForCausalLM(nn.Module):
    """HF ``GPTNeoXForCausalLM`` with a paged KV cache."""

    config: GPTNeoXConfig
    dtype: Any = jnp.float32

    config_class: ClassVar[type] = GPTNeoXConfig
    hf_weight_table: ClassVar[Sequence[WeightRule]] = ()  # set below
    hf_sharding_table: ClassVar[Sequence[ShardRule]] = ()  # set below

    def setup(self):
        self.gpt_neox = GPTNeoXModel(self.config, self.dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = dense(self.config.vocab_size, False, self.dtype, "lm_head")

    def __call__(self, input_ids, positions, kv_caches, metadata):
        return self.gpt_neox(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
        tied = self.config.tie_word_embeddings
        return lm_logits(hidden, self.gpt_neox.embed_in, None if tied else self.lm_head, tied=tied)


_L = r"gpt_neox\.layers\.(\d+)\."
GPT_NEOX_WEIGHT_TABLE: tuple[WeightRule, ...] = (
    rule(r"gpt_neox\.embed_in\.weight", "gpt_neox/embed_in/embedding"),
    rule(_L + r"(input_layernorm|post_attention_layernorm)\.(weight|bias)", r"gpt_neox/layers_\1/\2/\3"),
    rule(_L + r"attention\.(query_key_value|dense)\.weight", r"gpt_neox/layers_\1/attention/\2/kernel",
         transform=transpose),
    rule(_L + r"attention\.(query_key_value|dense)\.bias", r"gpt_neox/layers_\1/attention/\2/bias"),
    rule(_L + r"mlp\.(dense_h_to_4h|dense_4h_to_h)\.weight", r"gpt_neox/layers_\1/mlp/\2/kernel", transform=transpose),
    rule(_L + r"mlp\.(dense_h_to_4h|dense_4h_to_h)\.bias", r"gpt_neox/layers_\1/mlp/\2/bias"),
    rule(r"gpt_neox\.final_layer_norm\.(weight|bias)", r"gpt_neox/final_layer_norm/\1"),
    # Hub checkpoints name the head embed_out; transformers 5 saves it as lm_head.
    rule(r"(?:embed_out|lm_head)\.weight", "lm_head/kernel", transform=transpose),
    rule(_L + r"attention\.(bias|masked_bias|rotary_emb\.inv_freq)"),  # buffers in old checkpoints
)
GPTNeoXForCausalLM.hf_weight_table = GPT_NEOX_WEIGHT_TABLE

GPT_NEOX_SHARDING_TABLE = megatron_table(
    embedding="gpt_neox/embed_in/embedding", layers=r"gpt_neox/layers_\d+/",
    qkv=("attention/query_key_value", neox_qkv), attn_out="attention/dense", mlp_in="mlp/dense_h_to_4h",
    mlp_out="mlp/dense_4h_to_h", lm_head="lm_head")
GPTNeoXForCausalLM.hf_sharding_table = GPT_NEOX_SHARDING_TABLE
