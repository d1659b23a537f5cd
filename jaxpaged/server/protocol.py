"""Request bodies of the OpenAI-compatible API (OpenAI's fields plus vLLM's extra sampling fields).

Models are strict (no "5" for 5, no true for 1.0) so a wrong type is a 400 naming the field, and
ignore unknown fields the way vLLM does, so clients that send newer OpenAI fields keep working.
Range checks live in ``SamplingParams`` (one place for the engine and the server); the caps that
depend on server configuration are checked in the serving classes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_CONFIG = ConfigDict(strict=True, extra="ignore")


class StreamOptions(BaseModel):
    model_config = _CONFIG
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class SamplingRequest(BaseModel):
    """Fields shared by ``/v1/completions`` and ``/v1/chat/completions``."""

    model_config = _CONFIG

    model: str | None = None  # None: the first served model name
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # vLLM's beam search fields: n is the beam width
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    # vLLM's prefix-cache namespace: only requests with the same salt share cached blocks
    cache_salt: str | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_kwargs(self) -> dict[str, Any]:
        """``SamplingParams`` keyword arguments for the fields given (unset ones keep its defaults)."""
        kwargs: dict[str, Any] = {
            "n": self.n,
            "seed": self.seed,
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
        }
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty", "stop_token_ids"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        if self.use_beam_search:
            kwargs.update(use_beam_search=True, length_penalty=self.length_penalty, early_stopping=self.early_stopping)
            kwargs.setdefault("temperature", 0.0)  # beam search ranks the model's own distribution
        elif self.length_penalty != 1.0 or self.early_stopping is not False:  # refused by name
            kwargs.update(length_penalty=self.length_penalty, early_stopping=self.early_stopping)
        stops = self.stop_list()
        if stops:
            kwargs["stop"] = stops
        return kwargs


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextContentPart(BaseModel):
    model_config = _CONFIG
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # extra="allow": tool_calls, tool_call_id, name ... are handed to the chat template as given
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it: content as one string."""
        data = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            data["content"] = "\n".join(part.text for part in self.content)
        elif self.content is None:
            data["content"] = ""
        return data


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    # vLLM's extra chat fields
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: either ``prompt`` (completions-style) or ``messages`` (chat-style)."""

    model_config = _CONFIG
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``."""

    model_config = _CONFIG
    model: str | None = None
    tokens: list[int]
