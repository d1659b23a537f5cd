"""Counts XLA compilations in this process (through JAX's monitoring events), so the engine can
report — and tests can assert — that serving after warm-up compiles nothing new."""

from __future__ import annotations

import threading

import jax

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompilationCounter:
    """Counts backend compilations from construction until ``close()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.seconds = 0.0
        self._closed = False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_kwargs) -> None:
        if event == _BACKEND_COMPILE_EVENT and not self._closed:
            with self._lock:
                self.count += 1
                self.seconds += duration

    def close(self) -> None:
        self._closed = True
        try:
            from jax._src import monitoring

            monitoring.unregister_event_duration_listener(self._on_event)
        except (ImportError, AttributeError, ValueError):
            pass  # older/newer JAX: the closed flag already silences the listener
