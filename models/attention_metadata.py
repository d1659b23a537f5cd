"""The per-step description of a ragged batch that attention needs (a pytree of int32 arrays), and
the host-side packer that builds it.

A step holds ``num_seqs`` sequences; sequence ``s`` contributes the query tokens
``query_start_loc[s]:query_start_loc[s + 1]`` of the flattened token axis (a prefill chunk or one
decode token) and attends to ``seq_lens[s]`` keys/values: those already in its KV blocks plus the
ones this step writes. All arrays are padded to a bucket shape; padding sequences have zero query
tokens and ``seq_lens == 0``, padding tokens have ``slot_mapping == -1``.

Three static fields (part of the compiled program, not traced) say how attention runs the step:
``decode_only`` (every sequence has exactly one query token, so kernels may take the decode path),
``attention_backend`` (one of :data:`pallas_kernels.backends.ATTENTION_BACKENDS`) and ``mesh``
(tensor parallelism: the device mesh whose ``tp`` axis splits the heads; attention runs per device
under ``shard_map``, the arrays here are replicated). The model code reads them from here, so no
layer carries a backend or a mesh of its own.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pallas_kernels.kernel_shapes import token_seq_ids


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Block tables, slots and lengths of one step (see module docstring)."""

    slot_mapping: jnp.ndarray  # [T] flat KV slot (block * block_size + offset) each token writes; -1 = padding
    query_start_loc: jnp.ndarray  # [S + 1] cumulative query-token counts
    seq_lens: jnp.ndarray  # [S] keys each sequence attends to after this step's writes
    block_tables: jnp.ndarray  # [S, max_blocks_per_seq] physical block ids (padding entries: 0)
    logits_indices: jnp.ndarray  # [S] index into the token axis of each sequence's last token
    decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))
    attention_backend: str = dataclasses.field(default="reference", metadata=dict(static=True))
    mesh: Mesh | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    def token_seq_ids(self) -> jnp.ndarray:
        """[T] index of the sequence each token belongs to (padding tokens: clamped, masked later)."""
        return token_seq_ids(self.query_start_loc, self.num_tokens)


def pack_attention_metadata(
    query_lens: Sequence[int] | np.ndarray,
    context_lens: Sequence[int] | np.ndarray,
    block_tables: Sequence[Sequence[int]],
    *,
    block_size: int,
    num_tokens: int | None = None,
    num_seqs: int | None = None,
    max_blocks_per_seq: int | None = None,
    decode_only: bool = False,
    attention_backend: str = "reference",
    mesh: Mesh | None = None,
) -> tuple[AttentionMetadata, np.ndarray]:
    """Packs one step's rows into padded NumPy arrays; returns ``(metadata, positions [T])``.

    Row ``s`` computes ``query_lens[s]`` tokens after the ``context_lens[s]`` already cached, in the
    blocks ``block_tables[s]``. The bucket shape (``num_tokens``, ``num_seqs``,
    ``max_blocks_per_seq``) defaults to the smallest that holds the rows. Whole-batch NumPy, no
    per-row loop: the engine packs every step with it (a per-row loop cost ~8 us a row on the host).
    """
    n = len(query_lens)
    q_lens = np.asarray(query_lens, np.int64).reshape(n)
    ctx = np.asarray(context_lens, np.int64).reshape(n)
    bt_lens = np.fromiter((len(b) for b in block_tables), np.int64, len(block_tables))
    if len(ctx) != n or len(bt_lens) != n:
        raise ValueError(f"query_lens, context_lens, block_tables: {n}, {len(ctx)}, {len(bt_lens)} rows; expected equal")
    ends = np.cumsum(q_lens)
    total = int(ends[-1]) if n else 0
    T = num_tokens if num_tokens is not None else total
    S = num_seqs if num_seqs is not None else n
    MB = max_blocks_per_seq if max_blocks_per_seq is not None else max(1, int(bt_lens.max(initial=0)))
    if T < total or S < n:
        raise ValueError(f"bucket too small: tokens {total} > {T} or seqs {n} > {S}")
    if n and int(bt_lens.max()) > MB:
        s = int(np.argmax(bt_lens))
        raise ValueError(f"sequence {s} has {int(bt_lens[s])} blocks > max_blocks_per_seq {MB}")
    short = np.flatnonzero(bt_lens * block_size < ctx + q_lens)
    if short.size:
        s = int(short[0])
        raise ValueError(f"sequence {s}: {int(bt_lens[s])} blocks of {block_size} do not hold "
                         f"context {int(ctx[s])} + query {int(q_lens[s])} tokens")

    positions = np.zeros(T, np.int32)
    slots = np.full(T, -1, np.int32)
    qsl = np.zeros(S + 1, np.int32)
    seq_lens = np.zeros(S, np.int32)
    tables = np.zeros((S, MB), np.int32)
    logits_idx = np.zeros(S, np.int32)
    qsl[1 : n + 1] = ends
    qsl[n + 1 :] = total
    tok_row = np.repeat(np.arange(n), q_lens)
    pos = np.arange(total) + np.repeat(ctx - (ends - q_lens), q_lens)
    positions[:total] = pos
    flat = np.fromiter(itertools.chain.from_iterable(block_tables), np.int32, int(bt_lens.sum()))
    cols = np.arange(flat.size) - np.repeat(np.cumsum(bt_lens) - bt_lens, bt_lens)
    tables[np.repeat(np.arange(n), bt_lens), cols] = flat
    slots[:total] = tables[tok_row, pos // block_size] * block_size + pos % block_size
    seq_lens[:n] = ctx + q_lens
    logits_idx[:n] = np.where(q_lens > 0, ends - 1, 0)  # a row without query tokens has no logits
    md = AttentionMetadata(
        slot_mapping=slots, query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables,
        logits_indices=logits_idx, decode_only=decode_only, attention_backend=attention_backend, mesh=mesh,
    )
    return md, positions
