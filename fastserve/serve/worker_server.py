"""The HTTP server of a model served by one batching worker instead of the decode engine (encoders' embeddings,
encoder–decoders' translations): the generation Server's socket, uvicorn, signals and shutdown (start / run / stop),
its own Prometheus registry, /v1/models, /health and /metrics; a subclass adds its POST routes and its batch run.
"""
from __future__ import annotations

import time
from abc import ABCMeta, abstractmethod
from typing import Any, Callable, Hashable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response
from starlette.routing import Route

from fastserve.config import ServeConfig
from fastserve.serve.asgi import guard, json_response
from fastserve.serve.batcher import Batcher
from fastserve.serve.server import Server


class WorkerServer(Server, metaclass=ABCMeta):
    kind = "worker"          # what /health reports

    def __init__(self, cfg: ServeConfig | None, model_name: str, shutdown_grace_s: float):
        self.cfg, self.model_name = cfg or ServeConfig(), model_name
        self.created = int(time.time())
        self.url: str | None = None
        self.shutdown_grace_s = shutdown_grace_s
        self._in_flight: set = set()           # the generation server's; nothing is ever in it here
        self._uvicorn: Any = None
        self._thread: Any = None
        self._batcher: Batcher | None = None   # started with the server, after the warm-up compile
        self.registry = CollectorRegistry()
        self.http = Counter("fastserve_http_requests", "HTTP requests by path and status code", ["path", "status"],
                            registry=self.registry)

    def _serve_routes(self, posts: Sequence[tuple[str, Callable]]) -> None:
        """The ASGI app: `posts` [(path, handler)] plus the common GET routes, behind the API-key / body guard."""
        routes = [Route(path, handler, methods=["POST"]) for path, handler in posts] + [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"])]
        starlette = Starlette(routes=routes, exception_handlers={HTTPException: self._http_error})
        paths = (*(path for path, _ in posts), "/v1/models", "/health", "/metrics")
        self.app = guard(starlette, self.cfg.api_key, self.http, paths)

    @abstractmethod
    def _max_len(self) -> int:
        """The longest input, in tokens, that /v1/models advertises."""

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "fastserve",
                "max_model_len": self._max_len()}

    def _health(self) -> dict[str, Any]:
        return {}

    async def health(self, request: HTTPRequest) -> Response:
        return json_response(200, {"status": "ok", "model": self.model_name, "kind": self.kind, **self._health()})

    async def prometheus(self, request: HTTPRequest) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    # -- serving: the generation server's start / run / stop, with the batch worker in place of the engine

    def _warm_up(self) -> None:
        """Compiles what the first request would (before the server accepts any)."""

    @abstractmethod
    def _run_batch(self, key: Hashable, items: list) -> Sequence:
        """The results of one batch run: `items` of requests that share `key`, one result per item."""

    def _start_batcher(self, max_items: int) -> None:
        self._batcher = Batcher(self._run_batch, max_items=max_items, name=f"fastserve-{self.kind}")

    async def _submit(self, items: list, key: Hashable = None) -> Sequence:
        if self._batcher is None:      # an app driven without start() (tests with an ASGI client)
            self._start_batcher(self.max_items)
        return await self._batcher.submit(items, key)

    max_items = 256

    def _begin(self) -> None:
        self._warm_up()
        self._start_batcher(self.max_items)

    def _end(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
