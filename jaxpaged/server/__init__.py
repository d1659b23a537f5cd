"""OpenAI-compatible HTTP server on top of ``LLMEngine``.

``api_server`` (routes, CLI) → ``serving_completions`` / ``serving_chat`` (OpenAI shapes) → an
``EngineClient``: ``engine_process_client`` (the default: the engine in its own process,
``engine_core_process``, one pickled message a step over a pipe) or ``async_engine`` (the engine
loop on a thread of the server) → ``LLMEngine``. Nothing here imports JAX at module import time
(only the engine does).
"""
