"""Rotary position embeddings (RoPE) with the scaling variants HF configs express.

Supported ``rope_type`` values: ``default``, ``linear``, ``dynamic`` (NTK-aware), ``llama3``
and ``yarn``. Both config spellings are read: the older ``rope_theta`` + ``rope_scaling`` and
transformers 5's ``rope_parameters``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Everything needed to rotate queries and keys of one model."""

    rotary_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    max_position_embeddings: int = 2048
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    # GPT-J style rotates adjacent pairs (x0,x1),(x2,x3)...; NeoX/Llama style rotates halves.
    interleaved: bool = False

    @classmethod
    def from_hf(
        cls,
        hf: Mapping[str, Any],
        rotary_dim: int,
        *,
        default_theta: float = 10000.0,
        interleaved: bool = False,
        max_position_embeddings: int | None = None,
    ) -> "RopeConfig":
        """Reads rope settings from an HF config dict (either spelling)."""
        params = hf.get("rope_parameters") or None
        scaling = hf.get("rope_scaling") or None
        theta = hf.get("rope_theta", None)
        merged: dict[str, Any] = {}
        if isinstance(params, Mapping):
            merged.update(params)
        if isinstance(scaling, Mapping):
            merged.update(scaling)
        if theta is None:
            theta = merged.get("rope_theta", default_theta)
        rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling.rope_type={rope_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        max_pos = max_position_embeddings or hf.get("max_position_embeddings", 2048)
        return cls(
            rotary_dim=int(rotary_dim),
            theta=float(theta),
            rope_type=rope_type,
            factor=float(merged.get("factor", 1.0) or 1.0),
            max_position_embeddings=int(max_pos),
            original_max_position_embeddings=merged.get("original_max_position_embeddings"),
            low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
            high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
            beta_fast=float(merged.get("beta_fast", 32.0) or 32.0),
            beta_slow=float(merged.get("beta_slow", 1.0) or 1.0),
            mscale=merged.get("mscale"),
            mscale_all_dim=merged.get("mscale_all_dim"),
            attention_factor=merged.get("attention_factor"),
            interleaved=interleaved,
        )


def _base_inv_freq(cfg: RopeConfig, theta: float | np.ndarray = None) -> np.ndarray:
    theta = cfg.theta if theta is None else theta
    exponents = np.arange(0, cfg.rotary_dim, 2, dtype=np.float64) / cfg.rotary_dim
    return 1.0 / (theta**exponents)


def _llama3_inv_freq(cfg: RopeConfig) -> np.ndarray:
    inv_freq = _base_inv_freq(cfg)
    old_ctx = cfg.original_max_position_embeddings or 8192
    low_wavelen = old_ctx / cfg.low_freq_factor
    high_wavelen = old_ctx / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / cfg.factor, inv_freq)
    smooth = (old_ctx / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(cfg: RopeConfig) -> tuple[np.ndarray, float]:
    dim = cfg.rotary_dim
    orig = cfg.original_max_position_embeddings or cfg.max_position_embeddings
    factor = cfg.factor

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if cfg.attention_factor is not None:
        attention_factor = float(cfg.attention_factor)
    elif cfg.mscale and cfg.mscale_all_dim:
        attention_factor = get_mscale(factor, cfg.mscale) / get_mscale(factor, cfg.mscale_all_dim)
    else:
        attention_factor = get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(cfg.theta))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    pos_freqs = cfg.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    inv_extrap = 1.0 / pos_freqs
    inv_interp = 1.0 / (factor * pos_freqs)
    inv_freq = inv_interp * (1 - extrapolation_factor) + inv_extrap * extrapolation_factor
    return inv_freq, attention_factor


def rope_cos_sin(
    cfg: RopeConfig, positions: jnp.ndarray, seq_lens_per_token: jnp.ndarray | None = None
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Returns cos, sin of shape [T, rotary_dim // 2] (float32) for each token's position.

    ``seq_lens_per_token`` is only used by ``dynamic`` scaling, which (as in HF) picks its base from
    the length of the sequence in the forward pass that first computes a token's key.
    """
    pos = positions.astype(jnp.float32)
    attention_factor = 1.0
    if cfg.rope_type == "dynamic":
        if seq_lens_per_token is None:
            raise ValueError("dynamic rope scaling needs the per-token sequence length")
        max_pos = cfg.original_max_position_embeddings or cfg.max_position_embeddings
        seq_len = jnp.maximum(seq_lens_per_token.astype(jnp.float32), float(max_pos))
        base = cfg.theta * (
            (cfg.factor * seq_len / max_pos) - (cfg.factor - 1)
        ) ** (cfg.rotary_dim / (cfg.rotary_dim - 2))
        exponents = jnp.arange(0, cfg.rotary_dim, 2, dtype=jnp.float32) / cfg.rotary_dim
        inv_freq = 1.0 / (base[:, None] ** exponents[None, :])  # [T, D/2]
        freqs = pos[:, None] * inv_freq
    else:
        if cfg.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(cfg)
        elif cfg.rope_type == "yarn":
            inv_freq, attention_factor = _yarn_inv_freq(cfg)
        else:
            inv_freq = _base_inv_freq(cfg)
            if cfg.rope_type == "linear":
                inv_freq = inv_freq / cfg.factor
        freqs = pos[:, None] * jnp.asarray(inv_freq, dtype=jnp.float32)[None, :]
    return jnp.cos(freqs) * attention_factor, jnp.sin(freqs) * attention_factor


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, interleaved: bool = False) -> jnp.ndarray:
    """Rotates the first ``2 * cos.shape[-1]`` features of x [T, H, D]; the rest pass through."""
    rot = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    dtype = x.dtype
    xr = x_rot.astype(jnp.float32)
    c = cos[:, None, :]
    s = sin[:, None, :]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        out = jnp.stack([o1, o2], axis=-1).reshape(xr.shape)
    else:
        half = rot // 2
        x1, x2 = xr[..., :half], xr[..., half:]
        out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    out = out.astype(dtype)
    if x_pass.shape[-1] == 0:
        return out
    return jnp.concatenate([out, x_pass], axis=-1)
