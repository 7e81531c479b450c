"""The OpenAI-compatible protocol of the HTTP server: request validation, response and chunk bodies, stop strings.

Pure Python (no web framework, no JAX), so that every rule is unit-testable on its own. `fastserve.serve.server`
wires it to the engine. Every refusal is an `APIError`, rendered as OpenAI's error body
`{"error": {"message", "type", "param", "code"}}` with an HTTP status.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

_MAX_STOP_STRINGS = 16
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")   # passed to the model's chat template as they are


class APIError(Exception):
    """A refused request: HTTP status + OpenAI error fields. `headers` go on the response (e.g. Retry-After)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def check_content_type(value: str | None) -> None:
    """A POST body must be declared `application/json` (parameters allowed; a charset only utf-8): 415 otherwise.
    (A `text/plain` or form body is a "simple" cross-origin request, sent by any web page without a CORS
    preflight: refusing it keeps pages from making a local server generate.)"""
    media, _, params = (value or "").partition(";")
    if media.strip().lower() != "application/json":
        got = f"got '{value}'" if value else "the request has no Content-Type header"
        raise APIError(415, f"the request body must be JSON sent with 'Content-Type: application/json'; {got}",
                       code="unsupported_media_type")
    for param in params.split(";"):
        name, _, v = param.partition("=")
        if name.strip().lower() == "charset" and v.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise APIError(415, f"the request body must be UTF-8 JSON ('Content-Type: application/json' or "
                                f"'application/json; charset=utf-8'); got '{value}'", code="unsupported_media_type")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (400 naming the problem otherwise)."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not UTF-8 text", code="invalid_json") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_json_type(body)}", code="invalid_json")
    return body


# ------------------------------------------------------------------------------------------- validation

def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _type_error(param: str, expected: str, value: Any) -> APIError:
    return APIError(400, f"'{param}' must be {expected}, got {_json_type(value)} {json.dumps(value)[:80]}",
                    param=param, code="invalid_type")


def _int(body: dict, name: str, default: Any) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _type_error(name, "an integer", v)
    return v


def _number(body: dict, name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _type_error(name, "a number", v)
    return float(v)


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _type_error(name, "a boolean", v)
    return v


def _invalid(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


@dataclass
class Sampling:
    """What one choice is generated with (temperature 0: greedy; top_k 0 / top_p 1: off)."""
    max_tokens: int | None          # None: the endpoint's default
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False        # vLLM's extension: generate max_tokens whatever end-of-text tokens come


@dataclass
class ParsedRequest:
    """A validated /v1/completions or /v1/chat/completions body. `prompts`: strings or token-id lists (one choice
    each); `messages` for chat."""
    chat: bool
    model: str | None
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    prompts: list[str | list[int]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)


def _sampling(body: dict, max_tokens_limit: int, chat: bool) -> Sampling:
    n = _int(body, "n", 1)
    if n != 1:
        raise APIError(400, f"n={n} is not supported: this server returns one choice per prompt (n must be 1)",
                       param="n", code="unsupported_value")
    best_of = _int(body, "best_of", 1)
    if best_of != 1:
        raise APIError(400, f"best_of={best_of} is not supported (best_of must be 1)", param="best_of",
                       code="unsupported_value")
    for name in ("logprobs", "echo", "suffix", "top_logprobs", "tools", "functions", "logit_bias"):
        v = body.get(name)
        if v not in (None, False, {}, []):                      # (0 == False: logprobs=0 is "none" too)
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0) != 0.0:
            raise APIError(400, f"'{name}' is not supported by this server (only 0)", param=name,
                           code="unsupported_value")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise APIError(400, "'response_format' other than {\"type\": \"text\"} is not supported",
                       param="response_format", code="unsupported_value")

    name = "max_tokens"
    max_tokens = _int(body, "max_tokens", None)
    if max_tokens is None and chat:
        name, max_tokens = "max_completion_tokens", _int(body, "max_completion_tokens", None)
    if max_tokens is not None:
        if max_tokens < 1:
            raise _invalid(name, f"'{name}' must be at least 1, got {max_tokens}")
        if max_tokens > max_tokens_limit:
            raise _invalid(name, f"'{name}'={max_tokens} exceeds this server's limit of {max_tokens_limit} "
                                 f"(serve.max_new_tokens_limit)")
    temperature = _number(body, "temperature", 1.0)
    if not 0.0 <= temperature <= 2.0:
        raise _invalid("temperature", f"'temperature' must be in [0, 2], got {temperature}")
    top_p = _number(body, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise _invalid("top_p", f"'top_p' must be in (0, 1], got {top_p}")
    top_k = _int(body, "top_k", 0)
    if top_k < 0:
        raise _invalid("top_k", f"'top_k' must be >= 0 (0: off), got {top_k}")
    seed = _int(body, "seed", None)
    if seed is None:   # unseeded sampling differs between requests; greedy ignores the seed
        seed = secrets.randbelow(2 ** 31)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _type_error("stop", "a string or an array of strings", stop)
    if len(stop) > _MAX_STOP_STRINGS:
        raise _invalid("stop", f"'stop' has {len(stop)} strings; at most {_MAX_STOP_STRINGS} are allowed")
    if any(s == "" for s in stop):
        raise _invalid("stop", "'stop' strings must not be empty")
    return Sampling(max_tokens, temperature, top_p, top_k, seed, list(stop), _bool(body, "ignore_eos", False))


def _common(body: dict, chat: bool, max_tokens_limit: int) -> ParsedRequest:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _type_error("model", "a string", model)
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise _type_error("stream_options", "an object", opts)
        include_usage = _bool(opts, "include_usage", False)
    return ParsedRequest(chat, model, _sampling(body, max_tokens_limit, chat), stream, include_usage)


def parse_completion(body: dict[str, Any], max_tokens_limit: int) -> ParsedRequest:
    """POST /v1/completions: `prompt` is a string, an array of strings, an array of token ids, or an array of
    such arrays (one choice per prompt)."""
    req = _common(body, False, max_tokens_limit)
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "'prompt' is required", param="prompt", code="missing_required_parameter")

    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif is_ids(prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        prompts = list(prompt)
    elif prompt == []:
        raise _invalid("prompt", "'prompt' is empty")
    else:
        raise _type_error("prompt", "a string, an array of strings, or an array of token ids", prompt)
    if any(p == "" for p in prompts):
        raise _invalid("prompt", "'prompt' is empty" if len(prompts) == 1 else "'prompt' contains an empty string")
    req.prompts = prompts
    return req


def parse_chat(body: dict[str, Any], max_tokens_limit: int) -> ParsedRequest:
    """POST /v1/chat/completions: `messages` [{role, content}] with content a string or an array of text parts."""
    req = _common(body, True, max_tokens_limit)
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list):
        raise _type_error("messages", "an array of messages", messages)
    if not messages:
        raise _invalid("messages", "'messages' is empty")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _type_error(where, "an object with 'role' and 'content'", m)
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise _type_error(f"{where}.role", "a non-empty string", role)
        if role not in CHAT_ROLES:
            raise _invalid(f"{where}.role", f"{where}.role '{role[:40]}' is not supported: use one of "
                                            f"{', '.join(CHAT_ROLES)}")
        if isinstance(content, list):   # [{"type": "text", "text": ...}, ...]
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise APIError(400, f"{where}.content[{j}]: only text parts ({{\"type\": \"text\", \"text\": "
                                        f"...}}) are supported", param=f"{where}.content", code="unsupported_value")
                parts.append(part["text"])
            content = "".join(parts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise _type_error(f"{where}.content", "a string or an array of text parts", content)
        out.append({"role": role, "content": content})
    req.messages = out
    return req


# -------------------------------------------------------------------------------------------- stop text

class TextStream:
    """Detokenizes a growing list of token ids incrementally and applies stop strings to the text.

    `add(token)` returns the text that may be sent now: text that could still be the start of a stop string, and
    an incomplete UTF-8 character at the end, are held back. Once a stop string appears, `stopped` is set, the text
    is cut before it, and nothing more is released. `finish()` releases what was held back. Stop token ids are
    never part of the text."""

    def __init__(self, decode: Any, stop: Sequence[str] = (), stop_ids: Sequence[int] = ()):
        self._decode, self.stop, self._stop_ids = decode, list(stop), frozenset(stop_ids)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""          # the whole text so far (cut at a stop string once found)
        self.sent = 0           # characters of `text` released
        self.stopped = False    # a stop string ended the text

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        if token in self._stop_ids:
            return ""
        self.ids.append(int(token))
        self.text = self._decode(self.ids)
        if self.stop:
            start = max(0, self.sent - self._hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
                return self._release(len(self.text))
        safe = len(self.text) - self._hold
        while safe > self.sent and self.text[safe - 1] == "\ufffd":   # an incomplete multi-byte character
            safe -= 1
        return self._release(safe)

    def finish(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:upto], upto
        return out


# ---------------------------------------------------------------------------------------------- bodies

def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, created: int, chat: bool, choices: Sequence[tuple[str, str]],
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The non-streaming response; `choices` [(text, finish_reason)] in prompt order."""
    if chat:
        items = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": reason} for i, (text, reason) in enumerate(choices)]
    else:
        items = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                 for i, (text, reason) in enumerate(choices)]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": items, "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(rid: str, model: str, created: int, chat: bool, index: int, text: str | None,
               finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
    """One streamed chunk: new text of choice `index` and / or its finish_reason (chat: `role` opens the message)."""
    if chat:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, created: int, chat: bool, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    """The last chunk when `stream_options.include_usage`: no choices, the usage of the whole request."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode("utf-8")


def now() -> int:
    return int(time.time())
