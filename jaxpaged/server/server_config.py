"""Server-side settings (everything that is not an engine argument)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class ServerConfig:
    """Limits and policies of one API server. Caps turn oversized requests into 400s before they
    reach the engine; ``max_waiting_requests`` turns overload into 503s instead of unbounded queues."""

    served_model_names: tuple[str, ...]
    api_key: str | None = None
    metrics_require_auth: bool = False  # /metrics is open by default, as in vLLM (it holds only counts)
    chat_template: str | None = None  # overrides the tokenizer's template
    max_waiting_requests: int = 1024
    max_n: int = 16
    max_logprobs: int = 20
    max_stop_strings: int = 16
    max_stop_token_ids: int = 64  # the engine's max_stop_token_ids
    max_logit_bias: int = 300  # the engine's max_logit_bias (OpenAI's limit)
    max_prompts_per_request: int = 64  # a batched /v1/completions prompt list
    max_request_body_bytes: int = 8 * 1024 * 1024
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish on shutdown

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names must name at least one model")
        for field in ("max_waiting_requests", "max_n", "max_stop_strings", "max_prompts_per_request",
                      "max_request_body_bytes"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        for field in ("max_logprobs", "max_stop_token_ids", "max_logit_bias"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it unset to disable authentication)")

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the routes need to know about the loaded model."""

    model_path: str
    max_model_len: int
    vocab_size: int  # the model's (token ids in [0, vocab_size) are valid prompts)
    # generation_config.json's defaults for fields a request leaves unset; its max_tokens caps all
    default_sampling_params: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def for_engine(cls, engine: Any) -> "ModelInfo":
        """From an ``LLMEngine``."""
        return cls(engine.model_path, engine.max_model_len, engine.vocab_size,
                   dict(engine.generation_config.default_sampling_params))
