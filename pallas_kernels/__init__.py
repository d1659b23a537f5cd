"""Paged-attention kernels (Pallas) and their pure-jnp references.

"block" is the KV-cache unit throughout (a kernel may call it a page; page == block). The public
entry point is :func:`pallas_kernels.attention_router.ragged_paged_attention`; the backends and
where they run are in :mod:`pallas_kernels.backends` (importing this package loads no JAX).
"""

from __future__ import annotations

from pallas_kernels.backends import ATTENTION_BACKENDS, check_attention_backend, default_attention_backend

__all__ = ["ATTENTION_BACKENDS", "check_attention_backend", "default_attention_backend"]
