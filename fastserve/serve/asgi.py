"""ASGI plumbing under the HTTP server (fastserve/serve/server.py), free of the engine and of the OpenAI rules:
JSON and server-sent-event responses, the client-disconnect watch, a size-capped body read, and the middleware that
checks the API key and counts the responses by path and status."""
from __future__ import annotations

import hmac
from typing import Any, Sequence

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from fastserve.serve.api import APIError


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def error_response(e: APIError) -> JSONResponse:
    return json_response(e.status, e.body(), e.headers)


async def disconnected(receive: Any) -> None:
    """Returns when the client has gone (after the request body was read, receive() only reports that)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class SSEResponse(Response):
    """Server-sent events written by `run(receive, send)`; the client's disconnect is watched by `run` itself."""

    media_type = "text/event-stream"

    def __init__(self, run: Any):
        self.status_code, self.background, self._run = 200, None, run
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await self._run(receive, send)


async def read_body(request: HTTPRequest, limit: int) -> bytes:
    """The request body; 413 once it exceeds `limit` bytes (by its Content-Length, or while it streams in)."""
    too_big = APIError(413, f"the request body exceeds serve.max_body_bytes={limit} bytes",
                       code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def guard(inner: Any, api_key: str, requests: Any, paths: Sequence[str]) -> Any:
    """Middleware around the app `inner`: every HTTP response counted in `requests` (a Prometheus counter labelled
    by path, one of `paths` or "other", and status); a 401 unless the request carries `Authorization: Bearer
    api_key`, when there is a key (/health never needs it)."""
    key = api_key.encode()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await inner(scope, receive, send)
        path = scope["path"]
        label = next((p for p in paths if path == p or path.startswith(p + "/")), "other")

        async def counted_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                requests.labels(label, str(message["status"])).inc()
            await send(message)

        if key and path != "/health":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, key):
                msg = "missing API key: send 'Authorization: Bearer KEY'" if not auth else "invalid API key"
                resp = error_response(APIError(401, msg, code="invalid_api_key",
                                               headers={"WWW-Authenticate": "Bearer"}))
                return await resp(scope, receive, counted_send)
        await inner(scope, receive, counted_send)
    return app
