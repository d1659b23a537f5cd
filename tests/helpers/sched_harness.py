"""The scheduler test harness: a Scheduler over a BlockManager, driven step by step through the
``SimulatedKVRunner`` (which checks every step's block tables against a simulated KV pool)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from jaxpaged.block_manager import BlockManager
from jaxpaged.request import Request
from jaxpaged.scheduler import Scheduler
from tests.helpers.sim_runner import SimulatedKVRunner, default_token

EOS = 2


@dataclass
class Params:  # the fields of SamplingParams the scheduler reads
    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: int | None = None
    best_of: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False


class Harness:
    def __init__(self, num_blocks=12, num_host_blocks=12, block_size=4, max_num_seqs=8,
                 max_num_batched_tokens=16, max_model_len=64, token_fn=default_token, watermark=0.0,
                 enable_caching=False, top_fn=None, **kw):
        self.bm = BlockManager(num_blocks, num_host_blocks, block_size, watermark=watermark,
                               enable_caching=enable_caching)
        self.sched = Scheduler(self.bm, max_num_seqs, max_num_batched_tokens, max_model_len,
                               eos_token_id=EOS, **kw)
        self.runner = SimulatedKVRunner(num_blocks, num_host_blocks, block_size, token_fn, top_fn=top_fn)
        self.ids = itertools.count()
        self.reqs: dict[str, Request] = {}
        self.outputs = []

    def add(self, rid, prompt, cache_salt=None, **params):
        p = Params(**params)
        req = Request(rid, prompt, p, first_seq_id=next(self.ids) * 10, cache_salt=cache_salt)
        self.sched.add_request(req)
        self.runner.register(req)
        self.reqs[rid] = req
        return req

    def step(self):
        s = self.sched
        out = s.schedule()
        assert out.num_batched_tokens == sum(len(r.token_ids) for r in out.scheduled)
        assert out.num_batched_tokens <= s.max_num_batched_tokens
        assert len(out.scheduled) <= s.max_num_seqs
        assert len({r.seq_id for r in out.scheduled}) == len(out.scheduled)
        assert s.get_stats().num_running_seqs <= s.max_num_seqs
        sampled = self.runner.execute(out)
        s.update_from_output(out, sampled)
        self.outputs.append(out)
        return out

    def run(self, max_steps=2000):
        for _ in range(max_steps):
            if not self.sched.has_unfinished_requests():
                break
            self.step()
        assert not self.sched.has_unfinished_requests(), "livelock: requests never finished"
        # Every block is back in the pools (cached ones wait in the free queue).
        assert self.bm.get_num_free_blocks() == self.bm.num_device_blocks
        assert self.bm.get_num_free_host_blocks() == self.bm.num_host_blocks


def expected_output(seq, num):
    return [default_token(seq.seq_id, seq.num_prompt_tokens + i) for i in range(num)]
