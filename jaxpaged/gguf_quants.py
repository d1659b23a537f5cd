"""Dequantisation of GGML tensor types (the block layouts of llama.cpp's ``ggml-common.h``).

Each function takes one tensor's raw bytes (uint8, a whole number of blocks) and returns float32
values in file order. They are vectorised over blocks with NumPy: a tensor is dequantised on the
host, once, at load time, then cast to the engine's dtype and placed on the device like any
safetensors tensor. The ``gguf`` package's own ``quants.dequantize`` is the reference the tests
compare each type with, bit for bit; this module exists so the loader owns the list of types it
accepts (anything else is refused by name) and converts without an extra float32 copy per type.

Types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (blocks of 32) and the K-quants Q2_K, Q3_K,
Q4_K, Q5_K, Q6_K (super-blocks of 256) - everything llama.cpp's Q*_0/1 and Q*_K_S/M files use.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

QK = 32  # values per block of the legacy types
QK_K = 256  # values per super-block of the K-quants


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian float16 fields (the last axis holds 2 bytes each) as float32."""
    return np.ascontiguousarray(raw).view("<f2").astype(np.float32)


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    return raw.reshape(-1, block_bytes)


def _f32(raw: np.ndarray) -> np.ndarray:
    return raw.view("<f4").astype(np.float32, copy=False)


def _f16_tensor(raw: np.ndarray) -> np.ndarray:
    return raw.view("<f2").astype(np.float32)


def _bf16(raw: np.ndarray) -> np.ndarray:
    # bfloat16 is the upper half of a float32
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] 4-bit values: the low nibbles, then the high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 18)  # d: f16, qs: 16 bytes
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:]).astype(np.int8) - np.int8(8)
    return (d * q).reshape(-1)


def _q4_1(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 20)  # d, m: f16, qs: 16 bytes
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return (d * _nibbles(b[:, 4:]) + m).reshape(-1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes holding one little-endian uint32 -> [n, 32]: bit k is value k's 5th bit."""
    word = np.ascontiguousarray(qh).view("<u4")  # [n, 1]
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4


def _q5_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 22)  # d: f16, qh: 4 bytes, qs: 16 bytes
    d = _f16(b[:, :2])
    q = (_nibbles(b[:, 6:]) | _fifth_bits(b[:, 2:6])).astype(np.int8) - np.int8(16)
    return (d * q).reshape(-1)


def _q5_1(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 24)  # d, m: f16, qh: 4 bytes, qs: 16 bytes
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return (d * (_nibbles(b[:, 8:]) | _fifth_bits(b[:, 4:8])) + m).reshape(-1)


def _q8_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 34)  # d: f16, qs: 32 int8
    return (_f16(b[:, :2]) * b[:, 2:].view(np.int8)).reshape(-1)


def _q2_k(raw: np.ndarray) -> np.ndarray:
    # scales: 16 bytes (low nibble scale, high nibble min), qs: 64 bytes, d, dmin: f16
    b = _blocks(raw, 84)
    n = len(b)
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    # value (half h of 128, shift j, group g of 16, l) = 2 bits of qs[32h + 16g + l] at 2j
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    q = (qs.reshape(n, 2, 1, 32) >> shifts) & 3  # [n, half, j, 32]
    sc = scales.reshape(n, 2, 4, 2, 1)  # scale index 8h + 2j + g
    dl = d.reshape(n, 1, 1, 1, 1) * (sc & 0x0F)
    ml = dmin.reshape(n, 1, 1, 1, 1) * (sc >> 4)
    return (dl * q.reshape(n, 2, 4, 2, 16) - ml).reshape(-1)


def _q3_k(raw: np.ndarray) -> np.ndarray:
    # hmask: 32 bytes, qs: 64 bytes, scales: 12 bytes (sixteen 6-bit values), d: f16
    b = _blocks(raw, 110)
    n = len(b)
    hmask, qs, packed = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    i = np.arange(16)
    low = (packed[:, i % 8] >> (4 * (i // 8)).astype(np.uint8)) & 0x0F
    high = (packed[:, 8 + i % 4] >> (2 * (i // 4)).astype(np.uint8)) & 3
    sc = (low | (high << 4)).astype(np.int8) - np.int8(32)  # [n, 16]
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    q = ((qs.reshape(n, 2, 1, 32) >> shifts) & 3).astype(np.int8)  # [n, half, j, 32]
    # the high bit of value (h, j, l) is bit 4h + j of hmask[l]; a clear bit subtracts 4
    bits = (4 * np.arange(2, dtype=np.uint8)).reshape(1, 2, 1, 1) + np.arange(4, dtype=np.uint8).reshape(1, 1, 4, 1)
    hi = (hmask.reshape(n, 1, 1, 32) >> bits) & 1
    q = q - np.int8(4) * (1 - hi).astype(np.int8)
    dl = d.reshape(n, 1, 1, 1, 1) * sc.reshape(n, 2, 4, 2, 1)
    return (dl * q.reshape(n, 2, 4, 2, 16)).reshape(-1)


def _k4_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins (ggml's get_scale_min_k4)."""
    lo, mid, hi = packed[:, :4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=1)
    mins = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return scales, mins


def _q4_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 144)  # d, dmin: f16, scales: 12 bytes, qs: 128 bytes
    n = len(b)
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    scales, mins = _k4_scales_mins(b[:, 4:16])
    qs = b[:, 16:].reshape(n, 4, 1, 32)  # chunk j of 64 values: 32 low nibbles, then 32 high
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2)  # [n, 4, 2, 32]; scale index 2j + h
    dl = d.reshape(n, 1, 1, 1) * scales.reshape(n, 4, 2, 1)
    ml = dmin.reshape(n, 1, 1, 1) * mins.reshape(n, 4, 2, 1)
    return (dl * q - ml).reshape(-1)


def _q5_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 176)  # d, dmin: f16, scales: 12 bytes, qh: 32 bytes, qs: 128 bytes
    n = len(b)
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    scales, mins = _k4_scales_mins(b[:, 4:16])
    qh = b[:, 16:48].reshape(n, 1, 1, 32)
    qs = b[:, 48:].reshape(n, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2)  # [n, 4, 2, 32]
    bit = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)  # value (j, h) takes bit 2j + h of qh
    q = q | (((qh >> bit) & 1) << 4)
    dl = d.reshape(n, 1, 1, 1) * scales.reshape(n, 4, 2, 1)
    ml = dmin.reshape(n, 1, 1, 1) * mins.reshape(n, 4, 2, 1)
    return (dl * q - ml).reshape(-1)


def _q6_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 210)  # ql: 128 bytes, qh: 64 bytes, scales: 16 int8, d: f16
    n = len(b)
    ql = b[:, :128].reshape(n, 2, 2, 32)  # [half, which 32 of the 64 bytes, l]
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    sc = b[:, 192:208].view(np.int8).reshape(n, 2, 4, 2, 1)  # index 8*half + 2*part + l // 16
    d = _f16(b[:, 208:210])
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # parts 0..3 of each half
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    q = (low | (((qh >> shifts) & 3) << 4)).astype(np.int8) - np.int8(32)  # [n, 2, 4, 32]
    return (d.reshape(n, 1, 1, 1, 1) * sc * q.reshape(n, 2, 4, 2, 16)).reshape(-1)


# name -> (values per block, bytes per block, dequantiser); names are gguf's GGMLQuantizationType
DEQUANTIZERS: dict[str, tuple[int, int, Callable[[np.ndarray], np.ndarray]]] = {
    "F32": (1, 4, _f32),
    "F16": (1, 2, _f16_tensor),
    "BF16": (1, 2, _bf16),
    "Q4_0": (QK, 18, _q4_0),
    "Q4_1": (QK, 20, _q4_1),
    "Q5_0": (QK, 22, _q5_0),
    "Q5_1": (QK, 24, _q5_1),
    "Q8_0": (QK, 34, _q8_0),
    "Q2_K": (QK_K, 84, _q2_k),
    "Q3_K": (QK_K, 110, _q3_k),
    "Q4_K": (QK_K, 144, _q4_k),
    "Q5_K": (QK_K, 176, _q5_k),
    "Q6_K": (QK_K, 210, _q6_k),
}
SUPPORTED_TYPES = tuple(DEQUANTIZERS)


def dequantize(raw: np.ndarray, type_name: str, num_values: int) -> np.ndarray:
    """float32[num_values] from a tensor's raw bytes; ValueError naming the type if unsupported."""
    if type_name not in DEQUANTIZERS:
        raise ValueError(f"GGML tensor type {type_name} is not supported; supported: {', '.join(SUPPORTED_TYPES)}")
    block_values, block_bytes, fn = DEQUANTIZERS[type_name]
    data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if num_values % block_values or data.size != num_values // block_values * block_bytes:
        raise ValueError(f"{type_name} tensor of {num_values} values needs {num_values // block_values * block_bytes} "
                         f"bytes in blocks of {block_values}, got {data.size} bytes")
    return fn(data)
