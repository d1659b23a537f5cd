"""The runner's one flat int32 step input: every part comes back unchanged, and every part starts on
a 256-byte boundary (XLA may pass a slice of it to a custom call as a view at its offset; Mosaic GPU
kernels refuse operands that are not 256-byte aligned)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.model_runner import STEP_INPUT_ALIGN, _pack_step_inputs, _step_input_offsets, _unpack_step_inputs
from models.attention_metadata import pack_attention_metadata


@pytest.mark.parametrize("q_lens,ctx,num_tokens,num_seqs", [
    ([1, 1, 1], [5, 40, 0], 16, 8),  # a decode bucket: T = 16 would put the next part 64 bytes in
    ([37, 1, 200], [0, 9, 16], 256, 8),
    ([3], [0], 2048, 256),
])
def test_flat_step_input_round_trips_aligned(q_lens, ctx, num_tokens, num_seqs):
    rng = np.random.default_rng(0)
    bs, mb = 16, 20
    tables = [rng.permutation(100)[: -(-(q + c) // bs)].tolist() for q, c in zip(q_lens, ctx)]
    md, positions = pack_attention_metadata(q_lens, ctx, tables, block_size=bs, num_tokens=num_tokens,
                                            num_seqs=num_seqs, max_blocks_per_seq=mb, attention_backend="pallas")
    ids = rng.integers(0, 1000, num_tokens).astype(np.int32)
    prev_idx = rng.integers(-1, 8, num_tokens).astype(np.int32)
    flat, layout = _pack_step_inputs(ids, positions, prev_idx, md)

    sizes, offsets, total = _step_input_offsets(num_tokens, num_seqs, mb)
    assert len(flat) == total and flat.dtype == np.int32
    assert all(at % STEP_INPUT_ALIGN == 0 for at in offsets) and STEP_INPUT_ALIGN * 4 == 256
    assert all(b - a >= n for a, b, n in zip(offsets, offsets[1:] + [total], sizes))  # no overlap

    got_ids, got_pos, got_prev, got_md = _unpack_step_inputs(jnp.asarray(flat), layout)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_pos, positions)
    np.testing.assert_array_equal(got_prev, prev_idx)
    for field in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables", "logits_indices"):
        np.testing.assert_array_equal(getattr(got_md, field), getattr(md, field), err_msg=field)
    assert (got_md.decode_only, got_md.attention_backend, got_md.mesh) == (md.decode_only, "pallas", None)
