"""Prefix caching in the block manager and the scheduler: hash chain, hits, LRU eviction, ref
counts, sharing across requests and across recompute preemption, salts, prompt logprobs, reset.

The scheduler tests run on ``SimulatedKVRunner``, which checks at every step that each row's cached
positions hold exactly that sequence's tokens: a wrong hit, or a write into a shared cached block,
fails there.
"""

import random

import pytest

from jaxpaged.block_manager import BlockManager
from jaxpaged.prefix_cache import extend_block_keys, make_block_key
from jaxpaged.request import Sequence
from tests.helpers.sched_harness import Harness, expected_output


def _keys(tokens, block_size=4, salt=None):
    seq = Sequence(0, 0, "r", list(tokens))
    return extend_block_keys(seq, len(tokens), block_size, salt)


def test_hash_chain_names_a_block_by_its_whole_prefix():
    a = _keys(range(12))
    assert len(a) == 3 and a[0].parent == b"" and a[1].parent == a[0].hash and a[2].parent == a[1].hash
    assert a[1].token_ids == (4, 5, 6, 7)
    b = _keys([99, 1, 2, 3] + list(range(4, 12)))  # same later blocks, another first block
    assert [k.token_ids for k in b[1:]] == [k.token_ids for k in a[1:]]
    assert all(x.hash != y.hash for x, y in zip(a, b))  # the chain carries the difference
    assert _keys(range(12)) == a  # deterministic
    salted = _keys(range(12), salt="tenant-1")
    assert salted[0].extra == b"tenant-1" and salted[1].extra == b""
    assert all(x.hash != y.hash for x, y in zip(a, salted))
    assert len(_keys(range(11))) == 2  # a partial block has no key


def test_lookup_checks_tokens_not_only_the_hash():
    bm = BlockManager(8, 0, 4, watermark=0.0, enable_caching=True)
    keys = _keys(range(8))
    bm.allocate(1, 8)
    assert bm.cache_blocks(1, keys, 8) == 2
    assert bm.find_cached_blocks(keys) == [0, 1]
    forged = make_block_key(b"", (0, 1, 2, 3))._replace(token_ids=(0, 1, 2, 4))  # same hash, other tokens
    assert bm.find_cached_blocks([forged]) == []
    assert bm.find_cached_blocks([keys[1]]) == [1]  # found by its own key (the chain is the caller's)
    off = BlockManager(8, 0, 4, watermark=0.0)
    off.allocate(1, 8)
    assert off.cache_blocks(1, keys, 8) == 0 and off.find_cached_blocks(keys) == []


def test_cached_blocks_wait_in_the_free_queue_and_are_evicted_lru():
    bm = BlockManager(6, 0, 4, watermark=0.0, enable_caching=True)
    keys = _keys(range(12))
    assert bm.allocate(1, 12) == [0, 1, 2]
    bm.cache_blocks(1, keys, 12)
    bm.free(1)
    # Freed tail first, still cached: the head of the queue is the never-used blocks.
    assert bm.get_free_block_ids() == [3, 4, 5, 2, 1, 0]
    assert bm.get_num_cached_blocks() == 3 and bm.get_num_free_blocks() == 6
    hits = bm.find_cached_blocks(keys[:2])
    assert hits == [0, 1]
    assert bm.can_allocate(12, hits) and bm._num_blocks_to_allocate(12, hits) == 3  # 2 taken back + 1 fresh
    assert bm.allocate(2, 12, cached_blocks=hits) == [0, 1, 3]
    assert bm.get_ref_count(0) == bm.get_ref_count(1) == 1
    assert bm.get_free_block_ids() == [4, 5, 2]
    # Taking the free blocks evicts block 2's cached contents when it reaches the head.
    assert bm.allocate(3, 12) == [4, 5, 2]
    assert not bm.is_cached(2) and bm.find_cached_blocks(keys) == [0, 1]
    assert bm.get_num_used_blocks() == 6 and bm.get_num_logical_blocks() == 6
    bm.fork(2, 4)  # a shared table counts once per table
    assert bm.get_num_logical_blocks() == 9 and bm.get_num_used_blocks() == 6
    assert bm.reset_prefix_cache() == 2 and bm.find_cached_blocks(keys) == []
    assert bm.get_block_table(2) == [0, 1, 3]  # tables in use keep their blocks


def test_second_request_reuses_the_first_ones_prompt():
    h = Harness(num_blocks=12, max_num_batched_tokens=32, enable_caching=True)
    prompt = list(range(100, 112))  # three full blocks
    a = h.add("a", prompt, max_tokens=3)
    h.run()
    b = h.add("b", prompt + [7, 8], max_tokens=3)
    out = h.step()
    row = out.scheduled[0]
    # All three blocks hit: 12 of the 14 tokens are cached; the last two are computed.
    assert row.num_computed_tokens == 12 and len(row.token_ids) == 2
    assert b.num_cached_tokens == 12
    assert h.sched.get_stats().prefix_cache_hits == 12
    c = h.add("c", prompt, max_tokens=3)
    out = h.step()
    row = next(r for r in out.scheduled if r.seq_id == c.seqs[0].seq_id)
    assert row.num_computed_tokens == 8 and len(row.token_ids) == 4  # the last token is always computed
    assert row.block_table[:2] == h.bm.get_block_table(b.seqs[0].seq_id)[:2]
    assert h.bm.get_ref_count(row.block_table[0]) == 2
    h.run()
    for r in (a, b, c):
        assert r.seqs[0].output_token_ids == expected_output(r.seqs[0], 3)
    stats = h.sched.get_stats()
    assert stats.prefix_cache_queries == 12 + 14 + 12 and stats.prefix_cache_hits == 12 + 8
    assert a.num_cached_tokens == 0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_blocks_filled_while_decoding_are_cached_for_later_prompts(async_scheduling):
    # Decode steps offer a block to the cache only once it fills (most steps have nothing to hash):
    # the blocks a's decoding filled must be hits for a prompt that continues a's whole text.
    h = Harness(num_blocks=16, max_num_batched_tokens=32, enable_caching=True, async_scheduling=async_scheduling)
    a = h.add("a", list(range(100, 106)), max_tokens=10, ignore_eos=True)  # 16 tokens
    h.run()
    text = a.seqs[0].get_token_ids()
    assert len(text) == 16
    b = h.add("b", text + [7], max_tokens=2, ignore_eos=True)
    h.run()
    # a's last token was sampled, never computed: its KV covers 15 tokens, three full blocks. Block
    # 0 filled during the prefill, block 1 (two prompt tokens, two outputs) and 2 while decoding.
    assert b.num_cached_tokens == 12
    assert b.seqs[0].output_token_ids == expected_output(b.seqs[0], 2)


def test_chunked_prefill_resumes_inside_a_cached_prefix():
    h = Harness(num_blocks=20, max_num_batched_tokens=6, max_num_seqs=4, enable_caching=True)
    prompt = list(range(200, 230))  # 30 tokens, 7 full blocks
    h.add("a", prompt[:16], max_tokens=2)
    h.run()
    b = h.add("b", prompt, max_tokens=2)
    rows = [h.step().scheduled[0] for _ in range(3)]
    assert [(r.num_computed_tokens, len(r.token_ids)) for r in rows] == [(16, 6), (22, 6), (28, 2)]
    h.run()
    assert b.seqs[0].output_token_ids == expected_output(b.seqs[0], 2)


def test_prompt_logprobs_requests_compute_their_whole_prompt_and_still_share_it():
    h = Harness(num_blocks=20, max_num_batched_tokens=32, enable_caching=True)
    prompt = list(range(300, 316))
    h.add("a", prompt, max_tokens=2)
    h.run()
    b = h.add("b", prompt, max_tokens=2, prompt_logprobs=1)
    row = h.step().scheduled[0]
    assert (row.num_computed_tokens, len(row.token_ids), row.want_prompt_logprobs) == (0, 16, True)
    assert b.num_cached_tokens == 0
    h.run()


def test_cache_salt_keeps_requests_apart():
    h = Harness(num_blocks=20, max_num_batched_tokens=32, enable_caching=True)
    prompt = list(range(400, 412))
    h.add("a", prompt, cache_salt="alice", max_tokens=2)
    h.run()
    for rid, salt, cached in (("b", "bob", 0), ("c", None, 0), ("d", "alice", 8)):
        h.add(rid, prompt, cache_salt=salt, max_tokens=2)
        row = h.step().scheduled[0]
        assert row.num_computed_tokens == cached, rid
        h.run()


def test_n_samples_keep_sharing_their_prompt_across_recompute_preemption():
    """n=3 on a 16-token prompt: after a recompute preemption the three sequences recompute
    separately, but the prompt's blocks come from the cache, so they share them again."""
    h = Harness(num_blocks=19, max_num_batched_tokens=32, enable_caching=True)
    b = h.add("b", list(range(600, 630)), max_tokens=10)  # 10 blocks at the end
    h.step()
    prompt = list(range(500, 516))  # four full blocks
    a = h.add("a", prompt, n=3, max_tokens=8)  # 4 shared + 3 x 2 blocks: a (newest) is preempted
    preempted = False
    while not preempted:
        preempted = a.seqs[0].seq_id in h.step().preempted_seq_ids
    hits_before = h.sched.get_stats().prefix_cache_hits
    while not h.bm.has_device_blocks(a.seqs[2].seq_id):
        h.step()
    tables = [h.bm.get_block_table(s.seq_id) for s in a.seqs]
    assert tables[0][:4] == tables[1][:4] == tables[2][:4]  # the prompt's blocks: shared again
    assert all(h.bm.get_ref_count(blk) == 3 for blk in tables[0][:4])
    assert h.sched.get_stats().prefix_cache_hits - hits_before >= 3 * 16
    h.run()
    for s in a.seqs:
        assert s.output_token_ids == expected_output(s, 8)
    assert b.seqs[0].output_token_ids == expected_output(b.seqs[0], 10)


def _shared_prefix_workload(h, rng, num_requests, start=0):
    systems = [[rng.randrange(3, 900) for _ in range(rng.choice([4, 8, 9]))] for _ in range(2)]
    reqs = []
    for i in range(start, start + num_requests):
        n = 2 if i % 4 == 1 else 1
        prompt = rng.choice(systems) + [rng.randrange(3, 900) for _ in range(rng.randint(1, 6))]
        max_tokens = rng.randint(3, (36 if n == 1 else 22) - len(prompt))
        reqs.append(h.add(f"r{i}", prompt, n=n, max_tokens=max_tokens))
    return reqs


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_pool_with_shared_prefixes_every_request_finishes_exactly(mode, chunked, seed):
    h = Harness(num_blocks=14, num_host_blocks=10, block_size=4, max_num_seqs=6,
                max_num_batched_tokens=40 if not chunked else 10, max_model_len=40,
                preemption_mode=mode, enable_chunked_prefill=chunked, enable_caching=True)
    rng = random.Random(seed)
    reqs = _shared_prefix_workload(h, rng, 5)
    h.step()
    reqs += _shared_prefix_workload(h, rng, 5, start=5)
    h.run()
    for r in reqs:
        for s in r.seqs:
            assert s.output_token_ids == expected_output(s, r.sampling_params.max_tokens), (r, s)
    stats = h.sched.get_stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert stats.prefix_cache_hits <= stats.prefix_cache_queries
