"""benchmarks/serve.py's goodput: vLLM's --goodput objectives, checked per request."""

import argparse

import pytest

from benchmarks.serve import RequestResult, parse_goodput, summarize


def _result(ttft: float, latency: float, output_len: int) -> RequestResult:
    return RequestResult(prompt_len=10, output_len=output_len, ok=True, ttft=ttft, latency=latency, start=0.0,
                         itl=[(latency - ttft) / max(output_len - 1, 1)] * max(output_len - 1, 0))


def test_goodput_counts_the_requests_that_meet_every_objective():
    slos = parse_goodput(["ttft:100", "tpot:20"])
    assert slos == {"ttft": 100.0, "tpot": 20.0}
    results = [
        _result(0.050, 0.050 + 9 * 0.010, 10),  # ttft 50 ms, tpot 10 ms: good
        _result(0.150, 0.150 + 9 * 0.010, 10),  # ttft over
        _result(0.050, 0.050 + 9 * 0.030, 10),  # tpot over
        _result(0.090, 0.090, 1),  # one token: tpot counts as 0, good
        RequestResult(prompt_len=10, output_len=0, ok=False, error="boom"),  # failed: never good
    ]
    args = argparse.Namespace(max_concurrency=None, request_rate=4.0, goodput_slos=slos)
    s = summarize(args, results, 2.0, [(0.0, 1)])
    assert s["good_requests"] == 2
    assert s["request_goodput"] == pytest.approx(1.0)
    assert s["goodput_slos_ms"] == slos


def test_no_objectives_no_goodput_keys():
    args = argparse.Namespace(max_concurrency=None, request_rate=4.0, goodput_slos={})
    assert "request_goodput" not in summarize(args, [_result(0.05, 0.1, 5)], 1.0, [(0.0, 1)])


@pytest.mark.parametrize("pair", ["ttft", "latency:100", "tpot:-1", "tpot:abc", "ttft:0"])
def test_bad_objective_names_the_allowed_keys(pair):
    with pytest.raises(ValueError, match="ttft, tpot, e2el"):
        parse_goodput([pair])
