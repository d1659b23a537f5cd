"""A step that raises does not take the engine down: the request that caused it finishes with
``finish_reason="error"`` (the step's batch when the cause is unknown), its blocks are freed, every
other request completes with exactly the tokens of an undisturbed run, and only failures that
repeat (or a KV pool that cannot be rebuilt) end the engine with ``EngineDeadError``."""

import numpy as np
import pytest

from jaxpaged import LLM, SamplingParams
from jaxpaged.step_errors import EngineDeadError
from tests.helpers.tiny_checkpoint import make_tiny_checkpoint

CULPRIT_SEED = 1234  # the injected fault fires for rows with this seed


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(request, tmp_path_factory):
    ckpt = make_tiny_checkpoint(str(tmp_path_factory.mktemp("contain") / "tiny"))
    return LLM(ckpt, dtype="float32", max_num_seqs=4, max_num_batched_tokens=32, block_size=4,
               num_gpu_blocks_override=40, async_scheduling=request.param)


def _workload():
    rng = np.random.default_rng(7)
    prompts = [{"prompt_token_ids": rng.integers(5, 300, int(n)).tolist()} for n in (9, 17, 4, 12, 6, 20)]
    # The last one shares r1's prompt: the prefix cache makes them hold the same blocks, which a
    # reset of either must leave intact for the other.
    prompts.append({"prompt_token_ids": prompts[1]["prompt_token_ids"] + [33, 34]})
    params = [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
              SamplingParams(n=2, temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)]
    return prompts, params


@pytest.fixture(scope="module")
def reference(llm):
    prompts, params = _workload()
    return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]


def _run(llm, prompts, params) -> list:
    """Runs requests r0, r1, ... to the end through step(); the finished outputs in request order."""
    engine = llm.llm_engine
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", prompt, p)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    done.update({o.request_id: o for o in engine.step() if o.finished})  # async: the last step lands
    return [done[f"r{i}"] for i in range(len(prompts))]


def _check_clean(llm, before):
    stats = llm.get_stats()
    assert stats["num_free_blocks"] == stats["num_gpu_blocks"] and stats["num_running"] == 0
    assert stats["num_compilations"] == before["num_compilations"]
    assert not llm.llm_engine.has_unfinished_requests()


def test_a_row_that_cannot_be_packed_fails_alone(llm, reference, monkeypatch):
    runner = llm.llm_engine.runner
    pack = runner._tensors

    def faulty(rows, num_rows, profile):
        if any(r.params.seed == CULPRIT_SEED for r in rows):
            raise RuntimeError("injected packing fault")
        return pack(rows, num_rows, profile)

    monkeypatch.setattr(runner, "_tensors", faulty)
    prompts, params = _workload()
    culprit = SamplingParams(temperature=1.0, seed=CULPRIT_SEED, max_tokens=30, ignore_eos=True)
    before = llm.get_stats()
    # The culprit shares r1's first block, and runs beside it.
    culprit_prompt = {"prompt_token_ids": prompts[1]["prompt_token_ids"][:5] + [5, 6, 7]}
    outs = _run(llm, prompts[:3] + [culprit_prompt] + prompts[3:], params[:3] + [culprit] + params[3:])
    bad = outs.pop(3)
    assert bad.finished and [c.finish_reason for c in bad.outputs] == ["error"]
    assert "injected packing fault" in bad.error
    assert [[c.token_ids for c in o.outputs] for o in outs] == reference
    assert all(c.finish_reason == "length" for o in outs for c in o.outputs)
    _check_clean(llm, before)
    assert llm.get_stats()["num_failed_steps_total"] > before["num_failed_steps_total"]


def test_a_failed_output_fails_that_request_and_keeps_the_others_outputs(llm, reference, monkeypatch):
    processor = llm.llm_engine.output_processor
    process = processor.process_tokens

    def faulty(req):
        if req.request_id == "r2" and len(req.seqs[0].output_token_ids) >= 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer fault")
        return process(req)

    monkeypatch.setattr(processor, "process_tokens", faulty)
    prompts, params = _workload()
    before = llm.get_stats()
    outs = _run(llm, prompts, params)
    assert [c.finish_reason for c in outs[2].outputs] == ["error"] and "injected detokenizer fault" in outs[2].error
    got = [[c.token_ids for c in o.outputs] for o in outs]
    assert got[:2] + got[3:] == reference[:2] + reference[3:]
    _check_clean(llm, before)


def test_an_unattributable_step_failure_fails_the_batch_and_rebuilds_a_lost_pool(llm, reference, monkeypatch):
    """The device step raises after consuming the donated KV pool: the requests of that step fail,
    the pool is rebuilt, and the requests waiting behind them run exactly as before."""
    engine = llm.llm_engine
    run_step = engine.runner.run_step
    calls = {"n": 0}

    def faulty(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            for k, v in engine.kv.caches:
                k.delete()
                v.delete()
            raise RuntimeError("injected device fault")
        return run_step(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "run_step", faulty)
    prompts, params = _workload()
    before = llm.get_stats()
    outs = _run(llm, prompts, params)
    failed = [i for i, o in enumerate(outs) if o.outputs[0].finish_reason == "error"]
    assert failed and len(failed) < len(outs)
    assert all("injected device fault" in outs[i].error for i in failed)
    for i, o in enumerate(outs):
        if i not in failed:
            assert [c.token_ids for c in o.outputs] == reference[i]
    assert not engine.kv.is_lost()
    _check_clean(llm, before)


def test_failures_that_repeat_end_the_engine(llm, monkeypatch):
    engine = llm.llm_engine

    def broken(*args, **kwargs):
        raise RuntimeError("injected persistent fault")

    monkeypatch.setattr(engine.runner, "run_step", broken)
    errors = []
    with pytest.raises(EngineDeadError, match="3 steps in a row failed.*injected persistent fault"):
        for i in range(10):  # one new request a step: every step fails, each for another batch
            engine.add_request(f"doomed-{i}", [5, 6, 7, 8], SamplingParams(max_tokens=4))
            errors += [o for o in engine.step() if o.finished]
    assert len(errors) == 2 and all(o.outputs[0].finish_reason == "error" for o in errors)
    engine.abort_request([f"doomed-{i}" for i in range(10)])
    engine._num_failed_steps = 0  # the module's engine serves the next test
