"""Paged-attention kernels (Pallas) and their pure-jnp references.

"block" is the KV-cache unit throughout (a kernel may call it a page; page == block).
"""

from __future__ import annotations

import jax


def default_attention_backend(platform: str | None = None) -> str:
    """"pallas" when running on a GPU, else "reference" (the Triton kernels need a GPU).

    ``platform`` defaults to JAX's default backend ("gpu"/"cuda"/"rocm", "cpu", "tpu").
    """
    platform = platform or jax.default_backend()
    return "pallas" if platform in ("gpu", "cuda", "rocm") else "reference"
