"""OpenAI-compatible HTTP server on top of ``LLMEngine``.

``api_server`` (routes, CLI) → ``serving_completions`` / ``serving_chat`` (OpenAI shapes) →
``async_engine`` (the one engine-loop thread) → ``LLMEngine``. Nothing here imports JAX at module
import time except through the engine, and nothing uses pickle.
"""
