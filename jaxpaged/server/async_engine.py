"""One engine loop thread serving many asyncio clients.

``LLMEngine.step()`` is synchronous and single-threaded. ``AsyncEngine`` owns the one thread that
calls it; clients (coroutines on any event loop) hand it adds and aborts through a thread-safe
inbox and receive their results on their own ``asyncio.Queue``, fed with
``loop.call_soon_threadsafe`` once per loop per step.

Requests run with ``output_kind=DELTA``: the engine's output processor hands out only what is new
(and holds back text that could still become a stop string), so the loop thread only repackages
each ``RequestOutput`` as a ``RequestUpdate`` of freshly built lists, and the event loop never
reads engine-owned state.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from jaxpaged.outputs import RequestOutput
from jaxpaged.sampling_params import RequestOutputKind, SamplingParams
from jaxpaged.server.engine_client import (
    EngineDeadError,
    EngineOverloadedError,
    RequestAbortedError,
    RequestTracker,
    call_soon,
    deliver_updates,
    num_queued_beyond_capacity,
    update_from_output,
)
from jaxpaged.server.metrics import ServerMetrics
from jaxpaged.server.request_stream import RequestStream, RequestUpdate

if TYPE_CHECKING:  # the engine imports JAX; the server loads it only once its arguments are valid
    from jaxpaged.llm_engine import LLMEngine

logger = logging.getLogger(__name__)


class AsyncEngine:
    """Runs ``engine.step()`` on one thread; ``add_request`` / ``abort`` from any event loop.
    An ``EngineClient`` (see ``engine_client.py`` for when the engine runs in its own process)."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None, idle_poll_s: float = 0.5,
                 stall_timeout_s: float = 60.0, on_dead: Callable[[BaseException], None] | None = None) -> None:
        """``stall_timeout_s``: how long one loop iteration (a step) may take before ``/health``
        reports the loop as stuck. ``on_dead(exc)`` runs on the loop thread when the loop dies of
        an exception (not on a clean shutdown), before its requests fail: the server uses it to exit
        non-zero."""
        self.engine = engine
        self.metrics = metrics
        self._idle_poll_s = idle_poll_s
        self._stall_timeout_s = stall_timeout_s
        self._on_dead = on_dead
        self._heartbeat = time.monotonic()  # last time the loop was between iterations
        self._inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._num_pending_adds = 0
        self._stats: dict[str, Any] = dict(engine.get_stats())
        self._trackers: dict[str, RequestTracker] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._dead: BaseException | None = None
        self._accepting = True
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._thread = threading.Thread(target=self._run, name="jaxpaged-engine-loop", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def dead_reason(self) -> str | None:
        if self._dead is not None:
            return f"{type(self._dead).__name__}: {self._dead}"
        if self._thread is None or not self._thread.is_alive():
            return "the engine loop is not running"
        return None

    @property
    def died_of(self) -> BaseException | None:
        """The exception that ended the loop (None while alive or after a clean shutdown)."""
        return self._dead

    @property
    def health_problem(self) -> str | None:
        """Why the server is not healthy (dead loop, or one step running past the stall bound);
        None while the loop is alive and keeps coming round."""
        reason = self.dead_reason
        if reason is not None:
            return f"engine loop is dead: {reason}"
        stalled = time.monotonic() - self._heartbeat
        if stalled > self._stall_timeout_s:
            return f"engine loop has made no progress for {stalled:.0f} s (bound: {self._stall_timeout_s:.0f} s)"
        return None

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops taking requests, lets in-flight ones finish for up to ``timeout`` seconds, then
        aborts the rest and stops the loop thread."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self.num_in_flight() > 0 and time.monotonic() < deadline and self.is_alive:
            time.sleep(0.05)
        self._stopping = True
        self._inbox.put(("stop",))
        if self._thread is not None:
            self._thread.join(max(1.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ client API (event loop)
    async def add_request(
        self, request_id: str, prompt: str | dict, params: SamplingParams, max_waiting: int | None = None
    ) -> RequestStream:
        """Hands a request to the loop and waits until the engine accepted it.

        Raises the engine's ``ValueError`` for bad input, ``EngineOverloadedError`` when
        ``max_waiting`` requests are already waiting, ``EngineDeadError`` when the loop is down.
        """
        if not self._accepting:
            raise EngineDeadError("the server is shutting down")
        reason = self.dead_reason
        if reason is not None:
            raise EngineDeadError(reason)
        stream = RequestStream(self, request_id, asyncio.get_running_loop())
        with self._lock:
            waiting = self._num_queued_beyond_capacity()
            if max_waiting is not None and waiting >= max_waiting:
                raise EngineOverloadedError(
                    f"the server has {waiting} requests waiting (max_waiting_requests={max_waiting}); retry later"
                )
            self._num_pending_adds += 1
        params = params.clone()
        params.output_kind = RequestOutputKind.DELTA
        self._inbox.put(("add", stream, prompt, params))
        try:
            await stream._ack
        except BaseException:
            stream.close()  # cancelled while waiting, or rejected (aborting an unknown id is a no-op)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def _num_queued_beyond_capacity(self) -> int:
        return num_queued_beyond_capacity(self._num_pending_adds, self._stats, self.engine.max_num_seqs)

    def num_waiting(self) -> int:
        with self._lock:
            return self._num_queued_beyond_capacity()

    def num_in_flight(self) -> int:
        with self._lock:
            return self._num_pending_adds + len(self._trackers)

    def stats(self) -> dict[str, Any]:
        """The engine's ``get_stats()`` as of the end of the last loop iteration."""
        with self._lock:
            return dict(self._stats)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        # engine.step() contains every failure a request can cause (it finishes that request with
        # an error and goes on); what escapes it means the engine cannot serve any more.
        try:
            while not self._stopping:
                self._heartbeat = time.monotonic()
                busy = self.engine.has_unfinished_requests()
                self._drain_inbox(block=not busy)
                if self._stopping:
                    break
                if self.engine.has_unfinished_requests():
                    self._publish(self.engine.step())
                stats = dict(self.engine.get_stats())
                with self._lock:
                    self._stats = stats
        except BaseException as exc:  # noqa: BLE001 - the loop must report any death
            self._dead = exc
            logger.exception("engine loop died")
        finally:
            if self._dead is None:
                self._fail_all(RequestAbortedError("the server is shutting down; request aborted"))
            else:
                try:  # before the requests fail, so whoever sees their error also sees the death reported
                    if self._on_dead is not None:
                        self._on_dead(self._dead)
                finally:
                    self._fail_all(EngineDeadError(self.dead_reason or "the engine loop stopped"))

    def _drain_inbox(self, block: bool) -> None:
        try:
            cmd = self._inbox.get(timeout=self._idle_poll_s) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(cmd)
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, stream, prompt, params = cmd
            error: BaseException | None = None
            try:
                self.engine.add_request(stream.request_id, prompt, params)
            except Exception as exc:  # noqa: BLE001 - handed to the client, the loop goes on
                error = exc
            else:
                self._trackers[stream.request_id] = RequestTracker(stream)
            with self._lock:
                self._num_pending_adds -= 1
                if error is None:
                    self._stats["num_waiting"] = int(self._stats.get("num_waiting", 0)) + 1
            call_soon(stream.loop, stream._settle_ack, error)
        elif kind == "abort":
            tracker = self._trackers.pop(cmd[1], None)
            self.engine.abort_request(cmd[1])
            if tracker is not None and self.metrics is not None:
                self.metrics.observe_aborted()
        elif kind == "stop":
            self._stopping = True

    def _publish(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestUpdate | BaseException]]] = {}
        for out in outputs:
            tracker = self._trackers.get(out.request_id)
            if tracker is None:
                continue  # aborted by its client after this step was scheduled
            update = tracker.observe(update_from_output(out), now, self.metrics)
            if out.finished:
                del self._trackers[out.request_id]
            by_loop.setdefault(tracker.stream.loop, []).append((tracker.stream, update))
        for loop, items in by_loop.items():
            if not call_soon(loop, deliver_updates, items):
                for stream, _ in items:  # the client's loop is gone: free the engine's blocks
                    self._trackers.pop(stream.request_id, None)
                    self.engine.abort_request(stream.request_id)

    def _fail_all(self, exc: BaseException) -> None:
        # Requests still in the inbox are rejected; running ones get the error on their queue.
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                with self._lock:
                    self._num_pending_adds -= 1
                call_soon(cmd[1].loop, cmd[1]._settle_ack, exc)
        for rid, tracker in list(self._trackers.items()):
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001 - the engine may be what broke
                pass
            call_soon(tracker.stream.loop, tracker.stream._put, exc)
        self._trackers.clear()
