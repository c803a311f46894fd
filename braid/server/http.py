"""HTTP plumbing shared by the routes: OpenAI-shaped errors, JSON and SSE responses, the API-key
middleware, and awaiting a request's work while watching for the client to leave."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from braid.errors import BraidError, InvalidRequestError

log = logging.getLogger("braid.server")
DISCONNECT_POLL_S = 0.5


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


_CODES = {401: "invalid_api_key", 404: "model_not_found"}


def error_response(status: int, message: str, kind: str, param: str | None = None) -> Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": _CODES.get(status)}}
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


def json_response(body: Any) -> Response:
    return Response(msgspec.json.encode(body), media_type="application/json")


def sse(chunks: AsyncIterator[Any]) -> StreamingResponse:
    async def frames() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(chunks):
            try:
                async for chunk in chunks:
                    yield b"data: " + msgspec.json.encode(chunk) + b"\n\n"
            except BraidError as exc:  # the status line is sent already: report in-band, as OpenAI does
                yield b"data: " + msgspec.json.encode({"error": {"message": str(exc), "type": _kind(exc)}}) + b"\n\n"
            except Exception as exc:
                log.exception("stream failed")
                yield b"data: " + msgspec.json.encode({"error": {"message": f"internal error: {exc!r}",
                                                                 "type": "internal_error"}}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream")


class ApiKeyMiddleware:
    """With an API key set, every route but /health needs ``Authorization: Bearer KEY`` (401)."""

    def __init__(self, app, api_key: str | None) -> None:
        self.app = app
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if self.expected is not None and scope["type"] == "http" and scope["path"] != "/health":
            scheme, _, key = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.expected):
                response = error_response(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                          "authentication_error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _kind(exc: BraidError) -> str:
    return "invalid_request_error" if exc.http_status == 400 else "server_error"


def add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's error body; an unexpected one is that request's 500 only."""

    @app.exception_handler(HTTPError)
    async def on_http_error(request: Request, exc: HTTPError) -> Response:
        return error_response(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(BraidError)
    async def on_braid_error(request: Request, exc: BraidError) -> Response:
        param = exc.field if isinstance(exc, InvalidRequestError) else None
        return error_response(exc.http_status, str(exc), _kind(exc), param)

    @app.exception_handler(StarletteHTTPException)
    async def on_route_error(request: Request, exc: StarletteHTTPException) -> Response:  # 404, 405, ...
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> Response:  # that request's 500, not the server's end
        log.error("request failed: %r", exc, exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


async def until_done_or_gone(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``; if the client disconnects first, cancel it (the engine aborts)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise HTTPError(499, "client disconnected", "client_closed_request")
    finally:  # also when this handler itself is cancelled (shutdown)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
