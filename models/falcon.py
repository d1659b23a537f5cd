"""Falcon port: ``FalconForCausalLM`` and the pre-transformers name ``RWForCausalLM``.

One module covers every Falcon layout HF's port does:

* falcon-7b style: ``multi_query`` (one KV head), ``parallel_attn`` (attention and MLP read the
  same ``input_layernorm`` output and are summed into the residual);
* the new decoder architecture (falcon-40b/180b, falcon-11b): ``num_kv_heads`` grouped KV heads,
  packed per KV group as ``[q_0 … q_{G-1}, k, v]``, ``ln_attn`` + ``ln_mlp`` (or one
  ``input_layernorm`` when ``num_ln_in_parallel_attn`` is 1);
* sequential blocks (``parallel_attn=false``: ``input_layernorm`` → attention → residual →
  ``post_attention_layernorm`` → MLP) with BLOOM-style per-head ``[q|k|v]`` packing when
  ``multi_query`` is false;
* falcon-rw style ``alibi=true`` (no rotary). Falcon adds ALiBi before the 1/sqrt(head_dim) scaling
  and, like the published code, computes the slopes in bfloat16; ``bias`` adds biases to the linears.

``RWForCausalLM`` checkpoints (``model_type`` ``RefinedWebModel``/``RefinedWeb``) use the same tensor
names but the ``configuration_RW.py`` keys and defaults: ``n_head``, ``n_layer``, ``n_head_kv``
(default 1), ``parallel_attn`` default false, and ``RefinedWeb`` (falcon-40b) always meaning the new
decoder architecture.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from models.attention_metadata import AttentionMetadata
from models.config_utils import PortConfig, common_fields, divisible_head_dim
from models.layers import DenseMLP, KVCache, LayerNorm, alibi_slopes, dense, lm_logits, paged_attention, run_layers
from models.rotary import RopeConfig, apply_rotary, rope_cos_sin
from models.sharding import Packed, ShardRule, megatron_table, tensor_parallel_size
from models.weight_table import WeightRule, rule, transpose

_RW_MODEL_TYPES = ("RefinedWebModel", "RefinedWeb")


@dataclasses.dataclass(frozen=True)
class FalconConfig(PortConfig):
    """The subset of an HF Falcon (or RW) ``config.json`` the port uses."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope: RopeConfig
    ffn_hidden_size: int
    layer_norm_epsilon: float = 1e-5
    new_decoder_architecture: bool = False
    multi_query: bool = True
    parallel_attn: bool = True
    num_ln_in_parallel_attn: int = 1
    alibi: bool = False
    bias: bool = False
    activation: str = "gelu"
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "FalconConfig":
        rw = hf.get("model_type") in _RW_MODEL_TYPES
        hidden = hf.get("hidden_size", hf.get("n_embed"))
        n_head = hf.get("num_attention_heads", hf.get("n_head"))
        n_layer = hf.get("num_hidden_layers", hf.get("n_layer"))
        if hidden is None or n_head is None or n_layer is None:
            raise ValueError("Falcon config needs hidden_size, num_attention_heads (n_head), num_hidden_layers (n_layer)")
        head_dim = divisible_head_dim(hidden, n_head, "hidden_size", "num_attention_heads")
        new_arch = bool(hf.get("new_decoder_architecture", False)) or hf.get("model_type") == "RefinedWeb"
        multi_query = bool(hf.get("multi_query", True))
        parallel_attn = bool(hf.get("parallel_attn", not rw))
        kv = hf.get("num_kv_heads", hf.get("n_head_kv"))
        if new_arch:
            n_kv = kv if kv is not None else (1 if rw else n_head)
            parallel_attn = True  # the new decoder architecture is always parallel
        elif multi_query:
            n_kv = 1
        else:
            n_kv = n_head  # per-head [q|k|v] packing: one KV head per query head
        if n_head % n_kv:
            raise ValueError(f"num_attention_heads={n_head} must be a multiple of num_kv_heads={n_kv}")
        n_ln = hf.get("num_ln_in_parallel_attn") or (2 if new_arch else 1)
        if n_ln not in (1, 2):
            raise ValueError(f"num_ln_in_parallel_attn={n_ln} is not supported; allowed: 1, 2")
        alibi = bool(hf.get("alibi", False))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=n_kv,
            rope=RopeConfig.from_hf(hf, head_dim),
            ffn_hidden_size=hf.get("ffn_hidden_size") or 4 * hidden,
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            new_decoder_architecture=new_arch,
            multi_query=multi_query,
            parallel_attn=parallel_attn,
            num_ln_in_parallel_attn=n_ln if (new_arch and parallel_attn) else 1,
            alibi=alibi,
            bias=bool(hf.get("bias", False)),
            activation=hf.get("activation", "gelu"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            **common_fields(hf),
        )


def falcon_alibi_slopes(config: FalconConfig) -> jnp.ndarray:
    """BLOOM's slopes rounded to bfloat16 (as Falcon computes them), pre-multiplied by the
    1/sqrt(head_dim) that Falcon applies to (q·k + alibi) as a whole."""
    slopes = alibi_slopes(config.num_attention_heads).astype(jnp.bfloat16).astype(jnp.float32)
    return slopes * config.head_dim**-0.5


def falcon_qkv(config: FalconConfig) -> Packed:
    """``query_key_value``'s layout: per KV group ``[q_0 … q_{G-1}, k, v]`` in every Falcon layout
    (multi-query: one group of all heads; per-head ``[q|k|v]``: groups of one query head)."""
    return Packed.qkv(config.num_attention_heads, config.num_key_value_heads, config.head_dim, grouped=True)


class FalconAttention(nn.Module):
    config: FalconConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache: KVCache, metadata: AttentionMetadata, cos, sin):
        c = self.config
        T, D, tp = x.shape[0], c.head_dim, tensor_parallel_size(c)
        packed = falcon_qkv(c)
        qkv = dense(packed.width(tp), c.bias, self.dtype, "query_key_value")(x)
        q, k, v = packed.split(qkv, tp)
        slopes = None
        if c.alibi:
            slopes = falcon_alibi_slopes(c)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out, kv_cache = paged_attention(q, k, v, kv_cache, positions, metadata, scale=D**-0.5, alibi_slopes=slopes)
        return dense(c.hidden_size, c.bias, self.dtype, "dense")(out.reshape(T, -1)), kv_cache


class FalconDecoderLayer(nn.Module):
    config: FalconConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache, metadata, cos, sin):
        c = self.config
        ln = lambda name: LayerNorm(c.hidden_size, c.layer_norm_epsilon, self.dtype, name=name)
        attention = FalconAttention(c, self.dtype, name="self_attention")
        mlp = DenseMLP(
            c.ffn_hidden_size, c.hidden_size, c.activation, c.bias,
            "dense_h_to_4h", "dense_4h_to_h", self.dtype, name="mlp",
        )
        if not c.parallel_attn:
            h, kv_cache = attention(ln("input_layernorm")(x), positions, kv_cache, metadata, cos, sin)
            x = x + h
            return x + mlp(ln("post_attention_layernorm")(x)), kv_cache
        if c.num_ln_in_parallel_attn == 2:
            attn_in, mlp_in = ln("ln_attn")(x), ln("ln_mlp")(x)
        else:
            attn_in = mlp_in = ln("input_layernorm")(x)
        h, kv_cache = attention(attn_in, positions, kv_cache, metadata, cos, sin)
        return x + (mlp(mlp_in) + h), kv_cache


class FalconModel(nn.Module):
    config: FalconConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.word_embeddings = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        self.h = [FalconDecoderLayer(c, self.dtype, name=f"h_{i}")
                  for i in range(c.num_hidden_layers)]
        self.ln_f = LayerNorm(c.hidden_size, c.layer_norm_epsilon, self.dtype)

    def __call__(self, input_ids, positions, kv_caches: Sequence[KVCache], metadata: AttentionMetadata):
        c = self.config
        x = self.word_embeddings(input_ids)
        cos = sin = None
        if not c.alibi:
            cos, sin = rope_cos_sin(c.rope, positions, metadata.seq_lens[metadata.token_seq_ids()])
        x, new_caches = run_layers(self.h, x, positions, kv_caches, metadata, cos, sin)
        return self.ln_f(x), new_caches


class FalconForCausalLM(nn.Module):
    """HF ``FalconForCausalLM`` (and ``RWForCausalLM``) with a paged KV cache."""

    config: FalconConfig
    dtype: Any = jnp.float32

    config_class: ClassVar[type] = FalconConfig
    hf_weight_table: ClassVar[Sequence[WeightRule]] = ()  # set below
    hf_sharding_table: ClassVar[Sequence[ShardRule]] = ()  # set below

    def setup(self):
        self.transformer = FalconModel(self.config, self.dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = dense(self.config.vocab_size, False, self.dtype, "lm_head")

    def __call__(self, input_ids, positions, kv_caches, metadata):
        return self.transformer(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
        tied = self.config.tie_word_embeddings
        return lm_logits(hidden, self.transformer.word_embeddings, None if tied else self.lm_head, tied=tied)


_H = r"transformer\.h\.(\d+)\."
FALCON_WEIGHT_TABLE: tuple[WeightRule, ...] = (
    rule(r"transformer\.word_embeddings\.weight", "transformer/word_embeddings/embedding"),
    rule(r"transformer\.ln_f\.(weight|bias)", r"transformer/ln_f/\1"),
    rule(_H + r"(input_layernorm|post_attention_layernorm|ln_attn|ln_mlp)\.(weight|bias)", r"transformer/h_\1/\2/\3"),
    rule(_H + r"self_attention\.(query_key_value|dense)\.weight", r"transformer/h_\1/self_attention/\2/kernel",
         transform=transpose),
    rule(_H + r"self_attention\.(query_key_value|dense)\.bias", r"transformer/h_\1/self_attention/\2/bias"),
    rule(_H + r"mlp\.(dense_h_to_4h|dense_4h_to_h)\.weight", r"transformer/h_\1/mlp/\2/kernel", transform=transpose),
    rule(_H + r"mlp\.(dense_h_to_4h|dense_4h_to_h)\.bias", r"transformer/h_\1/mlp/\2/bias"),
    rule(r"lm_head\.weight", "lm_head/kernel", transform=transpose),
    rule(_H + r"self_attention\.(?:maybe_)?rotary(?:_emb)?\.inv_freq"),  # buffer in old checkpoints
)
FalconForCausalLM.hf_weight_table = FALCON_WEIGHT_TABLE

FALCON_SHARDING_TABLE = megatron_table(
    embedding="transformer/word_embeddings/embedding", layers=r"transformer/h_\d+/",
    qkv=("self_attention/query_key_value", falcon_qkv), attn_out="self_attention/dense",
    mlp_in="mlp/dense_h_to_4h", mlp_out="mlp/dense_4h_to_h", lm_head="lm_head")
FalconForCausalLM.hf_sharding_table = FALCON_SHARDING_TABLE
