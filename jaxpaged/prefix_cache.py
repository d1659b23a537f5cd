"""Automatic prefix caching: the names of full KV blocks, and the counters of what they saved.

A full block of a sequence is named by a hash chain (vLLM v1's design): block ``i`` holds token
positions ``i * block_size ... (i + 1) * block_size - 1`` and its key is

    hash_i = sha256(hash_{i-1} || token ids of block i || extra_i),   hash_{-1} = b""

where ``extra_0`` is the request's ``cache_salt`` (UTF-8) and ``extra_i`` is empty for ``i > 0``:
the chain carries the salt onwards, so requests with different salts never share a block. Because
every hash covers the whole prefix, two sequences whose keys agree on block ``i`` hold the same
tokens at every position up to the end of that block, which is exactly when the block's keys and
values are the same. A hit is still checked token for token (``BlockKey`` keeps the parent hash,
the token ids and the extra key, and the pool compares them all), so a hash collision can cost a
miss but never a wrong block.

Only full blocks are named: a partial block is still being written and is never shared through the
cache (parallel samples and beams share their partial last block by ``fork`` instead, and copy it
on write).

Pure Python; no JAX.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass
from typing import NamedTuple, Protocol


class BlockKey(NamedTuple):
    """What names one full block: its chain hash and everything the hash was made of."""

    hash: bytes
    parent: bytes  # the previous block's hash (b"" for the first block)
    token_ids: tuple[int, ...]
    extra: bytes  # cache_salt for the first block, else b""


def make_block_key(parent: bytes, token_ids: tuple[int, ...], extra: bytes = b"") -> BlockKey:
    digest = hashlib.sha256(parent)
    digest.update(array("q", token_ids).tobytes())
    digest.update(len(extra).to_bytes(4, "little"))
    digest.update(extra)
    return BlockKey(digest.digest(), parent, token_ids, extra)


class _TokenSource(Protocol):
    block_keys: list[BlockKey]

    def get_token_ids_range(self, start: int, end: int) -> list[int]: ...


def extend_block_keys(seq: _TokenSource, num_tokens: int, block_size: int, salt: str | None = None) -> list[BlockKey]:
    """Extends ``seq.block_keys`` to name every full block among the sequence's first
    ``num_tokens`` tokens and returns it. Keys already computed are kept (a sequence only grows;
    a beam that takes over another's history takes its keys with it)."""
    keys = seq.block_keys
    for i in range(len(keys), num_tokens // block_size):
        parent = keys[-1].hash if keys else b""
        extra = salt.encode() if (i == 0 and salt) else b""
        tokens = tuple(seq.get_token_ids_range(i * block_size, (i + 1) * block_size))
        keys.append(make_block_key(parent, tokens, extra))
    return keys


@dataclass
class PrefixCacheStats:
    """Running totals, in tokens (vLLM's ``prefix_cache_queries`` / ``prefix_cache_hits``): every
    lookup a sequence makes when it is admitted or re-admitted counts its tokens as queried and its
    cached prefix as hit."""

    queries: int = 0
    hits: int = 0

    def record(self, num_queried_tokens: int, num_hit_tokens: int) -> None:
        self.queries += num_queried_tokens
        self.hits += num_hit_tokens

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
