"""The HTTP server: an OpenAI-compatible API (Starlette on uvicorn) around one Engine on its background thread.

  POST /v1/completions        prompt: a string, strings, token ids (one choice per prompt); `stream: true` → SSE
  POST /v1/chat/completions   messages, rendered with the model's chat template (400 if it has none)
  GET  /v1/models[/{id}]      the one served model
  GET  /health                200 while the engine runs (never needs the API key)
  GET  /metrics               Prometheus text: queue, slots, TTFT / TPOT / E2E histograms, requests by status, ...

Each prompt becomes one engine Request whose `on_token` / `on_finish` callbacks (engine thread) hand the tokens to
the event loop; the text goes through `api.TextStream` (stop strings, incomplete characters held back). A client
that disconnects cancels its requests, which frees their slots at the engine's next iteration. A batch of prompts
is queued whole or not at all (400 when it exceeds serve.max_queue, 429 when the free places cannot take it now).
POST bodies must be declared `Content-Type: application/json` (415 otherwise: a web page's "simple" cross-origin
request, sent without a CORS preflight, cannot make a local server generate). SIGTERM / SIGINT shut down
gracefully: requests in flight are answered, the engine stops, the process exits 0. Protocol rules (validation,
bodies) live in fastserve/serve/api.py, the ASGI plumbing (responses, API key, body limit) in asgi.py, the metrics
in metrics.py, the socket / uvicorn / signal lifecycle in http_service.py, the entry points in cli.py.

    python -m fastserve.serve --config configs/serve_quickstart.yaml [key=value ...]
    fastserve.deploy("configs/serve_quickstart.yaml", block=False)  → handle with .url and .stop()
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response
from starlette.routing import Route

from fastserve.config import ServeConfig
from fastserve.serve import api
from fastserve.serve.api import APIError
from fastserve.serve.asgi import SSEResponse, disconnected, error_response, guard, json_response, read_body
from fastserve.serve.engine import Engine, QueueFull, Request
from fastserve.serve.http_service import HTTPService
from fastserve.serve.metrics import Metrics

_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16      # OpenAI's default for /v1/completions; chat defaults to the room left


# ----------------------------------------------------------------------------------------------- the app

@dataclass
class _Choice:
    req: Request
    text: api.TextStream
    reason: str | None = None       # set once the choice is complete (stop | length | error)
    tokens: int = 0                 # completion tokens counted for usage


class Server(HTTPService):
    """The OpenAI-compatible app over `engine` (which this server starts and stops) and `loaded`'s tokenizer.

    `start()` serves on a background thread (returns self: `.url`, `.stop()`); `run()` serves in the foreground
    until SIGINT / SIGTERM. On shutdown (stop() or the signal) no new connection is accepted; requests in flight
    keep generating for `shutdown_grace_s`, then are cancelled and answered with the text they have."""

    def __init__(self, engine: Engine, loaded: Any, cfg: ServeConfig | None = None, model_name: str = "fastserve",
                 shutdown_grace_s: float = 5.0):
        self.engine, self.cfg = engine, cfg or engine.cfg     # not `loaded`: its weights are the engine's to keep
        self.model_name = model_name
        self.tokenizer = loaded.tokenizer
        self.chat_template = loaded.chat_template
        self.stop_ids = list(loaded.stop_ids)
        self.metrics = Metrics(engine)
        self.created = int(time.time())
        self.url: str | None = None
        self.shutdown_grace_s = shutdown_grace_s
        self._in_flight: set[Request] = set()        # submitted by a handler still running (event-loop thread)
        self._uvicorn: Any = None
        self._thread: threading.Thread | None = None
        routes = [Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.prometheus, methods=["GET"])]
        starlette = Starlette(routes=routes, exception_handlers={HTTPException: self._http_error})
        self.app = guard(starlette, self.cfg.api_key, self.metrics.http, _PATHS)

    async def _http_error(self, request: HTTPRequest, exc: HTTPException) -> Response:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        code = "not_found" if exc.status_code == 404 else None
        return json_response(exc.status_code, api.error_body(message, code=code), getattr(exc, "headers", None))

    # -- small endpoints
    async def health(self, request: HTTPRequest) -> Response:
        e = self.engine
        alive = e._thread is not None and e._thread.is_alive()
        body = {"status": "ok" if alive else "engine stopped", "model": self.model_name, "slots": e.slots,
                "pending": e.pending, "scheduler": e.scheduler.name}
        return json_response(200 if alive else 503, body)

    async def prometheus(self, request: HTTPRequest) -> Response:
        return Response(self.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "fastserve",
                "max_model_len": self.engine.max_len}

    async def models(self, request: HTTPRequest) -> Response:
        return json_response(200, {"object": "list", "data": [self._model_card()]})

    async def model(self, request: HTTPRequest) -> Response:
        if request.path_params["model"] != self.model_name:
            return error_response(self._unknown_model(request.path_params["model"]))
        return json_response(200, self._model_card())

    def _unknown_model(self, name: str) -> APIError:
        return APIError(404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                        param="model", code="model_not_found")

    # -- generation
    async def completions(self, request: HTTPRequest) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: HTTPRequest) -> Response:
        return await self._generate(request, chat=True)

    def _encode(self, parsed: api.ParsedRequest) -> list[list[int]]:
        tok = self.tokenizer
        if parsed.chat:
            if not self.chat_template or not hasattr(tok, "apply_chat_template"):
                raise APIError(400, f"the model '{self.model_name}' has no chat template: use /v1/completions",
                               param="messages", code="no_chat_template")
            try:
                text = tok.apply_chat_template(parsed.messages, add_generation_prompt=True)
            except Exception as e:  # the template's own checks (e.g. roles that must alternate)
                raise APIError(400, f"the chat template rejected the messages: {e}", param="messages",
                               code="invalid_value") from None
            return [tok.encode(text)]
        out = []
        bos = tok.bos_id >= 0 and getattr(tok, "add_bos", True)
        for p in parsed.prompts:
            if isinstance(p, str):
                p = ([tok.bos_id] if bos else []) + tok.encode(p)
            out.append(list(p))
        return out

    def _submit(self, parsed: api.ParsedRequest, prompts: list[list[int]], queue: asyncio.Queue) -> list[_Choice]:
        loop = asyncio.get_running_loop()
        s, eng = parsed.sampling, self.engine
        param = "messages" if parsed.chat else "prompt"

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:   # the event loop has closed (server stopped)
                pass

        choices: list[_Choice] = []
        stop_ids = [] if s.ignore_eos else self.stop_ids
        for i, ids in enumerate(prompts):
            max_new = s.max_tokens
            if max_new is None:
                room = eng.max_len - len(ids)
                max_new = max(1, min(self.cfg.max_new_tokens_limit, room if parsed.chat else
                                     min(COMPLETIONS_DEFAULT_MAX_TOKENS, room)))

            def on_finish(r: Request, i: int = i) -> None:
                self.metrics.observe(r)
                put((i, None))
            req = Request(ids, max_new_tokens=max_new, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                          seed=s.seed, stop_ids=stop_ids, on_token=lambda r, t, i=i: put((i, t)),
                          on_finish=on_finish)
            try:
                eng.check(req)
            except ValueError as e:
                raise APIError(400, str(e) + (f" (prompt {i})" if len(prompts) > 1 else ""), param=param,
                               code="invalid_value") from None
            choices.append(_Choice(req, api.TextStream(self.tokenizer.decode, s.stop, stop_ids)))
        try:        # the whole batch or nothing: a batch never holds queue places it then gives back
            self._in_flight.update(eng.submit_many([c.req for c in choices]))
        except ValueError as e:
            raise APIError(400, str(e), param=param, code="invalid_value") from None
        except QueueFull as e:
            raise APIError(429, f"the server is at capacity ({e}); retry later", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        return choices

    def _cancel(self, choices: Sequence[_Choice]) -> None:
        for c in choices:
            self._in_flight.discard(c.req)
            if not c.req.done:
                self.engine.cancel(c.req)

    def _cancel_in_flight(self) -> None:
        """Shutting down and the grace period is over: the engine stops the requests still generating; their
        handlers answer with the text so far (and, streamed, finish_reason and [DONE])."""
        for req in list(self._in_flight):
            self.engine.cancel(req)

    def _consume(self, c: _Choice, token: int | None) -> tuple[str, bool]:
        """One engine event for choice `c` → (new text, whether the choice just completed)."""
        if c.reason is not None:
            return "", False
        if token is None:           # the engine finished the request
            r = c.req.finish_reason
            c.reason = "error" if r == "error" else ("length" if r == "length" else "stop")
            text = "" if r == "error" else c.text.finish()
        else:
            c.tokens += 1
            text = c.text.add(token)
            if not c.text.stopped:
                return text, False
            c.reason = "stop"       # a stop string: the engine may stop now
            self.engine.cancel(c.req)
        self.metrics.finished.labels(c.reason).inc()
        return text, True

    async def _generate(self, request: HTTPRequest, chat: bool) -> Response:
        try:
            api.check_content_type(request.headers.get("content-type"))
            body = api.parse_json(await read_body(request, self.cfg.max_body_bytes))
            parsed = api.parse_chat(body, self.cfg.max_new_tokens_limit) if chat else \
                api.parse_completion(body, self.cfg.max_new_tokens_limit)
            if parsed.model is not None and parsed.model != self.model_name:
                raise self._unknown_model(parsed.model)
            if len(parsed.prompts) > self.cfg.max_queue:    # could never be queued at once: not worth a retry
                raise APIError(400, f"prompt has {len(parsed.prompts)} entries; this server queues at most "
                                    f"{self.cfg.max_queue} requests (serve.max_queue): send fewer per request",
                               param="prompt", code="batch_too_large")
            prompts = self._encode(parsed)
            queue: asyncio.Queue = asyncio.Queue()
            choices = self._submit(parsed, prompts, queue)
        except APIError as e:
            return error_response(e)
        rid, created = api.new_id(chat), api.now()
        prompt_tokens = sum(len(p) for p in prompts)
        if parsed.stream:
            async def run(receive: Any, send: Any) -> None:
                await self._stream(parsed, choices, queue, rid, created, prompt_tokens, receive, send)
            return SSEResponse(run)

        gone = asyncio.ensure_future(disconnected(request.receive))
        try:
            while any(c.reason is None for c in choices):
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    self.metrics.finished.labels("cancelled").inc(sum(c.reason is None for c in choices))
                    return Response(status_code=499)        # nobody reads it
                i, token = get.result()
                self._consume(choices[i], token)
        finally:
            gone.cancel()
            self._cancel(choices)
        failed = [c for c in choices if c.reason == "error"]
        if failed:
            return error_response(APIError(500, f"generation failed: {failed[0].req.error}", type="server_error",
                                           code="engine_error"))
        return json_response(200, api.completion_body(rid, self.model_name, created, chat,
                                                      [(c.text.text, c.reason) for c in choices], prompt_tokens,
                                                      sum(c.tokens for c in choices)))

    async def _stream(self, parsed: api.ParsedRequest, choices: list[_Choice], queue: asyncio.Queue, rid: str,
                      created: int, prompt_tokens: int, receive: Any, send: Any) -> None:
        chat, name = parsed.chat, self.model_name

        async def event(data: Any) -> None:
            await send({"type": "http.response.body", "body": api.sse(data), "more_body": True})

        gone = asyncio.ensure_future(disconnected(receive))
        try:
            if chat:
                for i in range(len(choices)):
                    await event(api.chunk_body(rid, name, created, chat, i, "", role=True))
            while any(c.reason is None for c in choices):
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():            # the client went away: the finally frees the slots
                    get.cancel()
                    self.metrics.finished.labels("cancelled").inc(sum(c.reason is None for c in choices))
                    return
                i, token = get.result()
                text, completed = self._consume(choices[i], token)
                if choices[i].reason == "error":
                    await event(api.error_body(f"generation failed: {choices[i].req.error}", "server_error",
                                               code="engine_error"))
                    break
                if text:
                    await event(api.chunk_body(rid, name, created, chat, i, text))
                if completed:
                    await event(api.chunk_body(rid, name, created, chat, i, None if chat else "", choices[i].reason))
            if parsed.include_usage:
                await event(api.usage_chunk(rid, name, created, chat, prompt_tokens, sum(c.tokens for c in choices)))
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        except OSError:   # the connection broke while writing
            pass
        finally:
            gone.cancel()
            self._cancel(choices)

    # what runs behind the HTTP server: the engine here; a subclass serving another kind of model overrides these
    def _begin(self) -> None:
        self.engine.start()

    def _end(self) -> None:
        self.engine.stop()

    def _banner(self) -> str:
        return (f"fastserve: serving '{self.model_name}' at {self.url} (OpenAI API under /v1; scheduler "
                f"{self.engine.scheduler.name}, {self.engine.slots} slots, buckets {self.engine.buckets}); "
                "Ctrl-C stops")
