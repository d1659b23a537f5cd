"""``PhiForCausalLM`` (Phi-1, Phi-1.5, Phi-2) with a paged KV cache.

One LayerNorm feeds attention and MLP in parallel (``x + attn(ln(x)) + mlp(ln(x))``); RoPE rotates
the first ``partial_rotary_factor * head_dim`` features (half-split style); every projection and
the LM head carry biases; ``qk_layernorm`` adds per-head LayerNorms on queries and keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from models.attention_metadata import AttentionMetadata
from models.config_utils import PortConfig, common_fields, hf_get, partial_rotary_factor
from models.layers import Bias, DenseMLP, KVCache, LayerNorm, dense, lm_logits, paged_attention, run_layers
from models.rotary import RopeConfig, apply_rotary, rope_cos_sin
from models.sharding import ShardRule, megatron_table
from models.weight_table import WeightRule, rule, transpose


@dataclasses.dataclass(frozen=True)
class PhiConfig(PortConfig):
    """The subset of an HF Phi ``config.json`` the port uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope: RopeConfig
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"
    qk_layernorm: bool = False
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "PhiConfig":
        hidden = hf_get(hf, "hidden_size")
        heads = hf_get(hf, "num_attention_heads")
        kv_heads = hf_get(hf, "num_key_value_heads", default=heads)
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads={heads} must be a multiple of num_key_value_heads={kv_heads}")
        head_dim = hf_get(hf, "head_dim", default=hidden // heads)
        factor = partial_rotary_factor(hf, default=0.5)
        return cls(
            vocab_size=hf_get(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=hf_get(hf, "intermediate_size"),
            num_hidden_layers=hf_get(hf, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rope=RopeConfig.from_hf(hf, int(head_dim * factor)),
            max_position_embeddings=hf_get(hf, "max_position_embeddings", default=2048),
            layer_norm_eps=hf_get(hf, "layer_norm_eps", default=1e-5),
            hidden_act=hf_get(hf, "hidden_act", default="gelu_new"),
            qk_layernorm=bool(hf_get(hf, "qk_layernorm", default=False)),
            tie_word_embeddings=bool(hf_get(hf, "tie_word_embeddings", default=False)),
            **common_fields(hf),
        )


class PhiAttention(nn.Module):
    config: PhiConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache: KVCache, metadata: AttentionMetadata, cos, sin):
        c = self.config
        T, D = x.shape[0], c.head_dim
        q = dense(c.num_attention_heads * D, True, self.dtype, "q_proj")(x).reshape(T, c.num_attention_heads, D)
        k = dense(c.num_key_value_heads * D, True, self.dtype, "k_proj")(x).reshape(T, c.num_key_value_heads, D)
        v = dense(c.num_key_value_heads * D, True, self.dtype, "v_proj")(x).reshape(T, c.num_key_value_heads, D)
        if c.qk_layernorm:
            q = LayerNorm(D, c.layer_norm_eps, self.dtype, name="q_layernorm")(q)
            k = LayerNorm(D, c.layer_norm_eps, self.dtype, name="k_layernorm")(k)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        out, kv_cache = paged_attention(q, k, v, kv_cache, positions, metadata, scale=D**-0.5)
        return dense(c.hidden_size, True, self.dtype, "dense")(out.reshape(T, -1)), kv_cache


class PhiDecoderLayer(nn.Module):
    config: PhiConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache, metadata, cos, sin):
        c = self.config
        h = LayerNorm(c.hidden_size, c.layer_norm_eps, self.dtype, name="input_layernorm")(x)
        attn, kv_cache = PhiAttention(c, self.dtype, name="self_attn")(h, positions, kv_cache, metadata, cos, sin)
        mlp = DenseMLP(
            c.intermediate_size, c.hidden_size, c.hidden_act, True, "fc1", "fc2", self.dtype, name="mlp",
        )
        return attn + mlp(h) + x, kv_cache


class PhiModel(nn.Module):
    config: PhiConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        self.layers = [
            PhiDecoderLayer(c, self.dtype, name=f"layers_{i}")
            for i in range(c.num_hidden_layers)
        ]
        self.final_layernorm = LayerNorm(c.hidden_size, c.layer_norm_eps, self.dtype)

    def __call__(self, input_ids, positions, kv_caches: Sequence[KVCache], metadata: AttentionMetadata):
        x = self.embed_tokens(input_ids)
        seq_lens_per_token = metadata.seq_lens[metadata.token_seq_ids()]
        cos, sin = rope_cos_sin(self.config.rope, positions, seq_lens_per_token)
        x, new_caches = run_layers(self.layers, x, positions, kv_caches, metadata, cos, sin)
        return self.final_layernorm(x), new_caches


class PhiForCausalLM(nn.Module):
    """HF ``PhiForCausalLM`` with a paged KV cache."""

    config: PhiConfig
    dtype: Any = jnp.float32

    config_class: ClassVar[type] = PhiConfig
    hf_weight_table: ClassVar[Sequence[WeightRule]] = ()  # set below
    hf_sharding_table: ClassVar[Sequence[ShardRule]] = ()  # set below

    def setup(self):
        c = self.config
        self.model = PhiModel(c, self.dtype)
        if c.tie_word_embeddings:
            self.lm_head = Bias(c.vocab_size, self.dtype)
        else:
            self.lm_head = dense(c.vocab_size, True, self.dtype, "lm_head")

    def __call__(self, input_ids, positions, kv_caches, metadata):
        return self.model(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
        return lm_logits(hidden, self.model.embed_tokens, self.lm_head, tied=self.config.tie_word_embeddings)


_L = r"model\.layers\.(\d+)\."
PHI_WEIGHT_TABLE: tuple[WeightRule, ...] = (
    rule(r"model\.embed_tokens\.weight", "model/embed_tokens/embedding"),
    rule(_L + r"self_attn\.(q_proj|k_proj|v_proj|dense)\.weight", r"model/layers_\1/self_attn/\2/kernel",
         transform=transpose),
    rule(_L + r"self_attn\.(q_proj|k_proj|v_proj|dense)\.bias", r"model/layers_\1/self_attn/\2/bias"),
    rule(_L + r"self_attn\.(q_layernorm|k_layernorm)\.(weight|bias)", r"model/layers_\1/self_attn/\2/\3"),
    rule(_L + r"mlp\.(fc1|fc2)\.weight", r"model/layers_\1/mlp/\2/kernel", transform=transpose),
    rule(_L + r"mlp\.(fc1|fc2)\.bias", r"model/layers_\1/mlp/\2/bias"),
    rule(_L + r"input_layernorm\.(weight|bias)", r"model/layers_\1/input_layernorm/\2"),
    rule(r"model\.final_layernorm\.(weight|bias)", r"model/final_layernorm/\1"),
    rule(r"lm_head\.weight", "lm_head/kernel", transform=transpose),
    rule(r"lm_head\.bias", "lm_head/bias"),
    rule(_L + r"self_attn\.rotary_emb\.inv_freq"),  # buffer in old checkpoints, recomputed here
)
PhiForCausalLM.hf_weight_table = PHI_WEIGHT_TABLE

PHI_SHARDING_TABLE = megatron_table(
    embedding="model/embed_tokens/embedding", layers=r"model/layers_\d+/", qkv="self_attn/q_proj",
    kv="self_attn/(k|v)_proj", attn_out="self_attn/dense", mlp_in="mlp/fc1", mlp_out="mlp/fc2", lm_head="lm_head")
PhiForCausalLM.hf_sharding_table = PHI_SHARDING_TABLE
