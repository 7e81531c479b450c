"""OpenAI-style `POST /v1/completions` for encoder–decoder (seq2seq) models: each prompt is a source sentence,
each choice its translation.

  prompt        a string or an array of strings (≤ MAX_SOURCES), each one source sentence
  max_tokens    target tokens at most (default and limit: the model's max_target_len); finish_reason "length"
                when a translation was cut, else "stop"
  best_of       beam size (default 1: greedy; as in OpenAI's legacy API, the best of N hypotheses is returned)
  temperature, top_p, top_k, seed   sampling (with best_of 1); temperature 0 (the default here) is greedy
  model, user, n=1, echo=false, logprobs=null   as OpenAI's; `stream` is refused (400): a translation is returned
                whole, since beam search only knows its best hypothesis at the end

A source longer than the model's max_source_len or an empty one is a 400 naming it. Requests are decoded on one
worker thread in batches of `serve.slots` sentences (one compiled program per decoding setting, compiled on first
use; greedy at start-up); concurrent requests with the same settings share batches (fastserve.serve.batcher).
`/v1/chat/completions` answers 400: a translation model has no chat template.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
from prometheus_client import Counter, Histogram
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from fastserve.config import ServeConfig
from fastserve.generation.translation import DecodeSettings, decode_program, encode_sources
from fastserve.serve import api
from fastserve.serve.api import APIError
from fastserve.serve.asgi import error_response, json_response, read_body
from fastserve.serve.worker_server import WorkerServer

MAX_SOURCES = 256
MAX_BEAM = 8


class Translator:
    """Source texts → (target token lists) with a loaded seq2seq model, in fixed-shape batches of `batch_size`."""

    def __init__(self, loaded: Any, tokenizer: Any, batch_size: int):
        self.loaded, self.tok, self.batch_size = loaded, tokenizer, batch_size
        self.max_source_len = int(loaded.model_cfg.max_source_len)
        self.max_target_len = int(loaded.model_cfg.max_target_len)

    def check(self, texts: Sequence[str]) -> list[int]:
        """Each text's source length in tokens; ValueError naming an empty or over-long one."""
        src, mask = encode_sources(self.tok, texts, self.max_source_len)
        return [int(m.sum()) for m in mask]

    def run(self, settings: DecodeSettings, texts: Sequence[str], seed: int = 0) -> list[tuple[list[int], bool]]:
        """(target tokens before the end token, whether the end token came) of each text."""
        import jax

        from fastserve import parallel
        program = decode_program(self.loaded.graphdef, settings, self.max_target_len, self.tok.bos_id,
                                 self.tok.eos_id, self.tok.pad_id)
        src, mask = encode_sources(self.tok, texts, self.max_source_len)
        out: list[tuple[list[int], bool]] = []
        rng = jax.random.key(seed)
        for start in range(0, len(texts), self.batch_size):
            n = min(self.batch_size, len(texts) - start)
            b_src = np.zeros((self.batch_size, self.max_source_len), np.int32)
            b_mask = np.zeros((self.batch_size, self.max_source_len), bool)
            b_src[:n], b_mask[:n] = src[start:start + n], mask[start:start + n]
            g = parallel.host_to_global({"src": b_src, "src_mask": b_mask}, self.loaded.mesh)
            rng, sub = jax.random.split(rng)
            with jax.set_mesh(self.loaded.mesh):
                tokens = np.asarray(program(self.loaded.params, g["src"], g["src_mask"], sub))
            for row in tokens[:n].tolist():
                ended = self.tok.eos_id in row
                out.append((row[:row.index(self.tok.eos_id)] if ended else row, ended))
        return out


def _settings(body: dict[str, Any], sampling: api.Sampling) -> DecodeSettings:
    beam = body.get("best_of", 1)
    if not isinstance(beam, int) or isinstance(beam, bool):
        raise api._type_error("best_of", "an integer", beam)
    if not 1 <= beam <= MAX_BEAM:
        raise api._invalid("best_of", f"'best_of' (the beam size) must be in [1, {MAX_BEAM}], got {beam}")
    if beam > 1 and sampling.temperature > 0:
        raise api._invalid("best_of", "'best_of' > 1 runs beam search, which does not sample: set temperature 0")
    return DecodeSettings(beam_size=beam, temperature=sampling.temperature, top_k=sampling.top_k,
                          top_p=sampling.top_p)


class TranslationServer(WorkerServer):
    """The HTTP server of a seq2seq model (`translator`: a Translator). `start()` / `run()` / `stop()` as the
    generation Server's."""
    kind = "translation"
    max_items = MAX_SOURCES

    def __init__(self, translator: Translator, cfg: ServeConfig | None = None, model_name: str = "fastserve",
                 shutdown_grace_s: float = 5.0):
        super().__init__(cfg, model_name, shutdown_grace_s)
        self.translator = translator
        r = self.registry
        self.sources_total = Counter("fastserve_translated_sentences", "Source sentences translated", registry=r)
        self.prompt_tokens = Counter("fastserve_prompt_tokens", "Source tokens", registry=r)
        self.completion_tokens = Counter("fastserve_completion_tokens", "Target tokens", registry=r)
        self.latency = Histogram("fastserve_translation_latency_seconds", "Request arrival to response", registry=r)
        self.runs = Counter("fastserve_translation_runs", "Decoding runs (each may serve several requests)",
                            registry=r)
        self._serve_routes([("/v1/completions", self.completions), ("/v1/chat/completions", self.no_chat)])

    def _max_len(self) -> int:
        return self.translator.max_source_len

    async def no_chat(self, request: HTTPRequest) -> Response:
        return error_response(APIError(400, f"the model '{self.model_name}' is a translation (encoder–decoder) "
                                            "model without a chat template: POST /v1/completions with the source "
                                            "sentences as 'prompt'", code="unsupported_endpoint"))

    def _parse(self, body: dict[str, Any]) -> tuple[api.ParsedRequest, DecodeSettings, int]:
        limit = self.translator.max_target_len
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > limit:
            raise api._invalid("max_tokens", f"'max_tokens'={max_tokens} exceeds this model's target length "
                                             f"(max_target_len={limit})")
        # best_of is the beam size here (the generation server accepts only 1); greedy unless told otherwise
        parsed = api.parse_completion({"temperature": 0, **{k: v for k, v in body.items() if k != "best_of"}}, limit)
        if parsed.model is not None and parsed.model != self.model_name:
            raise self._unknown_model(parsed.model)
        if parsed.stream:
            raise api._invalid("stream", "this translation model returns each translation whole (beam search knows "
                                         "its best hypothesis only at the end): set 'stream' to false")
        if parsed.sampling.stop:
            raise api._invalid("stop", "'stop' is not supported by a translation model (it stops at its end token)")
        if any(not isinstance(p, str) for p in parsed.prompts):
            raise api._type_error("prompt", "a string or an array of strings (source sentences)", body["prompt"])
        if len(parsed.prompts) > MAX_SOURCES:
            raise api._invalid("prompt", f"{len(parsed.prompts)} source sentences; at most {MAX_SOURCES} per request")
        return parsed, _settings(body, parsed.sampling), parsed.sampling.max_tokens or limit

    async def completions(self, request: HTTPRequest) -> Response:
        t0 = time.perf_counter()
        try:
            api.check_content_type(request.headers.get("content-type"))
            body = api.parse_json(await read_body(request, self.cfg.max_body_bytes))
            parsed, settings, max_tokens = self._parse(body)
            try:
                source_lengths = self.translator.check(parsed.prompts)
            except ValueError as e:
                raise APIError(400, str(e).replace("source sentence", "prompt"), param="prompt",
                               code="context_length_exceeded" if "longer" in str(e) else None) from e
        except APIError as e:
            return error_response(e)
        seed = parsed.sampling.seed if settings.temperature > 0 else 0   # greedy and beam requests share runs
        rows = await self._submit(list(parsed.prompts), key=(settings, seed))
        choices, completion = [], 0
        for row, ended in rows:
            cut = len(row) > max_tokens or not ended     # cut by max_tokens, or by the model's target length
            row = row[:max_tokens]
            completion += len(row)
            choices.append((self.translator.tok.decode(row), "length" if cut else "stop"))
        self.sources_total.inc(len(rows))
        self.prompt_tokens.inc(sum(source_lengths))
        self.completion_tokens.inc(completion)
        self.latency.observe(time.perf_counter() - t0)
        return json_response(200, api.completion_body(api.new_id(False), self.model_name, api.now(), False, choices,
                                                      sum(source_lengths), completion))

    # -- the batch worker

    def _warm_up(self) -> None:
        self.translator.run(DecodeSettings(), ["a"])      # compiles greedy decoding before requests are accepted

    def _run_batch(self, key: Any, texts: list[str]) -> list[tuple[list[int], bool]]:
        self.runs.inc()
        settings, seed = key
        return self.translator.run(settings, texts, seed)

    def _banner(self) -> str:
        return (f"fastserve: serving '{self.model_name}' translations at {self.url} (POST /v1/completions; "
                f"batches of {self.translator.batch_size}, sources up to {self.translator.max_source_len} tokens); "
                "Ctrl-C stops")
