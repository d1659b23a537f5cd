"""``GPTJForCausalLM`` (GPT-J-6B, its fine-tunes, CodeGen-style GPT-J checkpoints) with a paged KV
cache.

GPT-J rotates only the first ``rotary_dim`` features of each head, GPT-J-style (adjacent pairs
``(x0, x1), (x2, x3), ...``: ``RopeConfig(interleaved=True)``), runs attention and MLP in parallel
off one LayerNorm (``x + attn(ln_1(x)) + mlp(ln_1(x))``), and has an LM head with a bias.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from models.attention_metadata import AttentionMetadata
from models.config_utils import PortConfig, common_fields, divisible_head_dim, hf_get
from models.layers import Bias, DenseMLP, KVCache, LayerNorm, dense, lm_logits, paged_attention, run_layers
from models.rotary import RopeConfig, apply_rotary, rope_cos_sin
from models.sharding import ShardRule, megatron_table
from models.weight_table import WeightRule, rule, transpose


@dataclasses.dataclass(frozen=True)
class GPTJConfig(PortConfig):
    """The subset of an HF GPT-J ``config.json`` the port uses."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    rope: RopeConfig
    max_position_embeddings: int = 2048
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return self.rope.rotary_dim

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "GPTJConfig":
        hidden = hf_get(hf, "n_embd", "hidden_size")
        heads = hf_get(hf, "n_head", "num_attention_heads")
        head_dim = divisible_head_dim(hidden, heads, "n_embd", "n_head")
        # rotary_dim=None rotates whole heads.
        rotary_dim = hf.get("rotary_dim") or head_dim
        if rotary_dim > head_dim or rotary_dim % 2:
            raise ValueError(f"rotary_dim={rotary_dim} must be even and at most the head size {head_dim}")
        max_pos = hf_get(hf, "n_positions", "max_position_embeddings", default=2048)
        return cls(
            vocab_size=hf_get(hf, "vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=hf_get(hf, "n_layer", "num_hidden_layers"),
            num_attention_heads=heads,
            intermediate_size=hf_get(hf, "n_inner", "intermediate_size", default=4 * hidden),
            # GPT-J's sinusoids are fixed at base 10000 (no rope settings in its config).
            rope=RopeConfig(rotary_dim=rotary_dim, theta=10000.0, max_position_embeddings=max_pos, interleaved=True),
            max_position_embeddings=max_pos,
            layer_norm_epsilon=hf_get(hf, "layer_norm_epsilon", default=1e-5),
            activation_function=hf_get(hf, "activation_function", default="gelu_new"),
            tie_word_embeddings=bool(hf_get(hf, "tie_word_embeddings", default=False)),
            **common_fields(hf),
        )


class GPTJAttention(nn.Module):
    config: GPTJConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache: KVCache, metadata: AttentionMetadata, cos, sin):
        c = self.config
        T, H, D = x.shape[0], c.num_attention_heads, c.head_dim
        q = dense(c.hidden_size, False, self.dtype, "q_proj")(x).reshape(T, H, D)
        k = dense(c.hidden_size, False, self.dtype, "k_proj")(x).reshape(T, H, D)
        v = dense(c.hidden_size, False, self.dtype, "v_proj")(x).reshape(T, H, D)
        q = apply_rotary(q, cos, sin, interleaved=True)
        k = apply_rotary(k, cos, sin, interleaved=True)
        out, kv_cache = paged_attention(q, k, v, kv_cache, positions, metadata, scale=D**-0.5)
        return dense(c.hidden_size, False, self.dtype, "out_proj")(out.reshape(T, -1)), kv_cache


class GPTJBlock(nn.Module):
    config: GPTJConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache, metadata, cos, sin):
        c = self.config
        h = LayerNorm(c.hidden_size, c.layer_norm_epsilon, self.dtype, name="ln_1")(x)
        attn, kv_cache = GPTJAttention(c, self.dtype, name="attn")(h, positions, kv_cache, metadata, cos, sin)
        mlp = DenseMLP(
            c.intermediate_size, c.hidden_size, c.activation_function, True, "fc_in", "fc_out", self.dtype, name="mlp",
        )
        return attn + mlp(h) + x, kv_cache


class GPTJModel(nn.Module):
    config: GPTJConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.wte = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        self.h = [GPTJBlock(c, self.dtype, name=f"h_{i}") for i in range(c.num_hidden_layers)]
        self.ln_f = LayerNorm(c.hidden_size, c.layer_norm_epsilon, self.dtype)

    def __call__(self, input_ids, positions, kv_caches: Sequence[KVCache], metadata: AttentionMetadata):
        x = self.wte(input_ids)
        cos, sin = rope_cos_sin(self.config.rope, positions)
        x, new_caches = run_layers(self.h, x, positions, kv_caches, metadata, cos, sin)
        return self.ln_f(x), new_caches


class GPTJForCausalLM(nn.Module):
    """HF ``GPTJForCausalLM`` with a paged KV cache."""

    config: GPTJConfig
    dtype: Any = jnp.float32

    config_class: ClassVar[type] = GPTJConfig
    hf_weight_table: ClassVar[Sequence[WeightRule]] = ()  # set below
    hf_sharding_table: ClassVar[Sequence[ShardRule]] = ()  # set below

    def setup(self):
        c = self.config
        self.transformer = GPTJModel(c, self.dtype)
        if c.tie_word_embeddings:
            self.lm_head = Bias(c.vocab_size, self.dtype)
        else:
            self.lm_head = dense(c.vocab_size, True, self.dtype, "lm_head")

    def __call__(self, input_ids, positions, kv_caches, metadata):
        return self.transformer(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
        return lm_logits(hidden, self.transformer.wte, self.lm_head, tied=self.config.tie_word_embeddings)


_H = r"transformer\.h\.(\d+)\."
GPTJ_WEIGHT_TABLE: tuple[WeightRule, ...] = (
    rule(r"transformer\.wte\.weight", "transformer/wte/embedding"),
    rule(_H + r"ln_1\.(weight|bias)", r"transformer/h_\1/ln_1/\2"),
    rule(_H + r"attn\.(q|k|v|out)_proj\.weight", r"transformer/h_\1/attn/\2_proj/kernel", transform=transpose),
    rule(_H + r"mlp\.(fc_in|fc_out)\.weight", r"transformer/h_\1/mlp/\2/kernel", transform=transpose),
    rule(_H + r"mlp\.(fc_in|fc_out)\.bias", r"transformer/h_\1/mlp/\2/bias"),
    rule(r"transformer\.ln_f\.(weight|bias)", r"transformer/ln_f/\1"),
    rule(r"lm_head\.weight", "lm_head/kernel", transform=transpose),
    rule(r"lm_head\.bias", "lm_head/bias"),
    rule(_H + r"attn\.(bias|masked_bias)"),  # causal-mask buffers in old checkpoints
)
GPTJForCausalLM.hf_weight_table = GPTJ_WEIGHT_TABLE

GPTJ_SHARDING_TABLE = megatron_table(
    embedding="transformer/wte/embedding", layers=r"transformer/h_\d+/", qkv="attn/(q|k|v)_proj",
    attn_out="attn/out_proj", mlp_in="mlp/fc_in", mlp_out="mlp/fc_out", lm_head="lm_head")
GPTJForCausalLM.hf_sharding_table = GPTJ_SHARDING_TABLE
