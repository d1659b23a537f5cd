"""The client side of one engine request: ``RequestStream`` (an async iterator on the client's
event loop) and the deltas it yields (``RequestUpdate`` of ``OutputDelta``s)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, AsyncIterator, Protocol


class _Aborter(Protocol):
    def abort(self, request_id: str) -> None: ...


@dataclasses.dataclass
class OutputDelta:
    """What one of a request's ``n`` sequences produced since the last update."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Any]] | None  # per new token: {token id: Logprob}
    finish_reason: str | None
    stop_reason: int | str | None


@dataclasses.dataclass
class RequestUpdate:
    request_id: str
    num_prompt_tokens: int
    outputs: list[OutputDelta]
    finished: bool
    # Once, with (or before) the first token, when the request asked for prompt logprobs:
    # per prompt token {token id: Logprob}, None for the first token.
    prompt_logprobs: list[dict[int, Any] | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens the prefix cache held when the request was admitted
    # On the final update of a request the engine finished because a step failed on it: why. The
    # engine client turns such an update into ``RequestFailedError`` for the stream.
    error: str | None = None


class RequestStream:
    """The client side of one engine request: an async iterator of ``RequestUpdate``."""

    def __init__(self, owner: _Aborter, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.loop = loop
        self.arrival = time.monotonic()
        self.finished = False
        self._owner = owner
        self._queue: asyncio.Queue[RequestUpdate | BaseException] = asyncio.Queue()
        self._ack: asyncio.Future[None] = loop.create_future()

    def __aiter__(self) -> AsyncIterator[RequestUpdate]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestUpdate]:
        while not self.finished:
            item = await self._queue.get()
            # A consumer that fell behind (slow client, busy event loop) takes everything queued
            # as one update, so it catches up in one chunk instead of one per engine step.
            while isinstance(item, RequestUpdate) and not item.finished and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if isinstance(nxt, BaseException):
                    self._queue.put_nowait(nxt)  # hand out what arrived before the error first
                    break
                item = _merge(item, nxt)
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            self.finished = item.finished
            yield item

    def close(self) -> None:
        """Aborts the engine request unless it finished; safe to call more than once."""
        if not self.finished:
            self.finished = True
            self._owner.abort(self.request_id)

    # Called on the stream's loop (scheduled from the engine thread).
    def _put(self, item: RequestUpdate | BaseException) -> None:
        self._queue.put_nowait(item)

    def _settle_ack(self, exc: BaseException | None) -> None:
        if self._ack.done():
            return
        if exc is None:
            self._ack.set_result(None)
        else:
            self._ack.set_exception(exc)


def _merge(a: RequestUpdate, b: RequestUpdate) -> RequestUpdate:
    """``a`` then ``b`` as one update (deltas of the same sequence concatenated, in order)."""
    by_index = {d.index: d for d in a.outputs}
    for d in b.outputs:
        prev = by_index.get(d.index)
        if prev is None:
            by_index[d.index] = d
            continue
        by_index[d.index] = OutputDelta(
            index=d.index, text=prev.text + d.text, token_ids=prev.token_ids + d.token_ids,
            logprobs=(prev.logprobs or []) + (d.logprobs or []) if (prev.logprobs is not None or d.logprobs is not None) else None,
            finish_reason=d.finish_reason, stop_reason=d.stop_reason)
    return RequestUpdate(b.request_id, b.num_prompt_tokens, sorted(by_index.values(), key=lambda d: d.index),
                         b.finished, a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
                         max(a.num_cached_tokens, b.num_cached_tokens), b.error)
