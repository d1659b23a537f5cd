"""The flash-attention inner step and KV-tile loop shared by the decode and ragged kernels.

Both kernels walk a sequence's KV tiles and keep, per query row, a running maximum ``m``, a
running denominator ``l`` and an unnormalised output ``acc`` (float32), in base 2 so that the
exponent is one ``exp2``. These functions are traced inside the Pallas kernels (Triton lowering
and interpret mode alike).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.kernel_shapes import LOG2E


def log2_logits(
    s: jnp.ndarray, *, scale: float, soft_cap: float | None, bias: Callable[[], jnp.ndarray] | None = None
) -> jnp.ndarray:
    """Raw q·k scores [M, N] -> base-2 logits: ``scale``, then the tanh soft cap, then ``bias()``
    (ALiBi), all in the natural-log domain before the change of base."""
    if soft_cap is None and bias is None:
        return s * (scale * LOG2E)
    s = s * scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    if bias is not None:
        s = s + bias()
    return s * LOG2E


def online_softmax_step(
    s: jnp.ndarray,
    v: jnp.ndarray,
    acc: jnp.ndarray,
    m_prev: jnp.ndarray,
    l_prev: jnp.ndarray,
    *,
    precision,
    keep: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Folds one KV tile into the running state.

    ``s``: masked base-2 logits [M, N] (hidden keys at the finite mask value); ``v``: the tile's
    values [N, D]; ``keep``: an optional [M, N] mask whose False entries get zero weight even when
    a row has seen no visible key yet (its maximum is then the mask value itself).
    """
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp2(m_prev - m_new)
    p = jnp.exp2(s - m_new[:, None])
    if keep is not None:
        p = jnp.where(keep, p, 0.0)
    l_new = alpha * l_prev + jnp.sum(p, axis=1)
    pv = plgpu.dot(p.astype(v.dtype), v, precision=precision)
    return acc * alpha[:, None] + pv, m_new, l_new


def tile_loop(
    lo,
    hi,
    fetch: Callable[[Any], tuple],
    fold: Callable[[Any, tuple, Any], Any],
    state: Any,
    *,
    prefetch: int = 0,
    ahead: tuple | None = None,
) -> tuple[Any, tuple]:
    """``state = fold(i, fetch(i), state)`` for KV tiles ``lo <= i < hi``; returns the final state
    and the tiles still in flight.

    With ``prefetch = d > 0`` the loads of tile ``i + d`` are issued before tile ``i``'s math and
    the fetched tiles ride in the loop carry (register prefetch; the ragged kernel's option, off by
    default: it measured slower than Triton's own pipelining). ``ahead`` continues from an earlier
    loop's tiles in flight; by default tiles ``lo .. lo + d - 1`` are fetched first. ``fetch`` must
    mask what lies past the sequence's keys, since the last ``d`` fetches run past ``hi``.
    """
    if not prefetch:
        return jax.lax.fori_loop(lo, hi, lambda i, st: fold(i, fetch(i), st), state), ()

    def body(i, carry):
        st, tiles = carry
        nxt = fetch(i + prefetch)
        return fold(i, tiles[0], st), (*tiles[1:], nxt)

    if ahead is None:
        ahead = tuple(fetch(lo + j) for j in range(prefetch))
    return jax.lax.fori_loop(lo, hi, body, (state, ahead))
