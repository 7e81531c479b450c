"""OpenAI-compatible `POST /v1/embeddings` for encoder models (an imported BERT such as all-MiniLM-L6-v2, or a
trained `model.name: encoder` work dir): mean-pooled, L2-normalized sentence embeddings.

  input             a string, an array of strings, an array of token ids, or an array of such arrays (≤ 2048)
  encoding_format   float (default) | base64 (little-endian float32 bytes, what the official client asks for)
  dimensions        accepted only as the model's own dimension (embeddings are not truncated)
  model, user       the served model's id (404 for another) / ignored

Each input becomes `[CLS] pieces [SEP]`; one longer than `embed.max_len` tokens is refused (400,
context_length_exceeded) rather than silently cut, as OpenAI does. `usage.prompt_tokens` counts the tokens embedded,
[CLS] and [SEP] included. Inputs run on one worker thread (one JAX program at a time) in batches of
`embed.batch_size`, padded to `serve.buckets`, every bucket compiled at start-up. Requests that arrive while the
worker is busy are batched together (fastserve/serve/batcher.py): the next run takes every waiting request's inputs, up to
`MAX_INPUTS`, so concurrent small requests share padded batches instead of each filling its own.

`EmbeddingServer` is the HTTP server of an encoder: the generation server's socket, uvicorn and shutdown handling
(fastserve/serve/server.py) around these routes, /v1/models, /health and /metrics, with no decode engine.
"""
from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import Counter, Histogram
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from fastserve.config import ServeConfig
from fastserve.serve import api
from fastserve.serve.api import APIError
from fastserve.serve.asgi import error_response, json_response, read_body
from fastserve.serve.worker_server import WorkerServer

MAX_INPUTS = 2048          # OpenAI's limit on inputs per request
ENCODING_FORMATS = ("float", "base64")


@dataclass
class EmbeddingsRequest:
    inputs: list[str | list[int]]
    encoding_format: str
    model: str | None


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def parse_embeddings(body: dict[str, Any], dimension: int) -> EmbeddingsRequest:
    """Validates a /v1/embeddings body (400 naming the parameter on anything wrong)."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise api._type_error("model", "a string", model)
    if "input" not in body or body["input"] is None:
        raise APIError(400, "'input' is required", param="input", code="missing_required_parameter")
    value = body["input"]
    if isinstance(value, str) or _is_ids(value):
        inputs: list = [value]
    elif isinstance(value, list) and value and all(isinstance(x, str) or _is_ids(x) for x in value):
        inputs = list(value)
    elif value == [] or value == [[]]:
        raise api._invalid("input", "'input' is empty")
    else:
        raise api._type_error("input", "a string, an array of strings, an array of token ids, or an array of token "
                              "id arrays", value)
    empty = [i for i, x in enumerate(inputs) if isinstance(x, str) and not x.strip()]
    if empty:
        where = "" if len(inputs) == 1 else f" (input {empty[0]})"
        raise api._invalid("input", f"'input' is an empty string{where}: there is nothing to embed")
    if len(inputs) > MAX_INPUTS:
        raise api._invalid("input", f"'input' has {len(inputs)} entries; at most {MAX_INPUTS} per request")
    fmt = body.get("encoding_format", "float")
    if fmt is None:
        fmt = "float"
    if not isinstance(fmt, str) or fmt not in ENCODING_FORMATS:
        raise api._invalid("encoding_format", f"'encoding_format' must be float or base64, got {fmt!r}")
    dims = api._int(body, "dimensions", None)
    if dims is not None and dims != dimension:
        raise api._invalid("dimensions", f"this model's embeddings have {dimension} dimensions and are not "
                           f"truncated; 'dimensions' must be {dimension} or absent, got {dims}")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise api._type_error("user", "a string", user)
    return EmbeddingsRequest(inputs, fmt, model)


def embeddings_body(model: str, vectors: np.ndarray, encoding_format: str, prompt_tokens: int) -> dict[str, Any]:
    def encode(v: np.ndarray) -> Any:
        if encoding_format == "base64":
            return base64.b64encode(np.asarray(v, "<f4").tobytes()).decode("ascii")
        return [float(x) for x in v]
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


class EmbeddingServer(WorkerServer):
    """The OpenAI-compatible HTTP server of an encoder (`runner`: a fastserve.generation.encoders.EncoderRunner).
    `start()` / `run()` / `stop()` as the generation Server's."""
    kind = "embeddings"
    max_items = MAX_INPUTS

    def __init__(self, runner: Any, cfg: ServeConfig | None = None, model_name: str = "fastserve",
                 shutdown_grace_s: float = 5.0):
        super().__init__(cfg, model_name, shutdown_grace_s)
        self.runner = runner
        self.dimension = int(runner.cfg.d_model)
        r = self.registry
        self.inputs_total = Counter("fastserve_embedding_inputs", "Inputs embedded", registry=r)
        self.tokens_total = Counter("fastserve_prompt_tokens", "Tokens embedded", registry=r)
        self.latency = Histogram("fastserve_embeddings_latency_seconds", "Request arrival to response",
                                 registry=r)
        self.runs = Counter("fastserve_embedding_runs", "Embedding runs (each may serve several requests)",
                            registry=r)
        self._serve_routes([("/v1/embeddings", self.embeddings), ("/v1/completions", self.not_a_language_model),
                            ("/v1/chat/completions", self.not_a_language_model)])

    def _max_len(self) -> int:
        return self.runner.max_len

    def _health(self) -> dict[str, Any]:
        return {"dimension": self.dimension}

    async def not_a_language_model(self, request: HTTPRequest) -> Response:
        return error_response(APIError(400, f"the model '{self.model_name}' is an encoder: it embeds text and does "
                                            "not generate it; use POST /v1/embeddings", code="unsupported_endpoint"))

    def _wrap(self, req: EmbeddingsRequest) -> list[list[int]]:
        """`[CLS] pieces [SEP]` of every input; 400 for a token id outside the vocabulary or an input too long."""
        tok, vocab, limit = self.runner.tokenizer, self.runner.cfg.vocab_size, self.runner.max_len
        out = []
        for i, item in enumerate(req.inputs):
            where = f"input {i}" if len(req.inputs) > 1 else "the input"
            ids = tok.encode(item) if isinstance(item, str) else item
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise api._invalid("input", f"{where} has token id {bad[0]} outside the vocabulary [0, {vocab})")
            if len(ids) + 2 > limit:
                raise APIError(400, f"this model embeds at most {limit} tokens, [CLS] and [SEP] included; {where} "
                                    f"has {len(ids) + 2}: shorten it", param="input", code="context_length_exceeded")
            out.append([tok.cls_id, *ids, tok.sep_id])
        return out

    async def embeddings(self, request: HTTPRequest) -> Response:
        t0 = time.perf_counter()
        try:
            api.check_content_type(request.headers.get("content-type"))
            body = api.parse_json(await read_body(request, self.cfg.max_body_bytes))
            req = parse_embeddings(body, self.dimension)
            if req.model is not None and req.model != self.model_name:
                raise APIError(404, f"the model '{req.model}' does not exist; this server serves "
                                    f"'{self.model_name}'", param="model", code="model_not_found")
            wrapped = self._wrap(req)
        except APIError as e:
            return error_response(e)
        vectors = await self._submit(wrapped)
        tokens = sum(len(w) for w in wrapped)
        self.inputs_total.inc(len(wrapped))
        self.tokens_total.inc(tokens)
        self.latency.observe(time.perf_counter() - t0)
        return json_response(200, embeddings_body(self.model_name, vectors, req.encoding_format, tokens))

    # -- the batch worker

    def _warm_up(self) -> None:
        """Compiles every bucket (at the runner's batch size) before the server accepts requests."""
        for bucket in self.runner.buckets:
            self.runner.embed_wrapped([[0] * bucket])

    def _run_batch(self, key: None, wrapped: list[list[int]]) -> np.ndarray:
        self.runs.inc()
        return self.runner.embed_wrapped(wrapped)

    def _banner(self) -> str:
        return (f"fastserve: serving '{self.model_name}' embeddings at {self.url} (POST /v1/embeddings; dimension "
                f"{self.dimension}, buckets {self.runner.buckets}); Ctrl-C stops")
