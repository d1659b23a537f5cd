"""Runs the real app under uvicorn on a free loopback port in a background thread (in-process)."""

from __future__ import annotations

import threading
import time

import uvicorn

from jaxpaged.server.api_server import create_app
from jaxpaged.server.async_engine import AsyncEngine
from jaxpaged.server.metrics import ServerMetrics
from jaxpaged.server.server_config import ModelInfo, ServerConfig
from jaxpaged.server.server_tokenizer import ServerTokenizer


class LiveServer:
    """``uvicorn.Server`` on 127.0.0.1:<free port>; ``url`` once started, ``stop()`` to end it."""

    def __init__(self, app, timeout_graceful_shutdown: float = 5.0) -> None:
        # log_config=None: uvicorn leaves logging alone, so its access log propagates to caplog
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, log_level="info",
                                access_log=True, timeout_graceful_shutdown=timeout_graceful_shutdown,
                                # well above any pause in a test, so a pooled client connection is
                                # never closed by the server just as the client reuses it
                                timeout_keep_alive=60)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def start(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class Stack:
    """One engine loop (``AsyncEngine``) over a real engine, and the apps served on it."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.metrics = ServerMetrics("tiny")
        self.async_engine = AsyncEngine(engine, self.metrics)
        self.tokenizer = ServerTokenizer.for_engine(engine.tokenizer)
        self.servers: list[LiveServer] = []
        self.async_engine.start()

    def serve(self, tokenizer: ServerTokenizer | None | object = "engine's", **config) -> LiveServer:
        """A new app on this loop; ``tokenizer=None`` serves without one (--skip-tokenizer-init)."""
        cfg = ServerConfig(served_model_names=("tiny", "tiny-alias"), **config)
        model = ModelInfo.for_engine(self.engine)
        app = create_app(self.async_engine, self.tokenizer if tokenizer == "engine's" else tokenizer, cfg,
                         model, self.metrics)
        server = LiveServer(app).start()
        self.servers.append(server)
        return server

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """Waits until the engine holds no request; returns the loop's last stats snapshot."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.async_engine.stats()
            if self.async_engine.num_in_flight() == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0:
                time.sleep(0.05)  # one more loop iteration refreshes the snapshot after the last free
                return self.async_engine.stats()
            time.sleep(0.02)
        raise AssertionError(f"engine not idle after {timeout}s: {self.async_engine.stats()}")

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        self.async_engine.shutdown(timeout=0.0)
        self.tokenizer.close()
