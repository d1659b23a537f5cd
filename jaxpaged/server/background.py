"""The OpenAI-compatible server over an engine that already exists, on a background thread.

``python -m jaxpaged.serve`` builds its own engine and blocks. A notebook, or any program that
already holds an ``LLM``, can serve that engine instead, without loading and compiling the model
again::

    with BackgroundServer(llm.llm_engine) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        ...

While the server runs, its engine loop is the engine's only user: calling ``llm.generate`` at the
same time would step the engine from two threads. After ``stop()`` the engine is the caller's again.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import uvicorn

from jaxpaged.model_source import DEFAULT_SERVED_MODEL_NAME
from jaxpaged.server.api_server import create_app
from jaxpaged.server.async_engine import AsyncEngine
from jaxpaged.server.metrics import ServerMetrics
from jaxpaged.server.server_config import ModelInfo, ServerConfig
from jaxpaged.server.server_tokenizer import ServerTokenizer

if TYPE_CHECKING:  # the caller has built the engine (and loaded JAX) already
    from jaxpaged.llm_engine import LLMEngine


class BackgroundServer:
    """Serves ``engine`` on ``host:port`` (port 0: a free one; ``url`` says which once started).

    ``served_model_names`` defaults as the CLI's does (the engine's ``model`` argument, else
    ``default-model-v1``); other keywords are :class:`ServerConfig` fields.
    """

    def __init__(self, engine: LLMEngine, host: str = "127.0.0.1", port: int = 0,
                 served_model_names: tuple[str, ...] | None = None, **config: Any) -> None:
        names = served_model_names or (engine.args.model or DEFAULT_SERVED_MODEL_NAME,)
        self.config = ServerConfig(served_model_names=tuple(names), **config)
        self.metrics = ServerMetrics(self.config.model_name)
        self.async_engine = AsyncEngine(engine, self.metrics)
        self.tokenizer = None if engine.tokenizer is None else ServerTokenizer.for_engine(engine.tokenizer)
        app = create_app(self.async_engine, self.tokenizer, self.config, ModelInfo.for_engine(engine), self.metrics)
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                     timeout_graceful_shutdown=self.config.shutdown_timeout))
        self._thread = threading.Thread(target=self._server.run, name="jaxpaged-background-server", daemon=True)
        self.url: str | None = None

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        """Starts the engine loop and the HTTP server; returns once the port accepts connections."""
        self.async_engine.start()
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.async_engine.shutdown(timeout=0.0)
                raise RuntimeError(f"the HTTP server did not start within {timeout} s")
            time.sleep(0.01)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        """Stops the HTTP server, then the engine loop (aborting what it still holds)."""
        self._server.should_exit = True
        self._thread.join(self.config.shutdown_timeout + 5)
        self.async_engine.shutdown(timeout=0.0)
        if self.tokenizer is not None:
            self.tokenizer.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start() if self.url is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
