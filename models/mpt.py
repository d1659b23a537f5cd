"""MPT port: ``MptForCausalLM`` (mosaicml/mpt-7b, mpt-7b-instruct/chat/storywriter, mpt-30b).

ALiBi with MPT's own slopes (``attn_config.alibi_bias_max``), a packed ``Wqkv`` laid out
``[q | k | v]``, optional clamping of the packed projection (``attn_config.clip_qkv``), LayerNorms
and linears without biases unless ``no_bias`` is false, a GELU MLP of ``expansion_ratio * d_model``
and a head tied to ``wte``. Config keys are read as MosaicML's ``config.json`` writes them (HF's
``MptConfig`` uses the same ones, with ``attn_config`` as a nested object).

Where HF's port and MosaicML's published code differ, this follows MosaicML's (the checkpoints were
trained with it): ``no_bias=false`` adds biases, ``alibi_bias_max`` and ``expansion_ratio`` are
honoured (HF hard-codes 8 and 4), and ``logit_scale`` multiplies the logits.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from models.attention_metadata import AttentionMetadata
from models.config_utils import PortConfig, common_fields, divisible_head_dim
from models.layers import DenseMLP, KVCache, LayerNorm, dense, lm_logits, paged_attention, run_layers
from models.sharding import Packed, ShardRule, megatron_table, tensor_parallel_size
from models.weight_table import WeightRule, rule, transpose


def mpt_alibi_slopes(num_heads: int, alibi_bias_max: float = 8.0) -> jnp.ndarray:
    """MPT's ALiBi slopes (``gen_slopes``): 2^-(i * max / n_pow2), odd-then-even interleave."""
    n_pow2 = 2 ** math.ceil(math.log2(num_heads))
    slopes = [1.0 / 2 ** ((i + 1) * alibi_bias_max / n_pow2) for i in range(n_pow2)]
    if n_pow2 != num_heads:
        slopes = (slopes[1::2] + slopes[::2])[:num_heads]
    return jnp.asarray(slopes, dtype=jnp.float32)


@dataclasses.dataclass(frozen=True)
class MptConfig(PortConfig):
    """The subset of an MPT ``config.json`` the port uses (``attn_config`` flattened)."""

    vocab_size: int
    hidden_size: int  # d_model
    num_hidden_layers: int  # n_layers
    num_attention_heads: int  # n_heads
    expansion_ratio: int = 4
    max_position_embeddings: int = 2048  # max_seq_len
    layer_norm_epsilon: float = 1e-5
    no_bias: bool = True
    clip_qkv: float | None = None
    softmax_scale: float | None = None
    alibi_bias_max: float = 8.0
    logit_scale: float | None = None
    tie_word_embeddings: bool = True

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "MptConfig":
        attn = dict(hf.get("attn_config") or {})
        attn_type = attn.get("attn_type", "multihead_attention")
        if attn_type != "multihead_attention":
            raise ValueError(f"attn_config.attn_type={attn_type!r} is not supported; allowed: multihead_attention")
        for flag in ("qk_ln", "prefix_lm", "attn_uses_sequence_id"):
            if attn.get(flag):
                raise ValueError(f"attn_config.{flag}=true is not supported; allowed: false")
        if not attn.get("alibi", True):
            raise ValueError("attn_config.alibi=false (learned position embeddings) is not supported; allowed: true")
        d_model = hf.get("d_model", hf.get("hidden_size"))
        n_heads = hf.get("n_heads", hf.get("num_attention_heads"))
        divisible_head_dim(d_model, n_heads, "d_model", "n_heads")
        logit_scale = hf.get("logit_scale")
        if logit_scale == "inv_sqrt_d_model":
            logit_scale = 1.0 / math.sqrt(d_model)
        elif isinstance(logit_scale, str):
            raise ValueError(f"logit_scale={logit_scale!r} is not supported; allowed: a number, null, 'inv_sqrt_d_model'")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=d_model,
            num_hidden_layers=hf.get("n_layers", hf.get("num_hidden_layers")),
            num_attention_heads=n_heads,
            expansion_ratio=hf.get("expansion_ratio", 4),
            max_position_embeddings=hf.get("max_seq_len", 2048),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            no_bias=bool(hf.get("no_bias", True)),
            clip_qkv=attn.get("clip_qkv"),
            softmax_scale=attn.get("softmax_scale"),
            alibi_bias_max=float(attn.get("alibi_bias_max", 8)),
            logit_scale=None if logit_scale is None else float(logit_scale),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            **common_fields(hf),
        )


def mpt_qkv(config: MptConfig) -> Packed:
    """``Wqkv``'s ``[q | k | v]`` layout."""
    return Packed.qkv(config.num_attention_heads, config.num_attention_heads, config.head_dim)


class MptAttention(nn.Module):
    config: MptConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache: KVCache, metadata: AttentionMetadata, slopes):
        c = self.config
        T, tp = x.shape[0], tensor_parallel_size(c)
        packed = mpt_qkv(c)
        qkv = dense(packed.width(tp), not c.no_bias, self.dtype, "Wqkv")(x)
        if c.clip_qkv:
            qkv = jnp.clip(qkv, -c.clip_qkv, c.clip_qkv)
        q, k, v = packed.split(qkv, tp)
        scale = c.softmax_scale if c.softmax_scale is not None else c.head_dim**-0.5
        out, kv_cache = paged_attention(q, k, v, kv_cache, positions, metadata, scale=scale, alibi_slopes=slopes)
        return dense(c.hidden_size, not c.no_bias, self.dtype, "out_proj")(out.reshape(T, -1)), kv_cache


class MptBlock(nn.Module):
    config: MptConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, kv_cache, metadata, slopes):
        c = self.config
        ln = lambda name: LayerNorm(c.hidden_size, c.layer_norm_epsilon, self.dtype, use_bias=not c.no_bias, name=name)
        h, kv_cache = MptAttention(c, self.dtype, name="attn")(ln("norm_1")(x), positions, kv_cache, metadata, slopes)
        x = x + h
        mlp = DenseMLP(
            c.expansion_ratio * c.hidden_size, c.hidden_size, "gelu", not c.no_bias,
            "up_proj", "down_proj", self.dtype, name="ffn",
        )
        return x + mlp(ln("norm_2")(x)), kv_cache


class MptModel(nn.Module):
    config: MptConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.wte = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        self.blocks = [MptBlock(c, self.dtype, name=f"blocks_{i}")
                       for i in range(c.num_hidden_layers)]
        self.norm_f = LayerNorm(c.hidden_size, c.layer_norm_epsilon, self.dtype, use_bias=not c.no_bias)

    def __call__(self, input_ids, positions, kv_caches: Sequence[KVCache], metadata: AttentionMetadata):
        c = self.config
        x = self.wte(input_ids)
        slopes = mpt_alibi_slopes(c.num_attention_heads, c.alibi_bias_max)
        x, new_caches = run_layers(self.blocks, x, positions, kv_caches, metadata, slopes)
        return self.norm_f(x), new_caches


class MptForCausalLM(nn.Module):
    """HF / MosaicML ``MptForCausalLM`` with a paged KV cache."""

    config: MptConfig
    dtype: Any = jnp.float32

    config_class: ClassVar[type] = MptConfig
    hf_weight_table: ClassVar[Sequence[WeightRule]] = ()  # set below
    hf_sharding_table: ClassVar[Sequence[ShardRule]] = ()  # set below

    def setup(self):
        self.transformer = MptModel(self.config, self.dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = dense(self.config.vocab_size, False, self.dtype, "lm_head")

    def __call__(self, input_ids, positions, kv_caches, metadata):
        return self.transformer(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
        c = self.config
        head = None if c.tie_word_embeddings else self.lm_head
        return lm_logits(hidden, self.transformer.wte, head, tied=c.tie_word_embeddings, logit_scale=c.logit_scale)


_B = r"transformer\.blocks\.(\d+)\."
MPT_WEIGHT_TABLE: tuple[WeightRule, ...] = (
    rule(r"transformer\.wte\.weight", "transformer/wte/embedding"),
    rule(r"transformer\.norm_f\.(weight|bias)", r"transformer/norm_f/\1"),
    rule(_B + r"(norm_1|norm_2)\.(weight|bias)", r"transformer/blocks_\1/\2/\3"),
    rule(_B + r"attn\.(Wqkv|out_proj)\.weight", r"transformer/blocks_\1/attn/\2/kernel", transform=transpose),
    rule(_B + r"attn\.(Wqkv|out_proj)\.bias", r"transformer/blocks_\1/attn/\2/bias"),
    rule(_B + r"ffn\.(up_proj|down_proj)\.weight", r"transformer/blocks_\1/ffn/\2/kernel", transform=transpose),
    rule(_B + r"ffn\.(up_proj|down_proj)\.bias", r"transformer/blocks_\1/ffn/\2/bias"),
    rule(r"lm_head\.weight", "lm_head/kernel", transform=transpose),
)
MptForCausalLM.hf_weight_table = MPT_WEIGHT_TABLE

MPT_SHARDING_TABLE = megatron_table(
    embedding="transformer/wte/embedding", layers=r"transformer/blocks_\d+/", qkv=("attn/Wqkv", mpt_qkv),
    attn_out="attn/out_proj", mlp_in="ffn/up_proj", mlp_out="ffn/down_proj", lm_head="lm_head")
MptForCausalLM.hf_sharding_table = MPT_SHARDING_TABLE
