"""``POST /v1/completions``: OpenAI's legacy completions, with vLLM's extra sampling fields.

``prompt`` may be a string, a list of token ids, or a batch (list of strings / list of token
lists); each prompt is one engine request and its ``n`` choices have indices
``prompt_index * n + i``, as OpenAI numbers them.

``best_of`` (>= n) runs that many samples on the prompt's shared blocks and returns the ``n`` with
the highest cumulative logprob; like OpenAI, it cannot be streamed when it exceeds ``n``.
``use_beam_search`` (vLLM's extra field) runs a beam search of width ``n`` (``length_penalty``,
``early_stopping``); its choices arrive when the search ends (one chunk when streamed).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from jaxpaged.server.errors import APIError, bad_request
from jaxpaged.server.protocol import CompletionRequest
from jaxpaged.server.serving_base import (
    SSE_DONE,
    ChoiceState,
    ClientDisconnected,
    ServingBase,
    clamp_logprob,
    sse,
    usage,
)


class CompletionLogprobs:
    """Builds OpenAI's completions ``logprobs`` object (tokens / token_logprobs / top_logprobs /
    text_offset), continuing offsets across streamed chunks."""

    def __init__(self, serving: ServingBase, num: int, offset: int) -> None:
        self.serving = serving
        self.num = num
        self.offset = offset

    def build_prompt(self, prompt_ids: list[int], entries: list[dict[int, Any] | None]) -> dict[str, Any]:
        """The echoed prompt's part: its first token has no logprob (nothing predicts it)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, entry in zip(prompt_ids, entries):
            if entry is None:
                text = self._text(token_id, None)
                for key, value in (("tokens", text), ("token_logprobs", None), ("top_logprobs", None),
                                   ("text_offset", self.offset)):
                    out[key].append(value)
                self.offset += len(text)
            else:
                part = self.build([token_id], [entry])
                for key in out:
                    out[key] += part[key]
        return out

    def build(self, token_ids: list[int], logprobs: list[dict[int, Any]]) -> dict[str, Any]:
        tokens, token_logprobs, top, offsets = [], [], [], []
        for token_id, entries in zip(token_ids, logprobs):
            text = self._text(token_id, entries.get(token_id))
            sampled = entries.get(token_id)
            tokens.append(text)
            token_logprobs.append(clamp_logprob(sampled.logprob) if sampled is not None else None)
            ranked = sorted(entries.items(), key=lambda kv: kv[1].logprob, reverse=True)[: self.num]
            if sampled is not None and token_id not in dict(ranked):
                ranked.append((token_id, sampled))
            entry: dict[str, float] = {}
            for t, lp in ranked:  # tokens with the same text (e.g. partial UTF-8) keep the best
                entry.setdefault(self._text(t, lp), clamp_logprob(lp.logprob))
            top.append(entry)
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def _text(self, token_id: int, entry: Any) -> str:
        return self.serving.token_text(token_id, entry)


class ServingCompletions(ServingBase):
    request_fields = set(CompletionRequest.model_fields)

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        model = self.check_model(req.model)
        self.check_sampling_caps(req)
        self.check_logprobs(req.logprobs, "logprobs")
        if req.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if req.best_of is not None:
            if not req.n <= req.best_of <= self.config.max_n:
                raise bad_request(f"best_of must be in [n, {self.config.max_n}] (n={req.n}), got {req.best_of}", "best_of")
            if req.stream and req.best_of > req.n:
                raise bad_request("best_of > n cannot be streamed: the best are known only at the end", "best_of")
            if req.use_beam_search and req.best_of != req.n:
                raise bad_request("best_of must equal n (the beam width) with use_beam_search", "best_of")
        # echo with max_tokens=0 scores the prompt only (what lm-eval's loglikelihood requests send):
        # the engine generates one token that is not returned.
        echo_only = req.echo and req.max_tokens == 0

        prompts = await self._prompts(req)
        kwargs = self.sampling_kwargs(req)
        kwargs.update(logprobs=req.logprobs, logit_bias=self.logit_bias(req))
        if req.best_of is not None and not req.use_beam_search:
            kwargs["best_of"] = req.best_of
        if req.echo and req.logprobs is not None:
            kwargs["prompt_logprobs"] = req.logprobs
        if echo_only:
            kwargs["min_tokens"] = 0
        # One SamplingParams per prompt: max_tokens=null means "the rest of the context", which
        # depends on the prompt's length.
        params = [self.make_params(dict(kwargs, max_tokens=self.resolve_max_tokens(
            1 if echo_only else req.max_tokens, len(p["prompt_token_ids"]), "max_tokens", "prompt"))) for p in prompts]

        request_id = f"cmpl-{uuid.uuid4().hex}"
        rids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        echo = [await self._prompt_text(p) if req.echo else "" for p in prompts]
        streams = await self.submit(rids, [self.salted(p, req) for p in prompts], params)
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            gen = self._stream(streams, req, request_id, model, created, echo, prompts, echo_only, include_usage)
            return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            choices, num_prompt, prompt_lps, num_cached = await self.collect(streams, req.n, raw)
        except ClientDisconnected:
            return Response(status_code=499)
        if echo_only:
            for choice in choices:
                choice.text, choice.token_ids, choice.logprobs = [], [], []
        return JSONResponse(self._response(choices, num_prompt, num_cached, prompt_lps, prompts, req, request_id,
                                           model, created, echo))

    async def _prompts(self, req: CompletionRequest) -> list[dict[str, Any]]:
        prompt = req.prompt
        if isinstance(prompt, str):
            batch: list[str | list[int]] = [prompt]
        elif prompt and isinstance(prompt[0], int):
            batch = [prompt]  # type: ignore[list-item]
        else:
            batch = list(prompt)  # type: ignore[arg-type]
        if not batch:
            raise bad_request("prompt must not be empty", "prompt")
        if len(batch) > self.config.max_prompts_per_request:
            raise bad_request(f"prompt may hold at most {self.config.max_prompts_per_request} prompts, got {len(batch)}", "prompt")
        out = []
        for item in batch:
            if isinstance(item, str):
                if not item:
                    raise bad_request("prompt must not be empty", "prompt")
                ids = await self.tokenizer("prompt", "a text prompt").encode(item, add_special_tokens=True)
                out.append({"prompt_token_ids": ids, "prompt": item})
            else:
                if not item:
                    raise bad_request("prompt must not be empty", "prompt")
                bad = [t for t in item if not 0 <= t < self.vocab_size]
                if bad:
                    raise bad_request(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[0]}", "prompt")
                out.append({"prompt_token_ids": list(item)})
        return out

    async def _prompt_text(self, prompt: dict[str, Any]) -> str:
        if "prompt" in prompt:
            return prompt["prompt"]
        return await self.tokenizer("echo", "echo").decode(prompt["prompt_token_ids"])

    def _response(self, choices: list[ChoiceState], num_prompt: list[int], num_cached: list[int], prompt_lps: list,
                  prompts: list[dict],
                  req: CompletionRequest, request_id: str, model: str, created: int, echo: list[str]) -> dict[str, Any]:
        out = []
        for idx, choice in enumerate(choices):
            prefix = echo[idx // req.n]
            logprobs = None
            if req.logprobs is not None and req.echo:
                builder = CompletionLogprobs(self, req.logprobs, 0)
                plp = prompt_lps[idx // req.n] or []
                logprobs = _concat(builder.build_prompt(prompts[idx // req.n]["prompt_token_ids"], plp),
                                   builder.build(choice.token_ids, choice.logprobs))
            elif req.logprobs is not None:
                logprobs = CompletionLogprobs(self, req.logprobs, len(prefix)).build(choice.token_ids, choice.logprobs)
            out.append({"index": idx, "text": prefix + "".join(choice.text), "logprobs": logprobs,
                        "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason})
        completion = sum(len(c.token_ids) for c in choices)
        return {"id": request_id, "object": "text_completion", "created": created, "model": model,
                "choices": out, "usage": usage(sum(num_prompt), completion, sum(num_cached))}

    async def _stream(self, streams: list, req: CompletionRequest, request_id: str, model: str, created: int,
                      echo: list[str], prompts: list[dict], echo_only: bool, include_usage: bool) -> AsyncIterator[str]:
        n = req.n
        start = 0 if req.echo and req.logprobs is not None else None  # prompt tokens carry the offsets
        builders = [CompletionLogprobs(self, req.logprobs or 0, len(echo[i // n]) if start is None else 0)
                    for i in range(len(streams) * n)]
        prompt_lps: list = [None] * len(streams)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        echoed = [False] * (len(streams) * n)
        num_prompt = [0] * len(streams)
        num_cached = [0] * len(streams)
        num_completion = 0
        base = {"id": request_id, "object": "text_completion", "created": created, "model": model}
        try:
            async for i, update in self.merged(streams):
                num_prompt[i], num_cached[i] = update.num_prompt_tokens, update.num_cached_tokens
                if update.prompt_logprobs is not None:
                    prompt_lps[i] = update.prompt_logprobs
                choices = []
                for delta in update.outputs:
                    idx = i * n + delta.index
                    if echo_only:
                        delta.text, delta.token_ids, delta.logprobs = "", [], []
                    text, logprobs, prompt_part = delta.text, None, None
                    if not echoed[idx]:
                        text, echoed[idx] = echo[i] + text, True
                        if start is not None:  # the prompt's logprobs come first, in the first chunk
                            prompt_part = builders[idx].build_prompt(prompts[i]["prompt_token_ids"], prompt_lps[i] or [])
                    if req.logprobs is not None:
                        logprobs = builders[idx].build(delta.token_ids, delta.logprobs or [])
                        if prompt_part is not None:
                            logprobs = _concat(prompt_part, logprobs)
                    num_completion += len(delta.token_ids)
                    choices.append({"index": idx, "text": text, "logprobs": logprobs,
                                    "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason})
                if choices:
                    chunk = dict(base, choices=choices)
                    if continuous:  # vLLM's continuous_usage_stats: usage so far on every chunk
                        chunk["usage"] = usage(sum(num_prompt), num_completion, sum(num_cached))
                    elif include_usage:
                        chunk["usage"] = None
                    yield sse(chunk)
            if include_usage:
                yield sse(dict(base, choices=[], usage=usage(sum(num_prompt), num_completion, sum(num_cached))))
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


def _concat(first: dict[str, list], second: dict[str, list]) -> dict[str, list]:
    return {key: first[key] + second[key] for key in first}
