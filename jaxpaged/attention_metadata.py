"""The per-step description of a ragged batch that attention needs (a pytree of int32 arrays).

A step holds ``num_seqs`` sequences; sequence ``s`` contributes the query tokens
``query_start_loc[s]:query_start_loc[s + 1]`` of the flattened token axis (a prefill chunk or one
decode token) and attends to ``seq_lens[s]`` keys/values: those already in its KV blocks plus the
ones this step writes. All arrays are padded to a bucket shape; padding sequences have zero query
tokens and ``seq_lens == 0``, padding tokens have ``slot_mapping == -1``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

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
    # Static (part of the compiled program, not traced): every sequence has exactly one query
    # token, so kernels may take the decode path.
    decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    def token_seq_ids(self) -> jnp.ndarray:
        """[T] index of the sequence each token belongs to (padding tokens: clamped, masked later)."""
        return token_seq_ids(self.query_start_loc, self.num_tokens)

    @staticmethod
    def build(
        *,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        num_tokens: int | None = None,
        num_seqs: int | None = None,
        max_blocks_per_seq: int | None = None,
    ) -> tuple["AttentionMetadata", np.ndarray]:
        """Builds padded metadata (and the positions array) on the host from per-sequence lists.

        ``context_lens[s]`` tokens of sequence s are already cached; this step computes the next
        ``query_lens[s]``. Returns ``(metadata, positions)`` as NumPy-backed arrays.
        """
        n_real_seqs = len(query_lens)
        total = int(sum(query_lens))
        T = num_tokens or total
        S = num_seqs or n_real_seqs
        MB = max_blocks_per_seq or max(1, max(len(b) for b in block_tables))
        if T < total or S < n_real_seqs:
            raise ValueError(f"bucket too small: tokens {total} > {T} or seqs {n_real_seqs} > {S}")
        positions = np.zeros(T, np.int32)
        slots = np.full(T, -1, np.int32)
        qsl = np.zeros(S + 1, np.int32)
        seq_lens = np.zeros(S, np.int32)
        tables = np.zeros((S, MB), np.int32)
        logits_idx = np.zeros(S, np.int32)
        off = 0
        for s, (q, c, bt) in enumerate(zip(query_lens, context_lens, block_tables)):
            if len(bt) > MB:
                raise ValueError(f"sequence {s} has {len(bt)} blocks > max_blocks_per_seq {MB}")
            pos = np.arange(c, c + q, dtype=np.int32)
            positions[off : off + q] = pos
            bt_arr = np.asarray(bt, np.int32)
            slots[off : off + q] = bt_arr[pos // block_size] * block_size + pos % block_size
            tables[s, : len(bt)] = bt_arr
            seq_lens[s] = c + q
            logits_idx[s] = off + q - 1 if q > 0 else 0
            off += q
            qsl[s + 1] = off
        qsl[n_real_seqs + 1 :] = off
        md = AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=qsl,
            seq_lens=seq_lens,
            block_tables=tables,
            logits_indices=logits_idx,
        )
        return md, positions
