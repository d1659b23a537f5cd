"""The attention call under tensor parallelism (models/layers.py ``paged_attention`` with a mesh):
the KV write and the attention kernels run per device through ``shard_map`` on that device's heads
and its slice of the cache, and give the unsplit call's output and cache, on the reference backend
and on the Pallas kernels (in the Pallas interpreter on CPU); with fewer KV heads than devices each
device keeps a copy of the one its query heads read. The reference backend under a mesh also runs
in every engine test of tests/tp; here it is in the ``slow`` set."""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpaged.tensor_parallel import kv_cache_sharding, make_mesh, replicated
from models.attention_metadata import pack_attention_metadata
from models.layers import paged_attention
from tests.helpers.paged_cases import rel_err

D, BS = 32, 8


def _case(rng, q_lens, ctx_lens, hq, hkv, decode_only):
    nblocks = [-(-(q + c) // BS) for q, c in zip(q_lens, ctx_lens)]
    num_blocks = sum(nblocks) + 2
    perm = rng.permutation(num_blocks).tolist()
    tables = [[perm.pop() for _ in range(n)] for n in nblocks]
    kc = rng.standard_normal((num_blocks, BS, hkv, D)).astype(np.float32)
    vc = rng.standard_normal((num_blocks, BS, hkv, D)).astype(np.float32)
    T = sum(q_lens)
    md, pos = pack_attention_metadata(q_lens, ctx_lens, tables, block_size=BS, num_tokens=T,
                                      max_blocks_per_seq=max(nblocks) + 1, decode_only=decode_only)
    q, k, v = (rng.standard_normal((T, h, D)).astype(np.float32) for h in (hq, hkv, hkv))
    return q, k, v, kc, vc, md, pos


@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.slow), "pallas"])
@pytest.mark.parametrize("step", ["mixed", "decode"])
@pytest.mark.parametrize("tp,hq,hkv,alibi", [(2, 4, 4, False), (4, 8, 2, True), (4, 8, 1, False)],
                         ids=["mha-tp2", "gqa-replicated-tp4-alibi", "mqa-tp4"])
def test_sharded_attention_matches_unsplit(backend, step, tp, hq, hkv, alibi):
    rng = np.random.default_rng(zlib.crc32(f"{backend}{step}{tp}{hq}{hkv}".encode()))
    decode_only = step == "decode"
    q_lens, ctx = ([1, 1, 1], [9, 30, 0]) if decode_only else ([11, 1, 6, 1], [0, 21, 13, 4])
    q, k, v, kc, vc, md, pos = _case(rng, q_lens, ctx, hq, hkv, decode_only)
    slopes = jnp.asarray(rng.uniform(0.05, 1.0, hq), jnp.float32) if alibi else None
    kw = dict(scale=D**-0.5, alibi_slopes=slopes, interpret=backend == "pallas")
    md_ref = dataclasses.replace(jax.tree.map(jnp.asarray, md), attention_backend="reference")
    want, (want_k, want_v) = jax.jit(lambda *a: paged_attention(*a, **kw))(q, k, v, (kc, vc), pos, md_ref)

    mesh = make_mesh(tp)
    copies = tp // hkv if hkv < tp else 1  # the pool holds one copy of a KV head per device
    sh = kv_cache_sharding(mesh)
    cache = tuple(jax.device_put(np.repeat(c, copies, axis=2), sh) for c in (kc, vc))
    md_tp = dataclasses.replace(md, attention_backend=backend, mesh=mesh)
    fn = jax.jit(lambda *a: paged_attention(*a, **kw), out_shardings=(replicated(mesh), (sh, sh)))
    got, (got_k, got_v) = fn(q, k, v, cache, pos, md_tp)
    assert rel_err(got, want) < 1e-5
    for got_c, want_c in ((got_k, want_k), (got_v, want_v)):
        got_c = np.asarray(got_c)
        assert got_c.shape[2] == hkv * copies
        for c in range(copies):  # every copy holds the written keys/values
            np.testing.assert_allclose(got_c[:, :, c::copies], np.asarray(want_c), rtol=0, atol=0)
