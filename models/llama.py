"""Llama family port: ``LlamaForCausalLM`` (Llama, Llama-2/3, Vicuna, Yi, Aquila, InternLM-style
biases), reused by ``models/mistral.py`` and ``models/qwen2.py``.

The forward pass takes token ids, positions, the paged KV cache (one ``(k, v)`` pair per layer)
and :class:`~models.attention_metadata.AttentionMetadata`; it returns final hidden states and
the updated cache. ``compute_logits`` turns selected hidden states into float32 logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from models.attention_metadata import AttentionMetadata
from models.config_utils import PortConfig, common_fields
from models.layers import KVCache, RMSNorm, dense, get_activation, lm_logits, paged_attention, run_layers
from models.rotary import RopeConfig, apply_rotary, rope_cos_sin
from models.sharding import ShardRule, megatron_table
from models.weight_table import WeightRule, rule, transpose


@dataclasses.dataclass(frozen=True)
class LlamaConfig(PortConfig):
    """The subset of an HF Llama-like ``config.json`` the port uses (HF key names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope: RopeConfig
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # Per layer: the sliding-window size, or None for full attention.
    layer_sliding_windows: tuple[int | None, ...] = ()

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "LlamaConfig":
        return llama_config_from_hf(cls, hf)

    @property
    def sliding_window(self) -> int | None:
        windows = [w for w in self.layer_sliding_windows if w is not None]
        return max(windows) if windows else None


def _layer_windows(hf: Mapping[str, Any], n_layers: int, default_on: bool) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if window is None or not default_on:
        return (None,) * n_layers
    if "use_sliding_window" in hf and not hf["use_sliding_window"]:
        return (None,) * n_layers
    first_windowed = hf.get("max_window_layers", 0) if "use_sliding_window" in hf else 0
    return tuple(window if i >= first_windowed else None for i in range(n_layers))


def llama_config_from_hf(
    cls: type,
    hf: Mapping[str, Any],
    *,
    qkv_bias: bool | None = None,
    o_bias: bool | None = None,
    sliding_window_default_on: bool = True,
) -> Any:
    """Builds a Llama-like config from an HF dict, with HF's defaults for absent keys."""
    n_heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // n_heads
    n_layers = hf["num_hidden_layers"]
    attn_bias = bool(hf.get("attention_bias", hf.get("bias", False)))
    return cls(
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        rope=RopeConfig.from_hf(hf, int(head_dim * hf.get("partial_rotary_factor", 1.0))),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        hidden_act=hf.get("hidden_act", "silu"),
        qkv_bias=attn_bias if qkv_bias is None else qkv_bias,
        o_bias=attn_bias if o_bias is None else o_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        layer_sliding_windows=_layer_windows(hf, n_layers, sliding_window_default_on),
        **common_fields(hf),
    )


class LlamaAttention(nn.Module):
    config: LlamaConfig
    layer_idx: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache: KVCache, metadata: AttentionMetadata, cos, sin):
        c = self.config
        T = x.shape[0]
        q = dense(c.num_attention_heads * c.head_dim, c.qkv_bias, self.dtype, "q_proj")(x)
        k = dense(c.num_key_value_heads * c.head_dim, c.qkv_bias, self.dtype, "k_proj")(x)
        v = dense(c.num_key_value_heads * c.head_dim, c.qkv_bias, self.dtype, "v_proj")(x)
        q = apply_rotary(q.reshape(T, c.num_attention_heads, c.head_dim), cos, sin)
        k = apply_rotary(k.reshape(T, c.num_key_value_heads, c.head_dim), cos, sin)
        v = v.reshape(T, c.num_key_value_heads, c.head_dim)
        window = c.layer_sliding_windows[self.layer_idx] if c.layer_sliding_windows else None
        out, kv_cache = paged_attention(
            q, k, v, kv_cache, positions, metadata, scale=c.head_dim**-0.5,
            sliding_window=window,
        )
        out = dense(c.hidden_size, c.o_bias, self.dtype, "o_proj")(out.reshape(T, -1))
        return out, kv_cache


class LlamaMLP(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        act = get_activation(c.hidden_act)
        gate = dense(c.intermediate_size, c.mlp_bias, self.dtype, "gate_proj")(x)
        up = dense(c.intermediate_size, c.mlp_bias, self.dtype, "up_proj")(x)
        return dense(c.hidden_size, c.mlp_bias, self.dtype, "down_proj")(act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig
    layer_idx: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache, metadata, cos, sin):
        c = self.config
        h = RMSNorm(c.hidden_size, c.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        h, kv_cache = LlamaAttention(c, self.layer_idx, self.dtype, name="self_attn")(
            h, positions, kv_cache, metadata, cos, sin
        )
        x = x + h
        h = RMSNorm(c.hidden_size, c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        return x + LlamaMLP(c, self.dtype, name="mlp")(h), kv_cache


class LlamaModel(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        self.layers = [
            LlamaDecoderLayer(c, i, self.dtype, name=f"layers_{i}")
            for i in range(c.num_hidden_layers)
        ]
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, self.dtype)

    def __call__(self, input_ids, positions, kv_caches: Sequence[KVCache], metadata: AttentionMetadata):
        c = self.config
        x = self.embed_tokens(input_ids)
        seq_lens_per_token = metadata.seq_lens[metadata.token_seq_ids()]
        cos, sin = rope_cos_sin(c.rope, positions, seq_lens_per_token)
        x, new_caches = run_layers(self.layers, x, positions, kv_caches, metadata, cos, sin)
        return self.norm(x), new_caches


class LlamaForCausalLM(nn.Module):
    """HF ``LlamaForCausalLM`` with a paged KV cache."""

    config: LlamaConfig
    dtype: Any = jnp.float32

    config_class: ClassVar[type] = LlamaConfig
    hf_weight_table: ClassVar[Sequence[WeightRule]] = ()  # set below
    hf_sharding_table: ClassVar[Sequence[ShardRule]] = ()  # set below

    def setup(self):
        self.model = LlamaModel(self.config, self.dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = dense(self.config.vocab_size, False, self.dtype, "lm_head")

    def __call__(self, input_ids, positions, kv_caches, metadata):
        return self.model(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
        tied = self.config.tie_word_embeddings
        return lm_logits(hidden, self.model.embed_tokens, None if tied else self.lm_head, tied=tied)


_L = r"model\.layers\.(\d+)\."
LLAMA_WEIGHT_TABLE: tuple[WeightRule, ...] = (
    rule(r"model\.embed_tokens\.weight", "model/embed_tokens/embedding"),
    rule(_L + r"self_attn\.(q|k|v|o)_proj\.weight", r"model/layers_\1/self_attn/\2_proj/kernel", transform=transpose),
    rule(_L + r"self_attn\.(q|k|v|o)_proj\.bias", r"model/layers_\1/self_attn/\2_proj/bias"),
    rule(_L + r"mlp\.(gate|up|down)_proj\.weight", r"model/layers_\1/mlp/\2_proj/kernel", transform=transpose),
    rule(_L + r"mlp\.(gate|up|down)_proj\.bias", r"model/layers_\1/mlp/\2_proj/bias"),
    rule(_L + r"(input_layernorm|post_attention_layernorm)\.weight", r"model/layers_\1/\2/weight"),
    rule(r"model\.norm\.weight", "model/norm/weight"),
    rule(r"lm_head\.weight", "lm_head/kernel", transform=transpose),
    rule(_L + r"self_attn\.rotary_emb\.inv_freq"),  # buffer in old checkpoints, recomputed here
)
LlamaForCausalLM.hf_weight_table = LLAMA_WEIGHT_TABLE

LLAMA_SHARDING_TABLE = megatron_table(
    embedding="model/embed_tokens/embedding", layers=r"model/layers_\d+/", qkv="self_attn/q_proj",
    kv="self_attn/(k|v)_proj", attn_out="self_attn/o_proj", mlp_in="mlp/(gate|up)_proj", mlp_out="mlp/down_proj",
    lm_head="lm_head")
LlamaForCausalLM.hf_sharding_table = LLAMA_SHARDING_TABLE
