"""``POST /v1/chat/completions``: messages rendered through the (sandboxed) chat template, then
one engine request with ``n`` choices; OpenAI's response, chunk and logprob shapes."""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from jaxpaged.server.chat_template import ChatTemplate, ChatTemplateError
from jaxpaged.server.errors import APIError, bad_request
from jaxpaged.server.protocol import ChatCompletionRequest, ChatMessage
from jaxpaged.server.serving_base import (
    SSE_DONE,
    ChoiceState,
    ClientDisconnected,
    ServingBase,
    clamp_logprob,
    sse,
    usage,
)


class ServingChat(ServingBase):
    request_fields = set(ChatCompletionRequest.model_fields)

    def __init__(self, *args: Any, template: ChatTemplate | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.template = template

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool,
               continue_final_message: bool = False, extra: dict[str, Any] | None = None) -> str:
        if self.template is None:
            raise bad_request(
                "this model's tokenizer has no chat template and the server was started without "
                "--chat-template; use /v1/completions or restart the server with --chat-template FILE",
                "messages", code="chat_template_missing")
        try:
            return self.template.render([m.template_dict() for m in messages], add_generation_prompt,
                                        continue_final_message, extra)
        except ChatTemplateError as exc:
            raise bad_request(str(exc), "messages") from exc

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        model = self.check_model(req.model)
        self.check_sampling_caps(req)
        if req.tools and req.tool_choice != "none":
            raise bad_request("tool calling is not supported by this server", "tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise bad_request("only response_format {\"type\": \"text\"} is supported", "response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        self.check_logprobs(req.top_logprobs, "top_logprobs")
        if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
            raise bad_request("give max_completion_tokens or max_tokens, not two different values", "max_completion_tokens")

        text = self.render(req.messages, req.add_generation_prompt, req.continue_final_message, req.chat_template_kwargs)
        # The template writes the special tokens (BOS ...) itself.
        prompt_ids = await self.tokenizer("messages", "chat").encode(text, add_special_tokens=False)
        if not prompt_ids:
            raise bad_request("the rendered chat prompt is empty", "messages")
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.resolve_max_tokens(requested, len(prompt_ids), param, "messages")
        kwargs = self.sampling_kwargs(req)
        kwargs.update(max_tokens=max_tokens, logit_bias=self.logit_bias(req),
                      logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        params = self.make_params(kwargs)

        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self.submit([request_id], [self.salted({"prompt_token_ids": prompt_ids, "prompt": text}, req)],
                                    [params])
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            gen = self._stream(streams, req, request_id, model, created, include_usage)
            return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            choices, num_prompt, _, num_cached = await self.collect(streams, req.n, raw)
        except ClientDisconnected:
            return Response(status_code=499)
        return JSONResponse(self._response(choices, num_prompt[0], num_cached[0], req, request_id, model, created))

    def _logprobs(self, token_ids: list[int], logprobs: list[dict[int, Any]], top: int) -> dict[str, Any]:
        content = []
        for token_id, entries in zip(token_ids, logprobs):
            sampled = entries.get(token_id)
            text = self.token_text(token_id, sampled)
            ranked = sorted(entries.items(), key=lambda kv: kv[1].logprob, reverse=True)[:top]
            content.append({
                "token": text,
                "logprob": clamp_logprob(sampled.logprob) if sampled is not None else _MISSING,
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {"token": (t := self.token_text(tid, lp)), "logprob": clamp_logprob(lp.logprob), "bytes": list(t.encode("utf-8"))}
                    for tid, lp in ranked
                ],
            })
        return {"content": content}

    def _response(self, choices: list[ChoiceState], num_prompt: int, num_cached: int, req: ChatCompletionRequest,
                  request_id: str, model: str, created: int) -> dict[str, Any]:
        out = []
        for idx, choice in enumerate(choices):
            logprobs = self._logprobs(choice.token_ids, choice.logprobs, req.top_logprobs or 0) if req.logprobs else None
            out.append({"index": idx, "message": {"role": "assistant", "content": "".join(choice.text)},
                        "logprobs": logprobs, "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason})
        completion = sum(len(c.token_ids) for c in choices)
        return {"id": request_id, "object": "chat.completion", "created": created, "model": model,
                "choices": out, "usage": usage(num_prompt, completion, num_cached)}

    async def _stream(self, streams: list, req: ChatCompletionRequest, request_id: str, model: str,
                      created: int, include_usage: bool) -> AsyncIterator[str]:
        base = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}
        extra = {"usage": None} if include_usage else {}
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        num_prompt = num_cached = 0
        num_completion = 0
        try:
            for idx in range(req.n):  # OpenAI opens every choice with the role
                yield sse(dict(base, choices=[{"index": idx, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}], **extra))
            async for _, update in self.merged(streams):
                num_prompt, num_cached = update.num_prompt_tokens, update.num_cached_tokens
                choices = []
                for delta in update.outputs:
                    num_completion += len(delta.token_ids)
                    logprobs = None
                    if req.logprobs:
                        logprobs = self._logprobs(delta.token_ids, delta.logprobs or [], req.top_logprobs or 0)
                    body = {"content": delta.text} if delta.text or delta.finish_reason is None else {}
                    choices.append({"index": delta.index, "delta": body, "logprobs": logprobs,
                                    "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason})
                if choices:
                    chunk = dict(base, choices=choices, **extra)
                    if continuous:  # vLLM's continuous_usage_stats: usage so far on every chunk
                        chunk["usage"] = usage(num_prompt, num_completion, num_cached)
                    yield sse(chunk)
            if include_usage:
                yield sse(dict(base, choices=[], usage=usage(num_prompt, num_completion, num_cached)))
        except APIError as exc:
            yield sse(exc.body())
        except Exception as exc:  # noqa: BLE001 - the status line is sent; report in-band
            mapped = self._map_engine_error(exc)
            body = mapped.body() if isinstance(mapped, APIError) else APIError(500, f"internal error: {exc}").body()
            yield sse(body)
        finally:
            for stream in streams:
                stream.close()
        yield SSE_DONE


_MISSING = -9999.0
