"""Scheduler: budgets, chunked prefill, preemption (recompute and swap), fork/COW, stops, abort.

The model is replaced by ``SimulatedKVRunner``, which checks every step's block tables against a
simulated KV pool, so these tests exercise the whole host side of a step as the engine will.
"""

import random

import pytest

from jaxpaged.block_manager import BlockManager
from jaxpaged.request import SequenceStatus
from jaxpaged.scheduler import Scheduler
from tests.helpers.sched_harness import EOS, Harness, expected_output


def test_chunked_prefill_then_decode_single_request():
    h = Harness(max_num_batched_tokens=8)
    req = h.add("a", list(range(100, 119)), max_tokens=3)  # 19 prompt tokens
    chunks = [h.step() for _ in range(3)]
    assert [len(o.scheduled[0].token_ids) for o in chunks] == [8, 8, 3]
    assert [o.scheduled[0].num_computed_tokens for o in chunks] == [0, 8, 16]
    assert [o.scheduled[0].sample_seq_ids for o in chunks] == [[], [], [0]]
    assert [o.scheduled[0].block_table for o in chunks] == [[0, 1], [0, 1, 2, 3], [0, 1, 2, 3, 4]]
    h.run()
    seq = req.seqs[0]
    assert seq.output_token_ids == expected_output(seq, 3)
    assert seq.finish_reason == "length" and seq.status == SequenceStatus.FINISHED_LENGTH_CAPPED
    assert seq.cumulative_logprob == pytest.approx(-0.75)
    assert len(h.outputs) == 5  # 3 prefill chunks + 2 decodes (the last token is never computed)


def test_stats_count_tokens_held_in_device_blocks():
    h = Harness(max_num_batched_tokens=8)
    h.add("a", list(range(100, 119)), max_tokens=3)  # 19 prompt tokens
    h.add("b", [5, 6, 7], max_tokens=2)
    held = []
    while h.sched.has_unfinished_requests():
        h.step()
        held.append(h.sched.get_stats().num_kv_cache_tokens)
    # a: chunks of 8, 8, 3, then two decodes; b waits for budget, then its 3 prompt tokens and one
    # decode, after which its second token finishes it: a finished sequence holds nothing.
    assert held == [8, 16, 19 + 3, 20 + 0, 0]


def test_chunked_prefill_mixes_with_decodes_and_decodes_go_first():
    h = Harness(max_num_batched_tokens=8, num_blocks=20)
    a = h.add("a", [5, 6, 7], max_tokens=12)
    h.step()  # a's prompt
    b = h.add("b", list(range(200, 230)), max_tokens=2)  # 30 prompt tokens
    mixed = [h.step() for _ in range(5)]
    for i, out in enumerate(mixed):
        rows = out.scheduled
        assert [r.seq_id for r in rows] == [a.seqs[0].seq_id, b.seqs[0].seq_id]
        assert len(rows[0].token_ids) == 1  # a's decode
        assert rows[1].num_computed_tokens == 7 * i
        assert len(rows[1].token_ids) == (7 if i < 4 else 2)  # b's chunk takes what is left
        assert out.num_batched_tokens == len(rows[1].token_ids) + 1
    assert mixed[-1].scheduled[1].sample_seq_ids == [b.seqs[0].seq_id]
    h.run()
    assert a.seqs[0].output_token_ids == expected_output(a.seqs[0], 12)
    assert b.seqs[0].output_token_ids == expected_output(b.seqs[0], 2)


def test_without_chunked_prefill_prompts_run_whole():
    h = Harness(max_num_batched_tokens=64, enable_chunked_prefill=False, num_blocks=32)
    reqs = [h.add(f"r{i}", list(range(10 + i * 20, 10 + i * 20 + 20 + i)), max_tokens=3) for i in range(4)]
    first = h.step()
    # 20 + 21 + 22 = 63 tokens fit; the 23-token prompt waits rather than being split.
    assert [len(r.token_ids) for r in first.scheduled] == [20, 21, 22]
    second = h.step()
    assert [len(r.token_ids) for r in second.scheduled] == [1, 1, 1, 23]
    h.run()
    for r in reqs:
        assert r.seqs[0].output_token_ids == expected_output(r.seqs[0], 3)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(BlockManager(8, 0, 4), 4, 16, 64, enable_chunked_prefill=False)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempts_newest_first(mode):
    h = Harness(num_blocks=6, max_num_batched_tokens=32, preemption_mode=mode)
    a, b, c = (h.add(r, [r_i * 10 + j for j in range(1, 8)], max_tokens=10) for r_i, r in enumerate("abc"))
    first = h.step()
    assert [len(r.token_ids) for r in first.scheduled] == [7, 7, 7]
    assert h.bm.get_num_free_blocks() == 0
    assert h.step().preempted_seq_ids == []  # position 7 is still in each second block
    out = h.step()  # position 8 needs a third block each: c (newest) gives way
    assert out.preempted_seq_ids == [c.seqs[0].seq_id]
    assert [r.seq_id for r in out.scheduled] == [a.seqs[0].seq_id, b.seqs[0].seq_id]
    stats = h.sched.get_stats()
    assert stats.num_preemptions == 1 and stats.num_running_reqs == 2
    if mode == "swap":
        assert len(out.blocks_to_swap_out) == 2 and stats.num_swapped_reqs == 1
        assert c.seqs[0].status == SequenceStatus.SWAPPED and c.seqs[0].num_computed_tokens == 8
    else:
        assert out.blocks_to_swap_out == [] and stats.num_waiting_reqs == 1
        assert c.seqs[0].status == SequenceStatus.WAITING and c.seqs[0].num_computed_tokens == 0
    assert c.seqs[0].output_token_ids == expected_output(c.seqs[0], 2)  # kept either way
    # c resumes once a and b are done: recompute re-feeds prompt + 2 sampled tokens at once.
    resumed = None
    while resumed is None:
        o = h.step()
        resumed = next((r for r in o.scheduled if r.seq_id == c.seqs[0].seq_id), None)
    if mode == "swap":
        assert o.blocks_to_swap_in and resumed.num_computed_tokens == 8 and len(resumed.token_ids) == 1
    else:
        assert resumed.num_computed_tokens == 0 and len(resumed.token_ids) == 9
    h.run()
    for r in (a, b, c):
        assert r.seqs[0].output_token_ids == expected_output(r.seqs[0], 10)


def _random_workload(h, rng, num_requests, with_n, start=0):
    reqs = []
    for i in range(start, start + num_requests):
        n = 2 if with_n and i % 3 == 1 else 1
        plen = rng.randint(3, 12 if n == 1 else 9)
        max_tokens = rng.randint(4, (40 if n == 1 else 24) - plen)
        reqs.append(h.add(f"r{i}", [rng.randrange(3, 900) for _ in range(plen)], n=n, max_tokens=max_tokens))
    return reqs


@pytest.mark.parametrize("mode, num_host_blocks", [("recompute", 12), ("swap", 12), ("swap", 3)])
@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_small_pool_every_request_finishes_exactly(mode, num_host_blocks, chunked, seed):
    """8 requests (some with n=2) through 12 blocks of 4 slots: far too few to run them all at
    once, so requests are preempted again and again; each must still get exactly its tokens."""
    h = Harness(num_blocks=12, num_host_blocks=num_host_blocks, block_size=4, max_num_seqs=6,
                max_num_batched_tokens=40 if not chunked else 10, max_model_len=40,
                preemption_mode=mode, enable_chunked_prefill=chunked)
    rng = random.Random(seed)
    reqs = _random_workload(h, rng, 4, with_n=True)
    h.step()
    reqs += _random_workload(h, rng, 4, with_n=True, start=4)  # arrive while the first ones run
    h.run()
    for r in reqs:
        for s in r.seqs:
            assert s.output_token_ids == expected_output(s, r.sampling_params.max_tokens), (r, s)
            assert s.finish_reason == "length"
    stats = h.sched.get_stats()
    assert stats.num_preemptions > 0
    if mode == "swap":
        assert h.runner.num_swapped_out > 0 and h.runner.num_swapped_in > 0
    assert h.runner.num_copied > 0  # the n=2 requests copied their shared last block
    assert stats.num_running_reqs == stats.num_waiting_reqs == stats.num_swapped_reqs == 0


def test_fork_shares_prompt_blocks_then_copies_on_write():
    h = Harness(num_blocks=12, max_num_batched_tokens=16)
    req = h.add("a", [11, 12, 13, 14, 15, 16], n=3, max_tokens=4)
    ids = [s.seq_id for s in req.seqs]
    out = h.step()
    assert len(out.scheduled) == 1  # the prompt is computed once
    row = out.scheduled[0]
    assert row.seq_id == ids[0] and row.sample_seq_ids == ids and row.block_table == [0, 1]
    assert [h.bm.get_block_table(i) for i in ids] == [[0, 1]] * 3
    assert h.bm.get_ref_count(0) == 3 and h.bm.get_ref_count(1) == 3
    assert all(s.num_computed_tokens == 6 and s.num_output_tokens == 1 for s in req.seqs)
    out = h.step()
    # Block 1 holds prompt positions 4-5 and is written at 6: two copies, the third writes in place.
    assert out.blocks_to_copy == [(1, 2), (1, 3)]
    assert [r.block_table for r in out.scheduled] == [[0, 2], [0, 3], [0, 1]]
    assert h.bm.get_ref_count(0) == 3 and h.bm.get_ref_count(1) == 1
    h.run()
    outs = [s.output_token_ids for s in req.seqs]
    assert outs == [expected_output(s, 4) for s in req.seqs]
    assert len({tuple(o) for o in outs}) == 3


def test_n_counts_against_max_num_seqs_from_admission():
    h = Harness(max_num_seqs=4, max_num_batched_tokens=16, num_blocks=40)
    a = h.add("a", [1, 2, 3, 4, 5], n=3, max_tokens=3)
    b = h.add("b", [6, 7, 8], n=2, max_tokens=3)
    out = h.step()
    assert [r.seq_id for r in out.scheduled] == [a.seqs[0].seq_id]  # b would make 5 sequences
    with pytest.raises(ValueError, match="n "):
        h.add("c", [1], n=5)
    h.run()
    assert [s.output_token_ids for s in b.seqs] == [expected_output(s, 3) for s in b.seqs]


def test_stop_conditions():
    def token_fn(seq_id, pos):  # EOS at position 6, stop id 77 at 8, then plain tokens
        return {6: EOS, 8: 77}.get(pos, 500 + pos)

    h = Harness(token_fn=token_fn, max_model_len=12, num_blocks=20)
    eos = h.add("eos", [1, 2, 3, 4], max_tokens=10)  # outputs at positions 4, 5, 6=EOS
    ign = h.add("ign", [1, 2, 3, 4], max_tokens=6, ignore_eos=True, stop_token_ids=[77])
    mint = h.add("min", [1, 2, 3, 4], max_tokens=20, min_tokens=5)  # EOS and 77 suppressed
    mlen = h.add("mlen", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], max_tokens=20)
    h.run()
    assert eos.seqs[0].output_token_ids == [504, 505, EOS]
    assert (eos.seqs[0].finish_reason, eos.seqs[0].stop_reason) == ("stop", None)
    assert ign.seqs[0].output_token_ids == [504, 505, EOS, 507, 77]
    assert (ign.seqs[0].finish_reason, ign.seqs[0].stop_reason) == ("stop", 77)
    assert mint.seqs[0].output_token_ids == [504, 505, EOS, 507, 77, 509, 510, 511]
    assert mint.seqs[0].finish_reason == "length"  # reached max_model_len = 12 tokens
    assert mlen.seqs[0].output_token_ids == [511] and mlen.seqs[0].finish_reason == "length"


def test_finish_sequence_for_stop_strings_frees_blocks():
    h = Harness(num_blocks=12)
    req = h.add("a", [1, 2, 3, 4, 5], n=2, max_tokens=8)
    h.step()
    h.step()
    s0, s1 = req.seqs
    h.sched.finish_sequence(s0.seq_id, "stop", "</s>")
    assert (s0.finish_reason, s0.stop_reason) == ("stop", "</s>")
    assert h.bm.get_block_table(s0.seq_id) == []
    assert h.sched.has_unfinished_requests()
    out = h.step()
    assert [r.seq_id for r in out.scheduled] == [s1.seq_id]
    with pytest.raises(ValueError, match="finish reason"):
        h.sched.finish_sequence(s1.seq_id, "eos")
    h.run()
    assert s1.output_token_ids == expected_output(s1, 8)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_abort_in_every_state_frees_blocks(mode):
    h = Harness(num_blocks=6, max_num_batched_tokens=32, preemption_mode=mode)
    a, b, c = (h.add(r, [9] * 7, max_tokens=10) for r in "abc")
    for _ in range(3):
        out = h.step()  # the third step preempts c
    h.add("d", [8] * 5)  # waiting
    assert out.preempted_seq_ids == [c.seqs[0].seq_id]
    out = h.sched.schedule()
    assert h.sched.abort_request("a") is a  # running, with a row in flight
    h.sched.update_from_output(out, h.runner.execute(out))  # the aborted row is ignored
    assert a.seqs[0].finish_reason == "abort" and a.seqs[0].num_output_tokens == 3
    for rid in ("c", "d"):  # swapped or waiting; and waiting
        assert h.sched.abort_request(rid) is not None
    assert h.sched.abort_request("c") is None and h.sched.abort_request("nope") is None
    assert h.bm.get_num_free_host_blocks() == h.bm.num_host_blocks
    assert h.bm.get_num_free_blocks() == 6 - 3  # only b's three blocks remain
    assert h.sched.get_num_unfinished_requests() == 1
    h.run()
    assert b.seqs[0].output_token_ids == expected_output(b.seqs[0], 10)


def test_prompt_logprobs_flag_only_on_first_computation_of_the_prompt():
    h = Harness(num_blocks=5, max_num_batched_tokens=6, max_num_seqs=2)
    b = h.add("b", [5, 6, 7, 8, 9, 10], max_tokens=12)  # no prompt logprobs
    h.step()
    a = h.add("a", list(range(30, 40)), max_tokens=9, prompt_logprobs=1)  # newest: preempted
    rows = []
    while h.sched.has_unfinished_requests():
        rows += [(r.seq_id, r.num_computed_tokens, len(r.token_ids), r.want_prompt_logprobs)
                 for r in h.step().scheduled]
    sa, sb = a.seqs[0].seq_id, b.seqs[0].seq_id
    a_rows = [r for r in rows if r[0] == sa]
    assert a_rows[:2] == [(sa, 0, 5, True), (sa, 5, 5, True)]  # the prompt, in two chunks
    assert h.sched.num_preemptions >= 1
    recomputed = [r for r in a_rows[2:] if r[1] == 0]
    assert recomputed and not any(r[3] for r in a_rows[2:])  # not asked again after preemption
    assert not any(r[3] for r in rows if r[0] == sb)
    assert a.seqs[0].output_token_ids == expected_output(a.seqs[0], 9)


def test_add_request_rejects_what_can_never_run():
    h = Harness(num_blocks=4, block_size=4, max_num_seqs=4, max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        h.add("long", list(range(33)))
    with pytest.raises(ValueError, match="prompt_token_ids must not be empty"):
        h.add("empty", [])
    with pytest.raises(ValueError, match="max_tokens"):
        h.add("big", list(range(10)), max_tokens=10)  # 19 cached tokens -> 5 blocks > 4
    with pytest.raises(ValueError, match="max_tokens"):
        h.add("forks", list(range(6)), n=2, max_tokens=6)  # 2 x 3 blocks
    h.add("ok", list(range(10)), max_tokens=7)  # 16 cached tokens -> exactly 4 blocks
    with pytest.raises(ValueError, match="request_id"):
        h.add("ok", [1])
    h.run()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(max_num_batched_tokens=2), "max_num_batched_tokens"),
        (dict(preemption_mode="drop"), "preemption_mode"),
        (dict(max_model_len=0), "max_model_len"),
    ],
)
def test_bad_scheduler_arguments(kwargs, field):
    args = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=32) | kwargs
    with pytest.raises(ValueError, match=field):
        Scheduler(BlockManager(8, 4, 4), **args)
    with pytest.raises(ValueError, match="swap"):
        Scheduler(BlockManager(8, 0, 4), 4, 16, 32, preemption_mode="swap")


def test_swapped_request_that_needs_the_whole_pool_comes_back():
    """b (n=2) is swapped out holding 5 of the 6 blocks; once a finishes it must come back even
    though 5 blocks + one spare per sequence exceed the pool (nothing else is running)."""
    h = Harness(num_blocks=6, num_host_blocks=12, block_size=4, max_num_batched_tokens=16, preemption_mode="swap")
    a = h.add("a", [7], max_tokens=5)
    b = h.add("b", [8] * 6, n=2, max_tokens=5)
    h.run(max_steps=100)
    assert any(len(o.blocks_to_swap_out) == 5 for o in h.outputs)
    assert a.seqs[0].output_token_ids == expected_output(a.seqs[0], 5)
    assert [s.output_token_ids for s in b.seqs] == [expected_output(s, 5) for s in b.seqs]


def test_watermark_holds_back_admissions_but_not_a_lone_request():
    h = Harness(num_blocks=8, block_size=4, max_num_batched_tokens=32, watermark=0.25)  # 2 blocks
    a = h.add("a", [1] * 20, max_tokens=4)  # 5 blocks: admitted, leaves 3
    b = h.add("b", [2] * 8, max_tokens=4)  # 2 blocks would leave 1 < 2: waits
    out = h.step()
    assert [r.seq_id for r in out.scheduled] == [a.seqs[0].seq_id]
    big = h.add("big", [3] * 28, max_tokens=5)  # 8 blocks: only ever admitted alone
    h.run()
    assert big.seqs[0].output_token_ids == expected_output(big.seqs[0], 5)
    assert b.seqs[0].output_token_ids == expected_output(b.seqs[0], 4)
