"""What ``/v1/completions`` and ``/v1/chat/completions`` share: request checks against the server's
caps and the context length, ``SamplingParams`` construction with errors mapped to 400s, handing
requests to the engine loop, collecting results while watching for a client that went away, and
the SSE / usage / logprob helpers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
from typing import Any, AsyncIterator

from starlette.requests import Request

from jaxpaged.sampling_params import SamplingParams
from jaxpaged.server.engine_client import (
    EngineClient,
    EngineDeadError,
    EngineOverloadedError,
    RequestAbortedError,
    RequestFailedError,
)
from jaxpaged.server.errors import APIError, bad_request
from jaxpaged.server.metrics import ServerMetrics
from jaxpaged.server.protocol import SamplingRequest
from jaxpaged.server.request_stream import OutputDelta, RequestStream, RequestUpdate
from jaxpaged.server.server_config import ModelInfo, ServerConfig
from jaxpaged.server.server_tokenizer import ServerTokenizer

# JSON has no -inf; vLLM reports impossible tokens' logprob as -9999.0.
_MIN_LOGPROB = -9999.0
_FIELD_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\b")
_TOKEN_ID_RE = re.compile(r"\s*-?[0-9]{1,12}\s*")  # ASCII digits only: str.isdigit() takes "²"


class ClientDisconnected(Exception):
    """The HTTP client went away before its response was ready."""


@dataclasses.dataclass
class ChoiceState:
    """One choice accumulated from the engine's deltas (non-streaming responses)."""

    text: list[str] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict[int, Any]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def apply(self, delta: OutputDelta) -> None:
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason


def param_from_message(message: str, fields: set[str]) -> str | None:
    """The request field an engine ``ValueError`` names (project rule: messages start with it)."""
    match = _FIELD_RE.match(message)
    return match.group(1) if match and match.group(1) in fields else None


def clamp_logprob(value: float) -> float:
    return _MIN_LOGPROB if math.isinf(value) or math.isnan(value) else float(value)


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def usage(num_prompt: int, num_completion: int, num_cached: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens`` counts the prompt tokens the
    prefix cache served."""
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion, "total_tokens": num_prompt + num_completion,
            "prompt_tokens_details": {"cached_tokens": num_cached}}


async def wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ServingBase:
    request_fields: set[str] = set()

    def __init__(self, async_engine: EngineClient, tokenizer: ServerTokenizer | None, config: ServerConfig,
                 model: ModelInfo, metrics: ServerMetrics | None = None) -> None:
        self.engine = async_engine
        self._tokenizer = tokenizer  # None: the engine runs without one (--skip-tokenizer-init)
        self.config = config
        self.max_model_len = model.max_model_len
        self.vocab_size = model.vocab_size
        self.metrics = metrics
        self.default_max_tokens = model.default_sampling_params.get("max_tokens")
        self.default_sampling = {k: v for k, v in model.default_sampling_params.items() if k != "max_tokens"}

    def tokenizer(self, param: str, what: str) -> ServerTokenizer:
        if self._tokenizer is None:
            raise bad_request(f"{what} needs a tokenizer, and this server runs without one "
                              f"(--skip-tokenizer-init): send prompts as token ids", param)
        return self._tokenizer

    def token_text(self, token_id: int, entry: Any) -> str:
        """A logprob entry's token as text: the engine's decoded string, else the tokenizer's, else
        vLLM's ``token_id:N`` form."""
        decoded = getattr(entry, "decoded_token", None) if entry is not None else None
        if decoded is not None:
            return decoded
        if self._tokenizer is None:
            return f"token_id:{token_id}"
        return self._tokenizer.token_text(token_id)

    # ------------------------------------------------------------------ checks
    def check_model(self, model: str | None) -> str:
        if model is None:
            return self.config.model_name
        if model not in self.config.served_model_names:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return model

    def check_sampling_caps(self, req: SamplingRequest) -> None:
        cfg = self.config
        if not 1 <= req.n <= cfg.max_n:
            raise bad_request(f"n must be in [1, {cfg.max_n}], got {req.n}", "n")
        stops = req.stop_list()
        if len(stops) > cfg.max_stop_strings:
            raise bad_request(f"stop may hold at most {cfg.max_stop_strings} strings, got {len(stops)}", "stop")
        if any(not s for s in stops):
            raise bad_request("stop strings must not be empty", "stop")
        if req.stop_token_ids is not None and len(req.stop_token_ids) > cfg.max_stop_token_ids:
            raise bad_request(f"stop_token_ids may hold at most {cfg.max_stop_token_ids} ids, "
                              f"got {len(req.stop_token_ids)}", "stop_token_ids")
        if req.logit_bias is not None and len(req.logit_bias) > cfg.max_logit_bias:
            raise bad_request(f"logit_bias may hold at most {cfg.max_logit_bias} entries, got {len(req.logit_bias)}",
                              "logit_bias")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")

    def check_logprobs(self, value: int | None, param: str) -> None:
        if value is not None and not 0 <= value <= self.config.max_logprobs:
            raise bad_request(f"{param} must be in [0, {self.config.max_logprobs}], got {value}", param)

    def logit_bias(self, req: SamplingRequest) -> dict[int, float] | None:
        if not req.logit_bias:
            return None
        out: dict[int, float] = {}
        for key, value in req.logit_bias.items():
            if not _TOKEN_ID_RE.fullmatch(key):
                raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
            token = int(key)
            if not 0 <= token < self.vocab_size:
                raise bad_request(f"logit_bias token id {token} is outside [0, {self.vocab_size})", "logit_bias")
            if not -100.0 <= value <= 100.0:
                raise bad_request(f"logit_bias values must be in [-100, 100], got {value}", "logit_bias")
            out[token] = value
        return out

    def sampling_kwargs(self, req: SamplingRequest) -> dict[str, Any]:
        """The request's sampling fields over the model's generation_config defaults (a beam
        search takes none of the sampling defaults: it is greedy over the raw distribution)."""
        defaults = {} if req.use_beam_search else self.default_sampling
        return {**defaults, **req.sampling_kwargs()}

    @staticmethod
    def salted(prompt: dict[str, Any], req: SamplingRequest) -> dict[str, Any]:
        """The engine prompt with the request's cache_salt (a 400 naming it when empty)."""
        if req.cache_salt is None:
            return prompt
        if not req.cache_salt:
            raise bad_request("cache_salt must be a non-empty string", "cache_salt")
        return dict(prompt, cache_salt=req.cache_salt)

    def resolve_max_tokens(self, requested: int | None, num_prompt: int, param: str, prompt_param: str) -> int:
        """``requested``, or what is left of the context when None; a 400 (OpenAI's wording) when
        the prompt, or prompt + requested, does not fit. generation_config's max_new_tokens caps
        the result (vLLM's server-wide limit)."""
        tokens = self._max_tokens(requested, num_prompt, param, prompt_param)
        return tokens if self.default_max_tokens is None else min(tokens, self.default_max_tokens)

    def _max_tokens(self, requested: int | None, num_prompt: int, param: str, prompt_param: str) -> int:
        room = self.max_model_len - num_prompt
        if room < 1:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"prompt has {num_prompt} tokens, which leaves no room for a completion. Please reduce "
                f"the length of the prompt.", prompt_param, code="context_length_exceeded")
        if requested is None:
            return room
        if requested < 1:
            raise bad_request(f"{param} must be at least 1, got {requested}", param)
        if requested > room:
            raise bad_request(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {num_prompt + requested} tokens ({num_prompt} in the prompt, {requested} "
                f"for the completion). Please reduce the prompt or {param}.", param, code="context_length_exceeded")
        return requested

    def make_params(self, kwargs: dict[str, Any]) -> SamplingParams:
        try:
            return SamplingParams(**kwargs)
        except ValueError as exc:
            raise bad_request(str(exc), param_from_message(str(exc), self.request_fields)) from exc

    # ------------------------------------------------------------------ engine
    async def submit(self, request_ids: list[str], prompts: list[dict[str, Any]],
                     params: list[SamplingParams]) -> list[RequestStream]:
        """Adds one engine request per prompt; all or none (earlier ones are aborted on failure)."""
        streams: list[RequestStream] = []
        try:
            for rid, prompt, p in zip(request_ids, prompts, params, strict=True):
                streams.append(await self.engine.add_request(rid, prompt, p, self.config.max_waiting_requests))
        except BaseException as exc:
            for stream in streams:
                stream.close()
            raise self._map_engine_error(exc) from exc
        return streams

    def _map_engine_error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, ValueError):
            return bad_request(str(exc), param_from_message(str(exc), self.request_fields))
        if isinstance(exc, EngineOverloadedError):
            self._rejected(503)
            return APIError(503, str(exc), code="server_overloaded")
        if isinstance(exc, (EngineDeadError, RequestAbortedError)):
            self._rejected(503)
            return APIError(503, f"the engine is not serving: {exc}", code="engine_unavailable")
        if isinstance(exc, RequestFailedError):
            return APIError(500, str(exc), code="engine_step_failed")
        return exc

    def _rejected(self, status: int) -> None:
        if self.metrics is not None:
            self.metrics.observe_rejected(status)

    async def merged(self, streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestUpdate]]:
        """Updates of several streams as they come, tagged with the stream's position."""
        if len(streams) == 1:
            async for update in streams[0]:
                yield 0, update
            return
        out: asyncio.Queue[tuple[int, RequestUpdate] | BaseException | None] = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for update in stream:
                    out.put_nowait((i, update))
            except BaseException as exc:  # noqa: BLE001 - re-raised by the consumer
                out.put_nowait(exc)
            finally:
                out.put_nowait(None)

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await out.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            for stream in streams:
                stream.close()

    async def collect(self, streams: list[RequestStream], n: int,
                      raw: Request) -> tuple[list[ChoiceState], list[int], list, list[int]]:
        """Runs all streams to the end unless the client disconnects first (then aborts them).
        Returns the choices, each stream's prompt length, prompt logprobs (None if not asked) and
        cached prompt tokens."""
        choices = [ChoiceState() for _ in range(len(streams) * n)]
        num_prompt = [0] * len(streams)
        prompt_logprobs: list = [None] * len(streams)
        num_cached = [0] * len(streams)

        async def gather() -> None:
            async for i, update in self.merged(streams):
                num_prompt[i] = update.num_prompt_tokens
                num_cached[i] = update.num_cached_tokens
                if update.prompt_logprobs is not None:
                    prompt_logprobs[i] = update.prompt_logprobs
                for delta in update.outputs:
                    choices[i * n + delta.index].apply(delta)

        work = asyncio.ensure_future(gather())
        watcher = asyncio.ensure_future(wait_for_disconnect(raw))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not work.done():
                work.cancel()
                for stream in streams:
                    stream.close()
        if not work.done() or work.cancelled():
            raise ClientDisconnected()
        exc = work.exception()
        if exc is not None:
            raise self._map_engine_error(exc)
        return choices, num_prompt, prompt_logprobs, num_cached
