"""Building blocks shared by the model ports: dense layers, norms, activations, the two-layer
MLP, the decoder-layer loop, the paged-attention call and the LM head's logits."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from models.attention_metadata import AttentionMetadata
from models.sharding import TP_AXIS
from pallas_kernels.attention_router import ragged_paged_attention
from pallas_kernels.kv_cache_write import write_kv

KVCache = tuple[jnp.ndarray, jnp.ndarray]  # (k, v), each [num_blocks, block_size, num_kv_heads, head_dim]


def dense(features: int, bias: bool, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=dtype, name=name)


class DenseMLP(nn.Module):
    """``down(act(up(x)))``: the GPT-style MLP, its two layers named as in the HF checkpoint."""

    intermediate_size: int
    hidden_size: int
    activation: str  # an HF ``hidden_act`` name
    bias: bool
    up_name: str
    down_name: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        h = dense(self.intermediate_size, self.bias, self.dtype, self.up_name)(x)
        return dense(self.hidden_size, self.bias, self.dtype, self.down_name)(get_activation(self.activation)(h))


def run_layers(layers: Sequence[nn.Module], x: jnp.ndarray, positions, kv_caches: Sequence[Any],
               metadata: AttentionMetadata, *extra) -> tuple[jnp.ndarray, list]:
    """Runs the decoder layers in order, each ``layer(x, positions, cache, metadata, *extra)``
    returning ``(x, updated cache)``; returns the last hidden states and the updated caches."""
    new_caches = []
    for layer, cache in zip(layers, kv_caches):
        x, cache = layer(x, positions, cache, metadata, *extra)
        new_caches.append(cache)
    return x, new_caches


class RMSNorm(nn.Module):
    """HF-style RMSNorm: normalise in float32, cast back, then scale by ``weight``."""

    dim: int
    eps: float = 1e-6
    dtype: Any = jnp.float32
    add_unit_offset: bool = False  # Gemma-style (1 + weight)

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        weight = self.param("weight", nn.initializers.ones, (self.dim,), self.dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        w = (1.0 + weight.astype(jnp.float32)) if self.add_unit_offset else weight
        return (w * xf.astype(self.dtype)).astype(self.dtype)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm semantics (float32 statistics), params named ``weight`` and ``bias``."""

    dim: int
    eps: float = 1e-5
    dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True  # False with use_bias=False is torch's elementwise_affine=False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.use_scale:
            weight = self.param("weight", nn.initializers.ones, (self.dim,), self.dtype)
            y = y * weight.astype(jnp.float32)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.dim,), self.dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class Bias(nn.Module):
    """A lone bias vector (param ``bias``): the bias of an LM head whose weight is tied to the
    token embedding, so the loader finds it at ``lm_head/bias``."""

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return x + self.param("bias", nn.initializers.zeros, (self.dim,), self.dtype).astype(x.dtype)


def _gelu_new(x: jnp.ndarray) -> jnp.ndarray:
    return jax.nn.gelu(x, approximate=True)


def _gelu_exact(x: jnp.ndarray) -> jnp.ndarray:
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": _gelu_exact,
    "gelu_new": _gelu_new,
    "gelu_fast": _gelu_new,
    "gelu_pytorch_tanh": _gelu_new,
    "gelu_python": _gelu_exact,
    "relu": jax.nn.relu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def get_activation(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """Looks up an HF ``hidden_act`` name; unknown names raise with the allowed list."""
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} is not supported; allowed: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


def paged_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    kv_cache: KVCache,
    positions: jnp.ndarray,
    metadata: AttentionMetadata,
    *,
    scale: float,
    sliding_window: int | None = None,
    alibi_slopes: jnp.ndarray | None = None,
    logits_soft_cap: float | None = None,
    interpret: bool = False,
) -> tuple[jnp.ndarray, KVCache]:
    """Writes this step's k, v [T, Hkv, D] into the cache, then attends q [T, Hq, D] over it.

    The step's ``metadata`` says how: its (static) ``attention_backend`` picks the kernels and
    ``decode_only`` lets a kernel backend take the decode kernel. The KV write uses the Pallas
    kernel on every kernel backend (as fast as XLA's scatter or faster, both in place on the donated
    cache; benchmarks/RESULTS.md). Returns the attention output [T, Hq, D] and the updated cache.
    ``interpret``: kernel backends run in the Pallas interpreter (how CPU tests run them).

    Tensor parallelism (``metadata.mesh``): the kernels are not partitionable, so write and
    attention run per device under ``shard_map``, each on its query heads, its KV heads and its
    slice of the cache (split along the head axis); ALiBi slopes are split with the heads. A cache
    with more heads than ``k`` holds one copy of a KV head per device (models/sharding.py): ``k``
    and ``v`` are repeated to match, which keeps each query head on its own KV head.
    """
    cache_heads = kv_cache[0].shape[2]
    if k.shape[1] != cache_heads:
        k = jnp.repeat(k, cache_heads // k.shape[1], axis=1)
        v = jnp.repeat(v, cache_heads // v.shape[1], axis=1)
    kwargs = dict(scale=scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap, interpret=interpret)
    if metadata.mesh is None:
        return _paged_attention_local(q, k, v, kv_cache, positions, metadata, alibi_slopes, **kwargs)
    heads, cache = P(None, TP_AXIS, None), P(None, None, TP_AXIS, None)
    slopes_spec = None if alibi_slopes is None else P(TP_AXIS)
    local = functools.partial(_paged_attention_local, **kwargs)
    return jax.shard_map(
        local, mesh=metadata.mesh, in_specs=(heads, heads, heads, (cache, cache), P(), P(), slopes_spec),
        out_specs=(heads, (cache, cache)), check_vma=False,
    )(q, k, v, kv_cache, positions, metadata, alibi_slopes)


def _paged_attention_local(q, k, v, kv_cache, positions, metadata, alibi_slopes, *, scale, sliding_window,
                           logits_soft_cap, interpret):
    backend = metadata.attention_backend
    write_backend = "reference" if backend == "reference" else "pallas"
    k_cache, v_cache = write_kv(kv_cache[0], kv_cache[1], k, v, metadata.slot_mapping, backend=write_backend,
                                interpret=interpret)
    out = ragged_paged_attention(
        q, k_cache, v_cache, positions, metadata.query_start_loc, metadata.seq_lens,
        metadata.block_tables, scale=scale, sliding_window=sliding_window,
        alibi_slopes=alibi_slopes, logits_soft_cap=logits_soft_cap, backend=backend,
        decode_only=metadata.decode_only, interpret=interpret,
    )
    return out, (k_cache, v_cache)


def lm_logits(
    hidden: jnp.ndarray,
    embedding: nn.Embed | None,
    lm_head: Callable[[jnp.ndarray], jnp.ndarray] | None,
    *,
    tied: bool,
    logit_scale: float | None = None,
) -> jnp.ndarray:
    """Float32 logits of the final hidden states, the ``compute_logits`` of every port.

    ``tied``: the head's weight is the token ``embedding`` (``embedding.attend``), and ``lm_head`` is
    None or the :class:`Bias` such a head adds (GPT-J, Phi). Untied: ``lm_head`` is the head.
    ``logit_scale`` multiplies the float32 logits (MPT).
    """
    if tied:
        logits = embedding.attend(hidden)
        if lm_head is not None:
            logits = lm_head(logits)
    else:
        logits = lm_head(hidden)
    logits = logits.astype(jnp.float32)
    if logit_scale is not None:
        logits = logits * logit_scale
    return logits


def alibi_slopes(num_heads: int) -> jnp.ndarray:
    """ALiBi head slopes as in BLOOM/MPT (geometric, with the non-power-of-two interleave)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        n_extra = min(closest, num_heads - closest)
        slopes += [extra_base ** (2 * i + 1) for i in range(n_extra)]
    return jnp.asarray(slopes, dtype=jnp.float32)
