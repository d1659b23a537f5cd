"""Multi-host serving: one model split over the devices of several processes (``jax.distributed``).

Every process builds the same engine — loads its slices of the weights, allocates its slices of
the KV pool, compiles and warms up the same programs — and then they run in lockstep: process 0
(the *leader*) owns the requests, the scheduler and the block manager; the other processes
(*workers*) own nothing but their device shards. Before each runner call the leader sends the call
— the step's :class:`~jaxpaged.scheduler_output.SchedulerOutput` (which carries every sampling row
the runner reads) and which in-flight step it chains on — over a :class:`StepChannel`, and every worker replays it on its
own runner. The runner is deterministic given those inputs (the same packing, the same seeded
generator draws), so every process enqueues the same compiled programs with the same host arrays,
and the collectives inside them meet. Only the leader reads results.

The channel is a TCP connection from each worker to the leader (length-prefixed pickles), on a port
the leader picks and announces through a JAX collective, with a random token each worker must
present; run it on the same trusted network as JAX's coordinator. Set-up comes from the engine
arguments ``coordinator_address`` / ``num_processes`` / ``process_id`` or the environment
(``JAXPAGED_COORDINATOR_ADDRESS``, ``JAXPAGED_NUM_PROCESSES``, ``JAXPAGED_PROCESS_ID``); on CPU the
cross-process collectives use Gloo.
"""

from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import os
import pickle
import secrets
import socket
import struct
from typing import Any

import numpy as np

logger = logging.getLogger("jaxpaged")

ENV = {
    "coordinator_address": "JAXPAGED_COORDINATOR_ADDRESS",
    "num_processes": "JAXPAGED_NUM_PROCESSES",
    "process_id": "JAXPAGED_PROCESS_ID",
}
_HEADER = struct.Struct("!Q")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: str  # host:port of JAX's coordination service (process 0's host)
    num_processes: int
    process_id: int

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0

    @property
    def host(self) -> str:
        return self.coordinator_address.rsplit(":", 1)[0].strip("[]")


def distributed_config(args: Any) -> DistributedConfig | None:
    """The multi-host set-up from the engine arguments, else the environment; None for one process."""
    def get(field: str) -> Any:
        value = getattr(args, field)
        return value if value is not None else os.environ.get(ENV[field]) or None

    address, num, pid = get("coordinator_address"), get("num_processes"), get("process_id")
    if address is None:
        if num is not None and int(num) > 1:
            raise ValueError(f"num_processes={num} needs coordinator_address (host:port of process 0), "
                             f"or {ENV['coordinator_address']}")
        return None
    if num is None or pid is None:
        raise ValueError("coordinator_address needs num_processes and process_id too "
                         f"(or {ENV['num_processes']} and {ENV['process_id']})")
    num, pid = int(num), int(pid)
    if ":" not in address:
        raise ValueError(f"coordinator_address must be host:port, got {address!r}")
    if num < 1 or not 0 <= pid < num:
        raise ValueError(f"process_id must be in [0, num_processes), got process_id={pid}, num_processes={num}")
    return DistributedConfig(address, num, pid)


def initialize(cfg: DistributedConfig) -> None:
    """``jax.distributed.initialize`` (once per process; before any JAX computation)."""
    import jax

    if jax.distributed.is_initialized():
        if jax.process_count() != cfg.num_processes or jax.process_index() != cfg.process_id:
            raise ValueError(f"jax.distributed is already initialized as process {jax.process_index()} of "
                             f"{jax.process_count()}, not {cfg.process_id} of {cfg.num_processes}")
        return
    # Cross-process collectives between CPU devices (tests, CPU serving) need Gloo; no effect on GPUs.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    logger.info("jax.distributed: process %d of %d (coordinator %s); %d local / %d global devices",
                cfg.process_id, cfg.num_processes, cfg.coordinator_address, jax.local_device_count(),
                jax.device_count())


class StepChannel:
    """Process 0 sends; every other process receives the same messages in the same order."""

    def __init__(self, cfg: DistributedConfig, peers: list[socket.socket], sock: socket.socket | None):
        self.cfg = cfg
        self._peers = peers  # leader: one connection per worker
        self._sock = sock  # worker: its connection to the leader
        self._closed = False

    @classmethod
    def open(cls, cfg: DistributedConfig, timeout: float = 300.0) -> "StepChannel":
        """Connects every worker to the leader (a collective: every process calls it)."""
        from jax.experimental import multihost_utils

        server = None
        announce = np.zeros(3, np.int64)  # port, token (two halves)
        if cfg.is_leader:
            server = socket.create_server(("", 0))
            server.settimeout(timeout)
            announce[:] = [server.getsockname()[1], secrets.randbits(62), secrets.randbits(62)]
        announce = np.asarray(multihost_utils.broadcast_one_to_all(announce))
        token = struct.pack("!qq", int(announce[1]), int(announce[2]))
        if not cfg.is_leader:
            sock = socket.create_connection((cfg.host, int(announce[0])), timeout=timeout)
            sock.sendall(token + struct.pack("!q", cfg.process_id))
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return cls(cfg, [], sock)
        peers: dict[int, socket.socket] = {}
        try:
            while len(peers) < cfg.num_processes - 1:
                conn, _ = server.accept()
                conn.settimeout(timeout)
                hello = _recv_exact(conn, len(token) + 8)
                pid = struct.unpack("!q", hello[len(token):])[0]
                if hello[: len(token)] != token or not 0 < pid < cfg.num_processes or pid in peers:
                    conn.close()  # not one of ours
                    continue
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peers[pid] = conn
        finally:
            server.close()
        channel = cls(cfg, [peers[p] for p in sorted(peers)], None)
        atexit.register(channel.close)  # before jax.distributed's own shutdown (atexit runs LIFO)
        return channel

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for peer in self._peers:
            peer.sendall(_HEADER.pack(len(data)) + data)

    def recv(self) -> Any:
        """The next message; EOFError once the leader has closed the channel."""
        (size,) = _HEADER.unpack(_recv_exact(self._sock, _HEADER.size))
        return pickle.loads(_recv_exact(self._sock, size))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._peers:
            try:
                self.send(("stop",))
            except OSError:
                pass
        for s in self._peers + ([self._sock] if self._sock else []):
            s.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("the leader closed the channel")
        buf += chunk
    return bytes(buf)


class _LeaderKV:
    """The leader's KV pool: a reset (after a failed step consumed the pool) is replayed everywhere."""

    def __init__(self, kv: Any, channel: StepChannel):
        self._kv, self._channel = kv, channel

    def reset(self) -> None:
        self._channel.send(("reset",))
        self._kv.reset()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kv, name)


class LeaderRunner:
    """Process 0's model runner: each dispatch is sent to the workers before it runs here."""

    def __init__(self, runner: Any, channel: StepChannel):
        self._runner, self._channel = runner, channel
        self._keys = itertools.count()
        self.kv = _LeaderKV(runner.kv, channel)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def dispatch(self, sched: Any, prev: Any = None) -> Any:
        key = next(self._keys)
        self._channel.send(("dispatch", key, sched, getattr(prev, "replay_key", None)))
        step = self._runner.dispatch(sched, prev)
        step.replay_key = key
        return step

    def collect(self, step: Any) -> Any:
        return self._runner.collect(step)  # results are read on the leader only

    def execute(self, sched: Any) -> Any:
        return self.collect(self.dispatch(sched))


def serve_worker(runner: Any, channel: StepChannel) -> int:
    """A worker's loop: replays the leader's runner calls until it stops or disconnects; returns
    the number of steps replayed."""
    steps: dict[int, Any] = {}  # dispatched steps the next dispatch may chain on (async scheduling)
    replayed = 0
    while True:
        try:
            message = channel.recv()
        except (EOFError, OSError):
            logger.info("the leader closed the channel; worker %d stops after %d steps",
                        channel.cfg.process_id, replayed)
            return replayed
        kind = message[0]
        if kind == "stop":
            logger.info("worker %d stops after %d steps", channel.cfg.process_id, replayed)
            return replayed
        if kind == "reset":
            runner.kv.reset()
            steps.clear()
        elif kind == "dispatch":
            _, key, sched, prev_key = message
            replayed += 1
            try:
                steps[key] = runner.dispatch(sched, steps.get(prev_key))
            except Exception:  # noqa: BLE001 - the leader failed the same way and recovers
                logger.warning("replayed step %d failed as on the leader", key, exc_info=True)
            for old in [k for k in steps if k < key]:
                del steps[old]  # a step only ever chains on the one just before it
        else:
            raise ValueError(f"unknown message {kind!r} from the leader")
