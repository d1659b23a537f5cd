"""Paged-attention kernels (Pallas) and their pure-jnp references.

"block" is the KV-cache unit throughout (a kernel may call it a page; page == block).
"""
