"""Integer arithmetic for padded sizes, shared by the kernels and the engine (no JAX import)."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-a // b)


def next_pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum): every padded size in the engine and kernels."""
    return max(minimum, 1 << (int(n) - 1).bit_length())


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
