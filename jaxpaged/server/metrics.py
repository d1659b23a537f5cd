"""Prometheus metrics in the text exposition format, with vLLM's metric names under ``jaxpaged:``.

Written by hand (a few counters and histograms) rather than with ``prometheus_client`` so that no
process-global registry exists: every server owns its ``ServerMetrics``. Engine-wide numbers
(running / waiting requests, KV-cache usage, token totals, preemptions, padding waste) come from
``LLMEngine.get_stats()`` as snapshotted by the engine loop; per-request latencies are observed by
the loop when a request's first token and its end are published.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Any

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# (engine stats key, metric name, type, help). Gauges are read as is; "counter" values are the
# engine's running totals.
ENGINE_STATS = (
    ("num_running", "jaxpaged:num_requests_running", "gauge", "Number of requests in model execution batches."),
    ("num_waiting", "jaxpaged:num_requests_waiting", "gauge", "Number of requests waiting to be processed."),
    ("num_swapped", "jaxpaged:num_requests_swapped", "gauge", "Number of requests swapped to host memory."),
    ("kv_cache_usage", "jaxpaged:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage."),
    ("num_preemptions_total", "jaxpaged:num_preemptions_total", "counter", "Cumulative number of preemptions."),
    ("prompt_tokens_total", "jaxpaged:prompt_tokens_total", "counter", "Number of prefill tokens processed."),
    ("generation_tokens_total", "jaxpaged:generation_tokens_total", "counter", "Number of generation tokens processed."),
    ("padding_waste", "jaxpaged:padding_waste_ratio", "gauge", "Padded token slots per real token in executed steps so far (0: no padding)."),
    ("num_free_blocks", "jaxpaged:num_free_gpu_blocks", "gauge", "Free KV-cache blocks on the device."),
    ("num_gpu_blocks", "jaxpaged:num_gpu_blocks", "gauge", "KV-cache blocks on the device."),
    ("num_compilations", "jaxpaged:num_compilations_total", "counter", "Number of XLA compilations of step functions."),
    ("num_compilations_after_warmup", "jaxpaged:num_compilations_after_warmup_total", "counter", "XLA compilations after warm-up (should stay 0)."),
    ("prefix_cache_queries", "jaxpaged:prefix_cache_queries_total", "counter", "Prefix cache queries, in terms of number of queried tokens."),
    ("prefix_cache_hits", "jaxpaged:prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of number of cached tokens."),
)


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: ``le`` buckets, ``_sum``, ``_count``)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.buckets + (math.inf,), self.counts):
            running += n
            le = "+Inf" if bound == math.inf else repr(float(bound))
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {running}')
        out.append(f"{name}_sum{{{labels}}} {self.sum!r}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


class ServerMetrics:
    """Thread-safe: the engine loop observes, the HTTP handler renders."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.success: dict[str, int] = {"stop": 0, "length": 0, "abort": 0}
        self.rejected: dict[str, int] = {}

    def observe_first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_finished(self, e2e: float, tpot: float | None, finish_reason: str,
                         num_prompt_tokens: int, num_generation_tokens: int) -> None:
        with self._lock:
            self.e2e.observe(e2e)
            if tpot is not None:
                self.tpot.observe(tpot)
            self.success[finish_reason] = self.success.get(finish_reason, 0) + 1

    def observe_aborted(self) -> None:
        with self._lock:
            self.success["abort"] += 1

    def observe_rejected(self, status: int) -> None:
        with self._lock:
            key = str(status)
            self.rejected[key] = self.rejected.get(key, 0) + 1

    def render(self, engine_stats: dict[str, Any]) -> str:
        labels = f'model_name="{_escape(self.model_name)}"'
        lines: list[str] = []
        for key, name, kind, help_text in ENGINE_STATS:
            if key not in engine_stats:
                continue
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                      f"{name}{{{labels}}} {_num(engine_stats[key])}"]
        with self._lock:
            name = "jaxpaged:request_success_total"
            lines += [f"# HELP {name} Count of finished requests by finish reason.", f"# TYPE {name} counter"]
            lines += [f'{name}{{{labels},finished_reason="{_escape(r)}"}} {n}' for r, n in sorted(self.success.items())]
            name = "jaxpaged:request_rejected_total"
            lines += [f"# HELP {name} Requests refused before reaching the engine, by HTTP status.", f"# TYPE {name} counter"]
            lines += [f'{name}{{{labels},status="{s}"}} {n}' for s, n in sorted(self.rejected.items())]
            for hist, name, help_text in (
                (self.ttft, "jaxpaged:time_to_first_token_seconds", "Histogram of time to first token in seconds."),
                (self.tpot, "jaxpaged:time_per_output_token_seconds", "Histogram of time per output token in seconds."),
                (self.e2e, "jaxpaged:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds."),
            ):
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
                lines += hist.lines(name, labels)
        return "\n".join(lines) + "\n"


def _num(value: Any) -> str:
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if value.is_integer() else repr(value)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
