"""Shape rules shared by the Pallas (Triton lowering) attention kernels.

Triton tiles must have power-of-two extents and a matrix product needs every dimension >= 16, so
the kernels pad the head dimension and the GQA group to powers of two and mask the padding.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.sizes import is_pow2

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
# An fp8 KV cache: the kernels load its tiles and convert them to q's dtype in registers.
FP8_CACHE_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634
MASK_VALUE = -1e30  # finite: an all-masked row stays finite and is zeroed at the end


def load_tile_as(view, mask: jnp.ndarray, dtype) -> jnp.ndarray:
    """A masked load of a cache tile (``plgpu.load`` of the indexed ``ref.at[...]`` view) in
    ``dtype``, masked lanes zero. Triton cannot splat a fill value into an fp8 tile, so an fp8
    tile loads with its masked lanes undefined and is zeroed after the conversion."""
    if jnp.dtype(view.dtype) in FP8_CACHE_DTYPES:
        return jnp.where(mask, plgpu.load(view, mask=mask).astype(dtype), 0)
    return plgpu.load(view, mask=mask, other=0).astype(dtype)


def searchsorted_right(edges: jnp.ndarray, values: jnp.ndarray) -> jnp.ndarray:
    """``jnp.searchsorted(edges, values, side="right")`` unrolled: jnp's default method is a
    ``fori_loop``, an XLA while loop that on the GPU costs a kernel launch and a host round trip per
    step, which made the tile plans of many-sequence steps several times slower (benchmarks/RESULTS.md,
    mixed step)."""
    return jnp.searchsorted(edges, values, side="right", method="scan_unrolled")


def token_seq_ids(query_start_loc: jnp.ndarray, num_tokens: int) -> jnp.ndarray:
    """[num_tokens] index of the sequence each token belongs to, from ``query_start_loc`` [S + 1];
    tokens past ``query_start_loc[-1]`` (padding) are clamped into [0, S), for callers to mask."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    s = searchsorted_right(query_start_loc.astype(jnp.int32), t).astype(jnp.int32) - 1
    return jnp.clip(s, 0, query_start_loc.shape[0] - 2)


def validate_kernel_inputs(q: jnp.ndarray, k_cache: jnp.ndarray, v_cache: jnp.ndarray) -> None:
    """Checks what the Pallas kernels need beyond the common rank/shape checks."""
    if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype {q.dtype} is not supported by the pallas kernels; allowed: bfloat16, float16, float32")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES + FP8_CACHE_DTYPES:
            raise ValueError(
                f"{name} dtype {x.dtype} is not supported by the pallas kernels; allowed: "
                "bfloat16, float16, float32, float8_e4m3fn, float8_e5m2"
            )
    if k_cache.dtype != v_cache.dtype or (k_cache.dtype != q.dtype and jnp.dtype(k_cache.dtype) not in FP8_CACHE_DTYPES):
        raise ValueError(f"dtype mismatch: q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    head_dim = q.shape[-1]
    if not 16 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is out of range for the pallas kernels; allowed: 16..{MAX_HEAD_DIM}")
    block_size = k_cache.shape[1]
    if not is_pow2(block_size) or block_size > 256:
        raise ValueError(f"block_size {block_size} must be a power of two <= 256 for the pallas kernels")


MOSAIC_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def validate_mosaic_dtypes(q: jnp.ndarray, k_cache: jnp.ndarray, v_cache: jnp.ndarray) -> None:
    """The Mosaic GPU kernels' dtype checks: bf16/fp16 (wgmma operands), all three alike."""
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if jnp.dtype(x.dtype) not in MOSAIC_DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} is not supported by the mosaic kernel; allowed: bfloat16, float16")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")


def validate_decode_shapes(
    q: jnp.ndarray, k_cache: jnp.ndarray, v_cache: jnp.ndarray, seq_lens: jnp.ndarray, block_tables: jnp.ndarray,
) -> tuple[int, int, int, int, int]:
    """The decode kernels' common shape checks (ValueError naming the shapes); returns
    ``(num_seqs, num_q_heads, head_dim, block_size, num_kv_heads)``."""
    if q.ndim != 3 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q {q.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape}: expected [S, Hq, D] and equal 4-D caches")
    S, Hq, D = q.shape
    _, bs, hkv, dk = k_cache.shape
    if dk != D:
        raise ValueError(f"head_dim mismatch: q {D} vs cache {dk}")
    if Hq % hkv:
        raise ValueError(f"num_q_heads {Hq} is not a multiple of num_kv_heads {hkv}")
    if block_tables.ndim != 2 or block_tables.shape[0] != S or seq_lens.shape != (S,):
        raise ValueError(f"block_tables {block_tables.shape}, seq_lens {seq_lens.shape}: expected [{S}, max_blocks] and [{S}]")
    return S, Hq, D, bs, hkv


def pad_group_queries(q: jnp.ndarray, num_kv_heads: int, group_pad: int, head_dim_pad: int) -> jnp.ndarray:
    """[T, Hq, D] -> [T, Hkv, Gp, Dp], zero padded (no copy when nothing needs padding)."""
    T, Hq, D = q.shape
    G = Hq // num_kv_heads
    qg = q.reshape(T, num_kv_heads, G, D)
    if group_pad != G or head_dim_pad != D:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, group_pad - G), (0, head_dim_pad - D)))
    return qg


def group_slopes(alibi_slopes: jnp.ndarray, num_kv_heads: int, group_pad: int) -> jnp.ndarray:
    """[Hq] ALiBi slopes -> [Hkv, Gp] float32, zero padded."""
    G = alibi_slopes.shape[0] // num_kv_heads
    s = alibi_slopes.astype(jnp.float32).reshape(num_kv_heads, G)
    if group_pad != G:
        s = jnp.pad(s, ((0, 0), (0, group_pad - G)))
    return s


def pad_block_tables(block_tables: jnp.ndarray, num_cols: int) -> jnp.ndarray:
    """Pads the table's columns to ``num_cols`` so a tile of block ids never reads past the row;
    padded entries point at block 0 but every load from them is masked off."""
    S, MB = block_tables.shape
    bt = block_tables.astype(jnp.int32)
    if num_cols != MB:
        bt = jnp.pad(bt, ((0, 0), (0, num_cols - MB)))
    return bt
