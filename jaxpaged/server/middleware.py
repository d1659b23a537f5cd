"""Pure-ASGI guards in front of the routes: bearer-token auth and the request-body size cap.

Pure ASGI (not ``BaseHTTPMiddleware``) so streaming responses and disconnect detection pass
through untouched. Auth runs first, so an unauthenticated client cannot make the server buffer a
body; the size cap checks ``Content-Length`` up front and counts chunked bodies as they arrive.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Awaitable, Callable

from jaxpaged.server.errors import error_body

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_error(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


class BearerAuthMiddleware:
    """Requires ``Authorization: Bearer <key>`` on every path except ``public_paths``."""

    def __init__(self, app: ASGIApp, api_key: str, public_paths: frozenset[str]) -> None:
        self.app = app
        self._key = api_key.encode("utf-8")
        self._public = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._public or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        await send_error(send, 401, error_body(
            "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'.",
            "authentication_error", None, "invalid_api_key"), [(b"www-authenticate", b"Bearer")])

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                # compare_digest: the time taken does not depend on how much of the key matched
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False


class BodyLimitMiddleware:
    """Answers 413 for a body over ``max_bytes`` before the route sees it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit():
                    await send_error(send, 400, error_body("invalid Content-Length header", "invalid_request_error"))
                    return
                if int(value) > self.max_bytes:
                    await self._too_large(send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notifications

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        await send_error(send, 413, error_body(
            f"request body is larger than the server's limit of {self.max_bytes} bytes "
            f"(--max-request-body-bytes)", "invalid_request_error", None, "request_too_large"))
