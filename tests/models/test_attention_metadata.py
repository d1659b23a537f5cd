"""The one packer of a step's attention metadata (models/attention_metadata.py), against a plain
per-row loop written here, and the runner's use of it."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest

from jaxpaged.buckets import Bucket
from jaxpaged.model_runner import ModelRunner
from jaxpaged.scheduler_output import ScheduledSequence
from models.attention_metadata import AttentionMetadata, pack_attention_metadata


def loop_pack(query_lens, context_lens, block_tables, block_size, T, S, MB):
    """The packing written row by row: the definition the vectorised packer must meet."""
    positions = np.zeros(T, np.int32)
    slots = np.full(T, -1, np.int32)
    qsl = np.zeros(S + 1, np.int32)
    seq_lens = np.zeros(S, np.int32)
    tables = np.zeros((S, MB), np.int32)
    logits = np.zeros(S, np.int32)
    off = 0
    for s, (q, c, bt) in enumerate(zip(query_lens, context_lens, block_tables)):
        for i in range(q):
            p = c + i
            positions[off + i] = p
            slots[off + i] = bt[p // block_size] * block_size + p % block_size
        tables[s, : len(bt)] = bt
        seq_lens[s] = c + q
        logits[s] = off + q - 1 if q else 0
        off += q
        qsl[s + 1] = off
    qsl[len(query_lens) + 1 :] = off
    return dict(positions=positions, slot_mapping=slots, query_start_loc=qsl, seq_lens=seq_lens,
                block_tables=tables, logits_indices=logits)


def random_rows(rng, n, block_size, spare_blocks=0):
    q = [int(x) for x in rng.integers(0, 20, n)]
    c = [int(x) for x in rng.integers(0, 50, n)]
    free = list(rng.permutation(1000))
    tables = []
    for qi, ci in zip(q, c):
        need = -(-(qi + ci) // block_size) + int(rng.integers(0, spare_blocks + 1))
        tables.append([int(free.pop()) for _ in range(need)])
    return q, c, tables


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_packer_matches_the_row_loop(seed, block_size):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    q, c, tables = random_rows(rng, n, block_size, spare_blocks=2)
    T, S = sum(q) + int(rng.integers(0, 9)), n + int(rng.integers(0, 4))
    MB = max(1, max(len(t) for t in tables)) + int(rng.integers(0, 3))
    md, positions = pack_attention_metadata(q, c, tables, block_size=block_size, num_tokens=T, num_seqs=S,
                                            max_blocks_per_seq=MB, decode_only=False, attention_backend="pallas")
    want = loop_pack(q, c, tables, block_size, T, S, MB)
    np.testing.assert_array_equal(positions, want.pop("positions"))
    for name, value in want.items():
        got = getattr(md, name)
        assert got.dtype == np.int32 and got.shape == value.shape, name
        np.testing.assert_array_equal(got, value, err_msg=name)
    assert md.num_tokens == T and md.num_seqs == S
    assert (md.decode_only, md.attention_backend) == (False, "pallas")


def test_packer_defaults_to_the_smallest_shape_and_handles_no_rows():
    md, pos = pack_attention_metadata([3, 1], [0, 5], [[7], [2, 9]], block_size=4)
    assert (md.num_tokens, md.num_seqs, md.block_tables.shape) == (4, 2, (2, 2))
    np.testing.assert_array_equal(pos, [0, 1, 2, 5])
    np.testing.assert_array_equal(md.slot_mapping, [28, 29, 30, 37])  # block 7 * 4 + 0..2; block 9 * 4 + 1
    np.testing.assert_array_equal(md.logits_indices, [2, 3])
    md, pos = pack_attention_metadata([], [], [], block_size=16, num_tokens=8, num_seqs=4, max_blocks_per_seq=3)
    np.testing.assert_array_equal(md.slot_mapping, -1)
    np.testing.assert_array_equal(md.query_start_loc, 0)
    np.testing.assert_array_equal(md.seq_lens, 0)
    assert md.block_tables.shape == (4, 3) and pos.shape == (8,)


def test_packer_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="bucket too small: tokens 5 > 4"):
        pack_attention_metadata([5], [0], [[0, 1]], block_size=4, num_tokens=4)
    with pytest.raises(ValueError, match="bucket too small: tokens 2 > 4 or seqs 2 > 1"):
        pack_attention_metadata([1, 1], [0, 0], [[0], [1]], block_size=4, num_tokens=4, num_seqs=1)
    with pytest.raises(ValueError, match="sequence 1 has 3 blocks > max_blocks_per_seq 2"):
        pack_attention_metadata([1, 1], [0, 8], [[0], [1, 2, 3]], block_size=4, max_blocks_per_seq=2)
    with pytest.raises(ValueError, match="sequence 0: 1 blocks of 4 do not hold context 3 \\+ query 2 tokens"):
        pack_attention_metadata([2], [3], [[0]], block_size=4)


def test_metadata_is_a_pytree_whose_static_fields_pick_the_program():
    md, _ = pack_attention_metadata([1, 1], [3, 4], [[0], [1, 2]], block_size=4, decode_only=True,
                                    attention_backend="pallas")
    leaves, treedef = jax.tree.flatten(md)
    assert len(leaves) == 5
    other = jax.tree.unflatten(treedef, leaves)
    assert isinstance(other, AttentionMetadata) and other.decode_only and other.attention_backend == "pallas"
    plain = pack_attention_metadata([1, 1], [3, 4], [[0], [1, 2]], block_size=4)[0]
    assert jax.tree.structure(plain) != treedef  # another static field, another compiled program


def test_runner_packs_token_ids_beside_the_metadata():
    """``ModelRunner._pack_arrays``: the scheduled rows' token ids padded to the bucket, and the
    packer's metadata with the bucket's shape, decode flag and the model's backend."""
    runner = types.SimpleNamespace(block_size=4, max_blocks_per_seq=5,
                                   lm=types.SimpleNamespace(attention_backend="pallas", mesh=None))
    rows = [ScheduledSequence(seq_id=3, token_ids=[11, 12, 13], num_computed_tokens=0, block_table=[4],
                              sample_seq_ids=[3], want_prompt_logprobs=False),
            ScheduledSequence(seq_id=8, token_ids=[-1], num_computed_tokens=6, block_table=[9, 2],
                              sample_seq_ids=[8], want_prompt_logprobs=False)]
    ids, md, positions = ModelRunner._pack_arrays(runner, rows, Bucket(8, 4))
    np.testing.assert_array_equal(ids, [11, 12, 13, -1, 0, 0, 0, 0])
    want = loop_pack([3, 1], [0, 6], [[4], [9, 2]], 4, 8, 4, 5)
    np.testing.assert_array_equal(positions, want.pop("positions"))
    for name, value in want.items():
        np.testing.assert_array_equal(getattr(md, name), value, err_msg=name)
    assert (md.decode_only, md.attention_backend) == (False, "pallas")
    _, md, _ = ModelRunner._pack_arrays(runner, rows[1:], Bucket(4, 4, True))
    assert md.decode_only
