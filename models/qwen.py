"""Qwen (v1) port: ``QWenLMHeadModel`` (Qwen/Qwen-1_8B, Qwen-7B, Qwen-14B, Qwen-72B and their
-Chat models; remote code).

Names and keys as the published ``modeling_qwen.py``/``config.json``: ``transformer.wte``,
``transformer.h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.w1, mlp.w2, mlp.c_proj}``,
``transformer.ln_f``, ``lm_head``; ``kv_channels`` (head size), ``layer_norm_epsilon``,
``rotary_emb_base``, ``rotary_pct``, ``intermediate_size`` (twice the width of ``w1``/``w2``),
``seq_length``, ``no_bias`` (``c_attn`` always has a bias). The MLP is ``c_proj(w1(x) * silu(w2(x)))``.

Past ``seq_length`` Qwen's code switches on two length extrapolations, ``use_dynamic_ntk`` and
``use_logn_attn``. They are not implemented: dynamic NTK fixes its RoPE base from the length of the
prompt a sequence *started* with, which a paged engine with chunked prefill does not know. With
either flag on, ``max_position_embeddings`` is capped at ``seq_length``, the range where both are
identities and this port is exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from models.attention_metadata import AttentionMetadata
from models.config_utils import PortConfig, common_fields
from models.layers import KVCache, RMSNorm, dense, lm_logits, paged_attention, run_layers
from models.rotary import RopeConfig, apply_rotary, rope_cos_sin
from models.sharding import Packed, ShardRule, megatron_table, tensor_parallel_size
from models.weight_table import WeightRule, rule, transpose


@dataclasses.dataclass(frozen=True)
class QWenConfig(PortConfig):
    """The subset of a Qwen (v1) ``config.json`` the port uses."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int  # kv_channels
    intermediate_size: int  # as in config.json: w1 and w2 are intermediate_size // 2 wide
    rope: RopeConfig
    layer_norm_epsilon: float = 1e-6
    no_bias: bool = True
    seq_length: int = 2048
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "QWenConfig":
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("kv_channels") or hf["hidden_size"] // n_heads
        seq_length = int(hf.get("seq_length", 2048))
        max_pos = int(hf.get("max_position_embeddings", seq_length))
        if hf.get("use_dynamic_ntk", False) or hf.get("use_logn_attn", False):
            max_pos = min(max_pos, seq_length)
        rotary_dim = int(head_dim * float(hf.get("rotary_pct", 1.0)))
        rope_hf = {"rope_theta": float(hf.get("rotary_emb_base", 10000.0))}
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=n_heads,
            head_dim=head_dim,
            intermediate_size=hf["intermediate_size"],
            rope=RopeConfig.from_hf(rope_hf, rotary_dim, max_position_embeddings=max_pos),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
            no_bias=bool(hf.get("no_bias", True)),
            seq_length=seq_length,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            **common_fields(hf),
        )


def qwen_qkv(config: QWenConfig) -> Packed:
    """``c_attn``'s ``[q | k | v]`` layout."""
    return Packed.qkv(config.num_attention_heads, config.num_attention_heads, config.head_dim)


class QWenAttention(nn.Module):
    config: QWenConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache: KVCache, metadata: AttentionMetadata, cos, sin):
        c = self.config
        T, D, tp = x.shape[0], c.head_dim, tensor_parallel_size(c)
        packed = qwen_qkv(c)
        q, k, v = packed.split(dense(packed.width(tp), True, self.dtype, "c_attn")(x), tp)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out, kv_cache = paged_attention(q, k, v, kv_cache, positions, metadata, scale=D**-0.5)
        return dense(c.hidden_size, not c.no_bias, self.dtype, "c_proj")(out.reshape(T, -1)), kv_cache


class QWenMLP(nn.Module):
    config: QWenConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        width, bias = c.intermediate_size // 2, not c.no_bias
        a1 = dense(width, bias, self.dtype, "w1")(x)
        a2 = dense(width, bias, self.dtype, "w2")(x)
        return dense(c.hidden_size, bias, self.dtype, "c_proj")(a1 * nn.silu(a2))


class QWenBlock(nn.Module):
    config: QWenConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache, metadata, cos, sin):
        c = self.config
        h, kv_cache = QWenAttention(c, self.dtype, name="attn")(
            RMSNorm(c.hidden_size, c.layer_norm_epsilon, self.dtype, name="ln_1")(x),
            positions, kv_cache, metadata, cos, sin,
        )
        x = x + h
        return x + QWenMLP(c, self.dtype, name="mlp")(RMSNorm(c.hidden_size, c.layer_norm_epsilon, self.dtype,
                                                               name="ln_2")(x)), kv_cache


class QWenModel(nn.Module):
    config: QWenConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.wte = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        self.h = [QWenBlock(c, self.dtype, name=f"h_{i}") for i in range(c.num_hidden_layers)]
        self.ln_f = RMSNorm(c.hidden_size, c.layer_norm_epsilon, self.dtype)

    def __call__(self, input_ids, positions, kv_caches: Sequence[KVCache], metadata: AttentionMetadata):
        x = self.wte(input_ids)
        cos, sin = rope_cos_sin(self.config.rope, positions)
        x, new_caches = run_layers(self.h, x, positions, kv_caches, metadata, cos, sin)
        return self.ln_f(x), new_caches


class QWenLMHeadModel(nn.Module):
    """Qwen (v1)'s remote-code ``QWenLMHeadModel`` with a paged KV cache."""

    config: QWenConfig
    dtype: Any = jnp.float32

    config_class: ClassVar[type] = QWenConfig
    hf_weight_table: ClassVar[Sequence[WeightRule]] = ()  # set below
    hf_sharding_table: ClassVar[Sequence[ShardRule]] = ()  # set below

    def setup(self):
        self.transformer = QWenModel(self.config, self.dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = dense(self.config.vocab_size, False, self.dtype, "lm_head")

    def __call__(self, input_ids, positions, kv_caches, metadata):
        return self.transformer(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
        tied = self.config.tie_word_embeddings
        return lm_logits(hidden, self.transformer.wte, None if tied else self.lm_head, tied=tied)


_H = r"transformer\.h\.(\d+)\."
QWEN_WEIGHT_TABLE: tuple[WeightRule, ...] = (
    rule(r"transformer\.wte\.weight", "transformer/wte/embedding"),
    rule(r"transformer\.ln_f\.weight", "transformer/ln_f/weight"),
    rule(_H + r"(ln_1|ln_2)\.weight", r"transformer/h_\1/\2/weight"),
    rule(_H + r"attn\.(c_attn|c_proj)\.weight", r"transformer/h_\1/attn/\2/kernel", transform=transpose),
    rule(_H + r"attn\.(c_attn|c_proj)\.bias", r"transformer/h_\1/attn/\2/bias"),
    rule(_H + r"mlp\.(w1|w2|c_proj)\.weight", r"transformer/h_\1/mlp/\2/kernel", transform=transpose),
    rule(_H + r"mlp\.(w1|w2|c_proj)\.bias", r"transformer/h_\1/mlp/\2/bias"),
    rule(r"lm_head\.weight", "lm_head/kernel", transform=transpose),
    rule(r"transformer\.rotary_emb\.inv_freq"),  # buffer, recomputed here
)
QWenLMHeadModel.hf_weight_table = QWEN_WEIGHT_TABLE

QWEN_SHARDING_TABLE = megatron_table(
    embedding="transformer/wte/embedding", layers=r"transformer/h_\d+/", qkv=("attn/c_attn", qwen_qkv),
    attn_out="attn/c_proj", mlp_in="mlp/(w1|w2)", mlp_out="mlp/c_proj", lm_head="lm_head")
QWenLMHeadModel.hf_sharding_table = QWEN_SHARDING_TABLE
