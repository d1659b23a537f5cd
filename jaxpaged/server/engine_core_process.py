"""The engine's side of ``EngineProcessClient``: a process that builds an ``LLMEngine`` and steps it.

The server's process keeps HTTP, tokenization of prompts and streaming; this one keeps the engine
loop, so neither waits on the other's Python (they shared one GIL when the loop was a thread, and a
served token took 44 ms where an offline step took 25: RESULTS.md, "Served vs offline"). This is
vLLM V1's ``EngineCoreProc``; the transport here is a ``multiprocessing`` pipe of pickled tuples.

Messages, in order on the one pipe. Client → engine: ``("add", request_id, prompt, params)``,
``("abort", request_id)``, ``("stop",)``. Engine → client: ``("ready", info)`` once warm (or
``("startup_failed", reason)``); ``("ack", request_id, error)`` for each add, before any output of
that request; ``("step", updates, stats)`` after every loop iteration (an empty one every
``idle_poll_s`` while idle: the heartbeat ``/health`` reads); ``("dead", reason)`` when the engine
cannot serve any more; ``("stopped",)`` after a stop. An update is a tuple (``pack_update``), not a
``RequestUpdate``: half the pickling work a step.

Error policy: as ``AsyncEngine``'s. What a request causes is contained by ``LLMEngine.step``; an
exception escaping it ends this process with exit code 1 after ``("dead", reason)``. The process
ignores SIGINT (the server drains first, then sends ``stop``) and exits when its pipe closes, so
it never outlives the server.

Exit: once its last message is sent the process runs its exit handlers and leaves through
``os._exit``, skipping interpreter finalization. Nothing here needs it (the compilation cache is
written when a program compiles; the pipe is the only output), and finalizing the interpreter of
a warm engine took 1.5 s on a 2-core machine and, under load, longer than the client waits before
it terminates the process: a clean stop then read as a kill (exit code -15).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import pickle
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from jaxpaged.gc_heap import freeze_gc_heap
from jaxpaged.server.engine_client import update_from_output
from jaxpaged.server.request_stream import OutputDelta, RequestUpdate
from jaxpaged.server.server_config import ModelInfo

if TYPE_CHECKING:
    from jaxpaged.engine_args import EngineArgs
    from jaxpaged.llm_engine import LLMEngine

logger = logging.getLogger("jaxpaged.engine_core")


def pack_update(update: RequestUpdate) -> tuple:
    return (update.request_id, update.num_prompt_tokens, update.finished, update.prompt_logprobs,
            update.num_cached_tokens, update.error,
            [(d.index, d.text, d.token_ids, d.logprobs, d.finish_reason, d.stop_reason) for d in update.outputs])


def unpack_update(packed: tuple) -> RequestUpdate:
    rid, num_prompt, finished, prompt_logprobs, num_cached, error, deltas = packed
    return RequestUpdate(rid, num_prompt, [OutputDelta(*d) for d in deltas], finished, prompt_logprobs,
                         num_cached, error)


def portable_error(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (the client re-raises it: a ``ValueError`` becomes a 400
    naming the field), else a ``RuntimeError`` with its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - an exception class that cannot be rebuilt from its args
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class EngineCoreProcess:
    """The loop of the engine process (``run_engine_core`` builds it once the engine is warm)."""

    def __init__(self, engine: LLMEngine, conn: Connection, idle_poll_s: float) -> None:
        self.engine = engine
        self.conn = conn
        self.idle_poll_s = idle_poll_s
        self.request_ids: set[str] = set()  # added and not finished (what a stop aborts)
        self.stopping = False
        # With the engine's timeline on: what this loop adds to each step, packing the outputs and
        # sending them (a send blocks while the server's side of the pipe is full: it fell behind)
        self.num_published_steps = 0
        self.pack_s = 0.0
        self.send_s = 0.0

    def run(self) -> None:
        while not self.stopping:
            busy = self.engine.has_unfinished_requests()
            if self.conn.poll(0 if busy else self.idle_poll_s):
                self._drain_commands()
                if self.stopping:
                    break
            stepped = self.engine.has_unfinished_requests()
            outputs = self.engine.step() if stepped else []
            start = time.perf_counter()
            updates = []
            for out in outputs:
                if out.finished:
                    self.request_ids.discard(out.request_id)
                updates.append(pack_update(update_from_output(out)))
            packed = time.perf_counter()
            self.conn.send(("step", updates, self.engine.get_stats()))  # also the idle heartbeat
            if stepped and self.engine.timeline.enabled:
                self.num_published_steps += 1
                self.pack_s += packed - start
                self.send_s += time.perf_counter() - packed
        for rid in self.request_ids:
            self.engine.abort_request(rid)
        self.log_timeline()
        self.conn.send(("stopped",))

    def log_timeline(self) -> None:
        """With ``--log-step-timeline``: the engine's per-bucket step phases and this loop's
        publishing cost, as one JSON log line (the served counterpart of throughput.py's table)."""
        if self.engine.timeline.enabled:
            steps = max(1, self.num_published_steps)
            logger.info("engine step timeline: %s", json.dumps({
                "buckets": self.engine.timeline.summary(), "num_published_steps": self.num_published_steps,
                "pack_ms_per_step": 1e3 * self.pack_s / steps, "send_ms_per_step": 1e3 * self.send_s / steps}))

    def _drain_commands(self) -> None:
        while self.conn.poll(0):
            cmd = self.conn.recv()  # EOFError: the server is gone; run_engine_core exits
            kind = cmd[0]
            if kind == "add":
                _, rid, prompt, params = cmd
                error: BaseException | None = None
                try:
                    self.engine.add_request(rid, prompt, params)
                    self.request_ids.add(rid)
                except Exception as exc:  # noqa: BLE001 - handed to the client, the loop goes on
                    error = portable_error(exc)
                self.conn.send(("ack", rid, error))
            elif kind == "abort":
                self.request_ids.discard(cmd[1])
                self.engine.abort_request(cmd[1])
            elif kind == "stop":
                self.stopping = True
                return


def ready_info(engine: LLMEngine, seconds: float) -> dict[str, Any]:
    """What the server needs to know about the engine it cannot see (sent once, pickled)."""
    return {
        "model_info": ModelInfo.for_engine(engine),  # path, max_model_len, vocabulary, defaults
        "tokenizer": engine.tokenizer,  # HF tokenizers pickle; the server loads its own from the path
        "max_num_seqs": engine.max_num_seqs,
        "stats": engine.get_stats(),
        "startup_seconds": seconds,
    }


def run_engine_core(conn: Connection, engine_args: EngineArgs, log_level: str, idle_poll_s: float,
                    step_timeline: bool = False) -> None:
    """The engine process's entry point (``multiprocessing`` spawn target). ``step_timeline``:
    time each step's phases and log them when the server stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.monotonic()
    try:
        from jaxpaged.llm_engine import LLMEngine  # JAX is imported in this process only

        engine = LLMEngine.from_engine_args(engine_args)
        if step_timeline:
            engine.timeline.enable()
        freeze_gc_heap()  # this process's start-up heap is never garbage (gc_heap.py)
        conn.send(("ready", ready_info(engine, time.monotonic() - start)))
    except BaseException as exc:  # noqa: BLE001 - reported to the server, which exits with it
        logger.exception("the engine failed to start")
        _send_quietly(conn, ("startup_failed", f"{type(exc).__name__}: {exc}"))
        exit_now(1)
    try:
        EngineCoreProcess(engine, conn, idle_poll_s).run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        logger.warning("the server closed its pipe; the engine process exits")
        exit_now(1)
    except BaseException as exc:  # noqa: BLE001 - the loop must report any death
        logger.exception("engine loop died")
        _send_quietly(conn, ("dead", f"{type(exc).__name__}: {exc}"))
        exit_now(1)
    exit_now(0)


def exit_now(code: int) -> None:
    """Ends the engine process with ``code`` after its exit handlers (multiprocessing's finalizers,
    which release the semaphores this process registered; logging's flush), without interpreter
    finalization (module docstring: "Exit")."""
    atexit._run_exitfuncs()  # what sys.exit would run first; cheap, unlike the teardown after it
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone with the server
            pass
    os._exit(code)


def _send_quietly(conn: Connection, msg: tuple) -> None:
    try:
        conn.send(msg)
    except OSError:  # the server is gone already
        pass
