"""``EngineProcessClient``: the server's handle on an engine running in a process of its own.

The server's default (``python -m jaxpaged.serve``; ``--no-separate-engine-process`` runs the
engine on a thread instead, as ``AsyncEngine``). The engine process is ``engine_core_process.py``;
the wire format and the message order are stated there. Here: two threads of the server process
move messages (a sender, so a burst of adds never blocks the event loop on a full pipe while the
engine is inside a step; a reader, which hands each step's updates to the streams' event loops in
one ``call_soon_threadsafe`` per loop and step), and the same bookkeeping ``AsyncEngine`` keeps:
pending adds, a ``RequestTracker`` per accepted request, the last stats snapshot.

Health: the engine process sends a message after every loop iteration (every ``idle_poll_s`` while
idle); none for ``stall_timeout_s`` means one step is stuck. When the process dies (the engine
could not go on, or it was killed), ``on_dead`` runs and then every request it held gets
``EngineDeadError``, as when ``AsyncEngine``'s loop dies: the server exits non-zero for a
supervisor to restart.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from jaxpaged.sampling_params import RequestOutputKind, SamplingParams
from jaxpaged.server.engine_client import (
    EngineDeadError,
    EngineOverloadedError,
    RequestAbortedError,
    RequestTracker,
    call_soon,
    deliver_updates,
    num_queued_beyond_capacity,
)
from jaxpaged.server.engine_core_process import run_engine_core, unpack_update
from jaxpaged.server.metrics import ServerMetrics
from jaxpaged.server.request_stream import RequestStream, RequestUpdate

if TYPE_CHECKING:
    from jaxpaged.engine_args import EngineArgs

logger = logging.getLogger(__name__)


class EngineProcessClient:
    """An ``EngineClient`` over an engine process. ``launch()`` spawns it and returns once the
    engine is warm (``info`` then holds what it reported: ``ready_info``); ``start()`` begins
    moving requests and outputs."""

    def __init__(self, engine_args: EngineArgs, metrics: ServerMetrics | None = None, idle_poll_s: float = 0.5,
                 stall_timeout_s: float = 60.0, on_dead: Callable[[BaseException], None] | None = None,
                 log_level: str = "info", step_timeline: bool = False) -> None:
        self.engine_args = engine_args
        self.metrics = metrics
        self._idle_poll_s = idle_poll_s
        self._stall_timeout_s = stall_timeout_s
        self._on_dead = on_dead
        self._log_level = log_level
        self._step_timeline = step_timeline
        self.info: dict[str, Any] = {}
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Any = None
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: dict[str, RequestStream] = {}  # added, not yet acknowledged
        self._trackers: dict[str, RequestTracker] = {}  # accepted, not finished
        self._stats: dict[str, Any] = {}
        self._heartbeat = time.monotonic()  # last message from the engine process
        self._dead: BaseException | None = None
        self._accepting = True
        self._stopping = False
        self._stopped = threading.Event()  # the reader has seen "stopped" or the pipe close
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    def launch(self, timeout: float | None = None) -> EngineProcessClient:
        """Spawns the engine process and waits (up to ``timeout`` s, default without limit) until
        it is warm. Raises ``RuntimeError`` with the engine's reason when it fails to start."""
        if self._proc is not None:
            raise RuntimeError("EngineProcessClient already launched")
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold JAX or threads
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=run_engine_core, name="jaxpaged-engine-core", daemon=True,
                                 args=(child_conn, self.engine_args, self._log_level, self._idle_poll_s,
                                       self._step_timeline))
        self._proc.start()
        child_conn.close()  # the child holds its end: EOF here once it exits
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._conn.poll(0.5):
                if not self._proc.is_alive():
                    raise RuntimeError(f"the engine process exited during start-up (exit code {self._proc.exitcode})")
                if deadline is not None and time.monotonic() > deadline:
                    raise RuntimeError(f"the engine did not start within {timeout} s")
            try:
                msg = self._conn.recv()
            except EOFError:
                self._proc.join(5)
                raise RuntimeError(f"the engine process exited during start-up (exit code {self._proc.exitcode})") from None
            if msg[0] == "startup_failed":
                raise RuntimeError(f"the engine failed to start: {msg[1]}")
        except BaseException:
            self._kill()
            raise
        self.info = msg[1]
        self._stats = dict(self.info["stats"])
        return self

    def start(self) -> None:
        """Starts the threads that carry requests to the engine process and its outputs back."""
        if not self.info:
            raise RuntimeError("launch() the engine process first")
        if self._threads:
            raise RuntimeError("EngineProcessClient already started")
        self._heartbeat = time.monotonic()
        for target, name in ((self._read, "jaxpaged-engine-reader"), (self._write, "jaxpaged-engine-sender")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def dead_reason(self) -> str | None:
        if self._dead is not None:
            return str(self._dead)
        if self._proc is None or self._stopped.is_set():
            return "the engine process is not running"
        return None

    @property
    def died_of(self) -> BaseException | None:
        """What ended the engine process (None while it runs or after a clean shutdown)."""
        return self._dead

    @property
    def health_problem(self) -> str | None:
        reason = self.dead_reason
        if reason is not None:
            return f"engine loop is dead: {reason}"
        stalled = time.monotonic() - self._heartbeat
        if stalled > self._stall_timeout_s:
            return f"engine loop has made no progress for {stalled:.0f} s (bound: {self._stall_timeout_s:.0f} s)"
        return None

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops taking requests, lets in-flight ones finish for up to ``timeout`` seconds, then
        has the engine abort the rest and waits for its process to exit."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self.num_in_flight() > 0 and time.monotonic() < deadline and self.dead_reason is None:
            time.sleep(0.05)
        self._stopping = True
        if self._proc is None:
            return
        if not self._threads:  # launched, never started (the server failed to come up): nothing in flight
            self._kill()
            return
        self._outbox.put(("stop",))
        self._stopped.wait(max(5.0, deadline - time.monotonic()))
        self._outbox.put(None)  # ends the sender
        self._proc.join(10)
        self._kill()
        self._fail_all(RequestAbortedError("the server is shutting down; request aborted"))

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()

    # ------------------------------------------------------------------ client API (event loop)
    async def add_request(self, request_id: str, prompt: str | dict, params: SamplingParams,
                          max_waiting: int | None = None) -> RequestStream:
        """As ``AsyncEngine.add_request``: returns once the engine process accepted the request."""
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
                    f"the server has {waiting} requests waiting (max_waiting_requests={max_waiting}); retry later")
            self._pending[request_id] = stream
        params = params.clone()
        params.output_kind = RequestOutputKind.DELTA
        self._outbox.put(("add", request_id, prompt, params))
        try:
            await stream._ack
        except BaseException:
            stream.close()  # cancelled while waiting, or rejected (aborting an unknown id is a no-op)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._pending.pop(request_id, None)
            tracker = self._trackers.pop(request_id, None)
        if tracker is not None and self.metrics is not None:
            self.metrics.observe_aborted()
        self._outbox.put(("abort", request_id))

    def _num_queued_beyond_capacity(self) -> int:
        return num_queued_beyond_capacity(len(self._pending), self._stats, self.info.get("max_num_seqs", 0))

    def num_waiting(self) -> int:
        with self._lock:
            return self._num_queued_beyond_capacity()

    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._pending) + len(self._trackers)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._stats)

    # ------------------------------------------------------------------ message threads
    def _write(self) -> None:
        while True:
            msg = self._outbox.get()
            if msg is None:
                return
            try:
                self._conn.send(msg)
            except OSError:  # the engine process is gone; the reader reports it
                return

    def _read(self) -> None:
        try:
            while True:
                msg = self._conn.recv()
                self._heartbeat = time.monotonic()
                kind = msg[0]
                if kind == "step":
                    self._publish(msg[1])
                    with self._lock:
                        self._stats = msg[2]
                elif kind == "ack":
                    self._settle(msg[1], msg[2])
                elif kind == "dead":
                    self._die(EngineDeadError(msg[1]))
                    return
                elif kind == "stopped":
                    return
        except (EOFError, OSError):
            if not self._stopping:
                self._proc.join(5)
                self._die(EngineDeadError(f"the engine process exited unexpectedly (exit code {self._proc.exitcode})"))
        finally:
            self._stopped.set()

    def _settle(self, request_id: str, error: BaseException | None) -> None:
        with self._lock:
            stream = self._pending.pop(request_id, None)
            if stream is not None and error is None:
                self._trackers[request_id] = RequestTracker(stream)
                self._stats["num_waiting"] = int(self._stats.get("num_waiting", 0)) + 1
        if stream is not None:  # else: aborted by its client while the add was in flight
            call_soon(stream.loop, stream._settle_ack, error)

    def _publish(self, packed: list[tuple]) -> None:
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestUpdate | BaseException]]] = {}
        with self._lock:
            for item in packed:
                update = unpack_update(item)
                tracker = self._trackers.get(update.request_id)
                if tracker is None:
                    continue  # aborted by its client after the engine scheduled the step
                if update.finished:
                    del self._trackers[update.request_id]
                by_loop.setdefault(tracker.stream.loop, []).append((tracker.stream, tracker.observe(update, now, self.metrics)))
        for loop, items in by_loop.items():
            if not call_soon(loop, deliver_updates, items):
                for stream, _ in items:  # the client's loop is gone: free the engine's blocks
                    self.abort(stream.request_id)

    def _die(self, exc: BaseException) -> None:
        self._dead = exc
        logger.error("the engine process died: %s", exc)
        try:  # before the requests fail, so whoever sees their error also sees the death reported
            if self._on_dead is not None:
                self._on_dead(exc)
        finally:
            self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            trackers, self._trackers = self._trackers, {}
        for stream in pending.values():
            call_soon(stream.loop, stream._settle_ack, exc)
        for tracker in trackers.values():
            call_soon(tracker.stream.loop, tracker.stream._put, exc)
