"""What the HTTP side sees of an engine: the ``EngineClient`` interface, its errors, and the
per-request bookkeeping its two implementations share.

Two clients implement it. ``AsyncEngine`` steps an engine on a thread of the server's process
(the engine a notebook already holds; ``BackgroundServer``). ``EngineProcessClient`` runs the
engine in a process of its own (``python -m jaxpaged.serve``'s default, as vLLM V1 splits
``AsyncLLM`` from ``EngineCore``) so the event loop streaming responses never holds the GIL the
engine loop needs. Both hand the routes ``RequestStream``s of the same ``RequestUpdate``s.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

from jaxpaged.server.request_stream import OutputDelta, RequestStream, RequestUpdate
from jaxpaged.step_errors import EngineDeadError  # the engine has stopped (crashed or shut down)

if TYPE_CHECKING:
    from jaxpaged.outputs import RequestOutput
    from jaxpaged.sampling_params import SamplingParams
    from jaxpaged.server.metrics import ServerMetrics

__all__ = ["EngineClient", "EngineDeadError", "EngineOverloadedError", "RequestAbortedError",
           "RequestFailedError", "RequestTracker", "call_soon", "deliver_updates", "update_from_output"]


class RequestFailedError(RuntimeError):
    """A step failed because of this request; the engine finished it with an error and went on."""


class EngineOverloadedError(RuntimeError):
    """The bounded waiting queue is full."""


class RequestAbortedError(RuntimeError):
    """The request was aborted by the server (shutdown) before it finished."""


class EngineClient(Protocol):
    """The engine as the routes use it; every method is called from the event loop."""

    async def add_request(self, request_id: str, prompt: str | dict, params: SamplingParams,
                          max_waiting: int | None = None) -> RequestStream:
        """Waits until the engine accepted the request. Raises the engine's ``ValueError`` for bad
        input, ``EngineOverloadedError`` past ``max_waiting``, ``EngineDeadError`` when it is down."""
        ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> dict[str, Any]:
        """The engine's ``get_stats()`` as of its last loop iteration."""
        ...

    def num_waiting(self) -> int: ...

    def num_in_flight(self) -> int: ...

    @property
    def health_problem(self) -> str | None:
        """Why the server is not healthy (dead, or stalled in one step); None when it is."""
        ...

    @property
    def dead_reason(self) -> str | None: ...

    @property
    def died_of(self) -> BaseException | None: ...

    def start(self) -> None: ...

    def shutdown(self, timeout: float = 30.0) -> None: ...


def num_queued_beyond_capacity(num_pending_adds: int, stats: dict[str, Any], max_num_seqs: int) -> int:
    """Requests that would have to wait. Those handed over but not yet seen by the engine mostly
    start at once while the batch has free sequence slots: only what exceeds the free slots counts
    (counting every pending add made a burst's admissions depend on how often the loop ran)."""
    queued = num_pending_adds + int(stats.get("num_waiting", 0))
    free_slots = max(0, max_num_seqs - int(stats.get("num_running_seqs", 0)))
    return max(0, queued - free_slots)


def update_from_output(out: RequestOutput) -> RequestUpdate:
    """One engine ``RequestOutput`` (``output_kind=DELTA``) as a ``RequestUpdate`` of fresh lists,
    so the event loop never reads engine-owned state."""
    deltas = [OutputDelta(o.index, o.text, list(o.token_ids), o.logprobs, o.finish_reason, o.stop_reason)
              for o in out.outputs]
    num_prompt = len(out.prompt_token_ids) if out.prompt_token_ids is not None else 0
    return RequestUpdate(out.request_id, num_prompt, deltas, out.finished, out.prompt_logprobs,
                         out.num_cached_tokens or 0, None if out.error is None else str(out.error))


class RequestTracker:
    """One request's latency bookkeeping on the client side: time to first token when the first
    update carrying a token arrives, time per output token and end-to-end at the last."""

    def __init__(self, stream: RequestStream) -> None:
        self.stream = stream
        self.first_token_time: float | None = None
        self.num_tokens: dict[int, int] = {}  # output tokens handed out, per sequence index

    def observe(self, update: RequestUpdate, now: float,
                metrics: ServerMetrics | None) -> RequestUpdate | BaseException:
        """Records ``update``; returns what the stream gets: the update, or for a request the
        engine finished with an error, ``RequestFailedError`` instead of a final update."""
        for d in update.outputs:
            self.num_tokens[d.index] = self.num_tokens.get(d.index, 0) + len(d.token_ids)
        if self.first_token_time is None and any(d.token_ids for d in update.outputs):
            self.first_token_time = now
            if metrics is not None:
                metrics.observe_first_token(now - self.stream.arrival)
        if update.finished and metrics is not None:
            lengths = list(self.num_tokens.values())
            first = self.first_token_time if self.first_token_time is not None else now
            longest = max(lengths, default=0)
            reasons = [d.finish_reason for d in update.outputs if d.finish_reason is not None]
            metrics.observe_finished(
                e2e=now - self.stream.arrival,
                tpot=(now - first) / (longest - 1) if longest > 1 else None,
                finish_reason=reasons[0] if reasons else "abort",
                num_prompt_tokens=update.num_prompt_tokens,
                num_generation_tokens=sum(lengths),
            )
        if update.finished and update.error is not None:
            return RequestFailedError(f"the engine failed while running this request ({update.error}); "
                                      "other requests were not affected")
        return update


def deliver_updates(items: list[tuple[RequestStream, RequestUpdate | BaseException]]) -> None:
    """Runs on the streams' event loop: one call a step hands out that step's updates."""
    for stream, update in items:
        stream._put(update)


def call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> bool:
    """``loop.call_soon_threadsafe``; False when the loop is closed (its client is gone)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False
