"""The HTTP server: the official `openai` client works against it (completions and chat, streamed and not), greedy
output over HTTP equals in-process generation, every bad input gets its status and an OpenAI error body naming the
problem, a full queue answers 429 with Retry-After, a client that disconnects frees its slot, the API key is
enforced, /metrics exposes the counters, and `fastserve.deploy` serves a trained work dir.

A random-weight tiny model (no training) with a tiny byte-level BPE tokenizer that has a ChatML template; the
deploy test writes a work dir with a sentencepiece tokenizer and a checkpoint of random weights."""
import dataclasses
import http.client
import json
import socket
import time
from urllib.parse import urlparse

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from flax import nnx

import fastserve
from fastserve import parallel
from fastserve.config import ServeConfig, dump_config, load_config
from fastserve.generation import decoding as infer
from fastserve.core.state import init_params
from fastserve.workdir import LoadedModel
from fastserve.serve import api
from fastserve.serve.engine import Engine, Request
from fastserve.serve.server import Server
from tiny_bpe import CHATML, train_tiny_bpe

BUCKETS = [16, 48]
MAX_NEW = 12
LIMIT = 48
NAME = "tiny"


def bpe_tokenizer():
    from fastserve.interop.tokenizer import BPETokenizer
    tok = train_tiny_bpe()
    return BPETokenizer(tok, bos_id=1, eos_id=2, pad_id=0, chat_template=CHATML, stop_ids=[2])


@pytest.fixture(scope="module")
def loaded():
    tok = bpe_tokenizer()
    cfg = load_config(None, [f"model.vocab_size={tok.vocab_size}", "model.d_model=48", "model.n_layers=2",
                             "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=96", "model.init_std=0.3",
                             "model.max_seq_len=96", "mesh.data=1"])
    mesh = parallel.make_mesh(cfg.mesh, jax.devices()[:1])
    graphdef, params, _ = init_params(cfg.model, mesh, seed=1)
    return LoadedModel(cfg.model, graphdef, params, tok, mesh, chat_template=CHATML)


@pytest.fixture(scope="module")
def server(loaded):
    cfg = ServeConfig(slots=2, buckets=BUCKETS, max_cache_len=96, scheduler="mlfq", max_queue=6,
                      max_new_tokens_limit=LIMIT, max_body_bytes=4096, port=0)
    srv = Server(Engine.from_loaded(loaded, cfg), loaded, cfg, model_name=NAME).start()
    yield srv
    srv.stop()


def greedy_reference(loaded, buckets):
    """Greedy tokens of `infer.generate` in this process (batch 1, the model's stop ids, prompts padded to
    `buckets`), memoized: what the server must answer."""
    @jax.jit
    def run(params, tokens, lengths):
        return infer.generate(nnx.merge(loaded.graphdef, params), tokens, lengths, jax.random.key(0),
                              max_new_tokens=MAX_NEW, temperature=jnp.zeros(1), top_k=jnp.zeros(1, jnp.int32),
                              top_p=jnp.ones(1), stop_tokens=jnp.array(loaded.stop_ids, jnp.int32))
    memo = {}

    def ref(ids):
        if tuple(ids) not in memo:
            tokens, lengths = infer.pad_prompts([ids], buckets)
            out, count = run(loaded.params, tokens, lengths)
            memo[tuple(ids)] = out[0, :int(count[0])].tolist()
        return memo[tuple(ids)]
    return ref


@pytest.fixture(scope="module")
def reference(loaded):
    return greedy_reference(loaded, BUCKETS)


def expected(loaded, ref, ids):
    """(text, finish_reason, completion_tokens) the server must answer for prompt ids under greedy decoding."""
    out = ref(ids)
    stopped = bool(out) and out[-1] in loaded.stop_ids
    return loaded.tokenizer.decode(out[:-1] if stopped else out), "stop" if stopped else "length", len(out)


def client(srv, key="unused"):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def request(srv, method, path, body=None, headers=None):
    """(status, headers, parsed JSON or raw text) of one plain HTTP request."""
    u = urlparse(srv.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read().decode()
    conn.close()
    try:
        return resp.status, dict(resp.getheaders()), json.loads(raw)
    except json.JSONDecodeError:
        return resp.status, dict(resp.getheaders()), raw


PROMPTS = ["hello world", "the capital of France is"]


def test_openai_client_completions_equal_in_process_greedy(server, loaded, reference):
    c = client(server)
    tok = loaded.tokenizer
    assert [m.id for m in c.models.list().data] == [NAME]
    for prompt in PROMPTS:
        ids = tok.encode(prompt)        # this tokenizer adds no BOS
        text, reason, n = expected(loaded, reference, ids)
        r = c.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_NEW, temperature=0)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (text, reason)
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)
        chunks = list(c.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_NEW, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == reason
        assert chunks[-1].usage.completion_tokens == n and chunks[-1].choices == []
    # a list of prompts: one choice each, in order
    r = c.completions.create(model=NAME, prompt=PROMPTS, max_tokens=MAX_NEW, temperature=0)
    assert [ch.text for ch in r.choices] == [expected(loaded, reference, tok.encode(p))[0] for p in PROMPTS]
    assert [ch.index for ch in r.choices] == [0, 1]
    # token ids as the prompt
    r = c.completions.create(model=NAME, prompt=tok.encode(PROMPTS[0]), max_tokens=MAX_NEW, temperature=0)
    assert r.choices[0].text == expected(loaded, reference, tok.encode(PROMPTS[0]))[0]


def test_openai_client_chat_uses_the_template(server, loaded, reference):
    c = client(server)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    ids = loaded.tokenizer.encode(loaded.tokenizer.apply_chat_template(messages))
    text, reason, n = expected(loaded, reference, ids)
    r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=MAX_NEW, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text, reason)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    chunks = list(c.chat.completions.create(model=NAME, messages=messages, max_tokens=MAX_NEW, temperature=0,
                                            stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason


def test_stop_strings_cut_the_text(server, loaded, reference):
    c = client(server)
    ids = loaded.tokenizer.encode(PROMPTS[1])
    full = expected(loaded, reference, ids)[0]
    at = next(i for i, ch in enumerate(full) if i >= 2 and ch.isascii() and ch.isprintable())
    stop = full[at]
    cut = full[:full.find(stop)]
    r = c.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=MAX_NEW, temperature=0, stop=[stop, "\x00"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    chunks = list(c.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=MAX_NEW, temperature=0, stop=stop,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_text_stream_holds_back_partial_stops_and_characters():
    pieces = {1: "ab", 2: "c", 3: "\ufffd", 4: "é", 5: "END", 6: "zz"}

    def decode(ids):   # id 3 then 4: an incomplete character that the next token completes
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffdé", "é")
    s = api.TextStream(decode, stop_ids=[9])
    assert [s.add(i) for i in (1, 9, 3, 4)] == ["ab", "", "", "é"] and s.finish() == ""
    s = api.TextStream(decode, stop=["cEN"])         # holds back 2 characters: a stop may be starting
    assert [s.add(i) for i in (1, 3, 4, 2)] == ["", "a", "", "b"]
    assert s.add(5) == "é" and s.stopped and s.text == "abé" and s.add(6) == "" and s.finish() == ""
    s = api.TextStream(decode, stop=["xyz"])
    assert s.add(1) == "" and s.add(2) == "a" and s.finish() == "bc" and not s.stopped


BAD = [
    ("/v1/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", "must be an integer"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "must be a number"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", "must be a boolean"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", "must be a string"),
    ("/v1/completions", {"prompt": "hi", "stop": [1]}, 400, "stop", "array of strings"),
    ("/v1/completions", {}, 400, "prompt", "'prompt' is required"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "'prompt' is empty"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "'prompt' is empty"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 404, "model", "'gpt-9' does not exist"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": LIMIT + 1}, 400, "max_tokens", f"limit of {LIMIT}"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ("/v1/completions", {"prompt": "qzx#" * 30}, 400, "prompt", "KV cache holds 96 positions (serve.max_cache_len), "
                                                                "so a prompt may have at most 95 tokens"),
    ("/v1/completions", {"prompt": [5, 100000]}, 400, "prompt", "token ids must be in"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n", "n=2 is not supported"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 3}, 400, "logprobs", "not supported"),
    ("/v1/completions", {"prompt": "x" * 5000}, 413, None, "serve.max_body_bytes=4096"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "must be an array"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "'messages' is empty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content", "string"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n", "n must be 1"),
]


@pytest.mark.parametrize("path,body,status,param,fragment", BAD, ids=[f"{b[2]}-{b[4][:24]}" for b in BAD])
def test_bad_input_gets_an_openai_error_naming_the_problem(server, path, body, status, param, fragment):
    code, _, out = request(server, "POST", path, body)
    assert code == status, out
    err = out["error"]
    assert set(err) == {"message", "type", "param", "code"} and fragment in err["message"], err
    assert err["param"] == param


def test_unknown_route_and_body_over_limit_by_chunks(server):
    code, _, out = request(server, "GET", "/v1/nothing")
    assert code == 404 and "no route" in out["error"]["message"]
    # no Content-Length: the limit holds while reading
    u = urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/v1/completions", body=iter([b'{"prompt": "', b"y" * 3000, b"y" * 3000, b'"}']),
                 encode_chunked=True, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 413 and "max_body_bytes" in json.loads(resp.read())["error"]["message"]
    conn.close()


def test_queue_full_answers_429_with_retry_after(server):
    eng = server.engine
    eng.stop()                                   # nothing runs: the queue stays full
    held = [eng.submit(Request([5, 6, 7], max_new_tokens=4)) for _ in range(eng.cfg.max_queue)]
    try:
        code, headers, out = request(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert code == 429 and headers.get("retry-after") == "1", (code, headers)
        assert out["error"]["code"] == "queue_full" and "max_queue=6" in out["error"]["message"]
        with pytest.raises(openai.RateLimitError):
            client(server).completions.create(model=NAME, prompt="hi", max_tokens=2)
    finally:
        for r in held:
            eng.cancel(r)
        eng.start()
    assert all(r.wait(30) for r in held) and eng.pending == 0


def test_client_disconnect_mid_stream_frees_the_slot(server):
    eng = server.engine
    eng.stop()                                   # step by hand: deterministic whatever the machine's speed
    try:
        cancelled = _metric(server, 'fastserve_requests_finished_total{finish_reason="cancelled"}')
        u = urlparse(server.url)
        sock = socket.create_connection((u.hostname, u.port), timeout=30)
        body = json.dumps({"prompt": "hello world", "max_tokens": LIMIT, "temperature": 0, "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        _until(lambda: eng.pending == 1)
        assert eng.step()                        # prefill: the request holds a slot and has its first token
        assert eng.stats()["running"] == 1
        data = b""
        while b"data: " not in data:
            data += sock.recv(4096)
        assert data.startswith(b"HTTP/1.1 200") and b"text/event-stream" in data
        (job,) = list(eng._jobs)
        sock.close()
        _until(lambda: job._cancel)              # the server noticed and cancelled it
        eng.step()
        assert job.finish_reason == "cancelled" and len(job.output) < LIMIT
        st = eng.stats()
        assert st["running"] == 0 and st["waiting"] == 0
        _until(lambda: _metric(server, 'fastserve_requests_finished_total{finish_reason="cancelled"}') == cancelled + 1)
    finally:
        eng.start()


def test_api_key_is_enforced(loaded, server):
    cfg = dataclasses.replace(server.cfg, api_key="sekret")
    guarded = Server(server.engine, loaded, cfg, model_name=NAME).start(port=0)
    try:
        code, headers, out = request(guarded, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert code == 401 and out["error"]["code"] == "invalid_api_key" and "missing" in out["error"]["message"]
        code, _, out = request(guarded, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert code == 401 and out["error"]["message"] == "invalid API key"
        assert request(guarded, "GET", "/metrics")[0] == 401
        assert request(guarded, "GET", "/health")[0] == 200          # liveness needs no key
        with pytest.raises(openai.AuthenticationError):
            client(guarded, "wrong").completions.create(model=NAME, prompt="hi", max_tokens=2)
        r = client(guarded, "sekret").completions.create(model=NAME, prompt="hi", max_tokens=2, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        guarded.stop(engine=False)


def test_metrics_expose_the_counters(server):
    client(server).completions.create(model=NAME, prompt="hello", max_tokens=3, temperature=0)
    assert request(server, "POST", "/v1/completions", {"prompt": ""})[0] == 400   # (whatever ran before on this worker)
    code, headers, text = request(server, "GET", "/metrics")
    assert code == 200 and headers["content-type"].startswith("text/plain")
    for name in ("fastserve_queue_length", "fastserve_slots_used", "fastserve_slots_total 2.0",
                 "fastserve_time_to_first_token_seconds_bucket", "fastserve_time_per_output_token_seconds_count",
                 "fastserve_e2e_request_latency_seconds_sum", "fastserve_preemptions_total",
                 "fastserve_offloaded_bytes_total", 'fastserve_http_requests_total{path="/v1/completions",status="200"}',
                 'fastserve_http_requests_total{path="/v1/completions",status="400"}'):
        assert name in text, name
    assert _metric(server, "fastserve_generation_tokens_total") >= 3
    assert _metric(server, "fastserve_time_to_first_token_seconds_count") >= 1
    assert request(server, "GET", "/health")[2]["status"] == "ok"


def toy_work_dir(work):
    """A tiny sentencepiece work dir (config.yaml, tokenizer.model, one checkpoint of random weights): (path, config)."""
    from fastserve.core.checkpoint import Checkpointer
    from fastserve.data import train_tokenizer

    work.mkdir()
    texts = ["def print(value): the print function writes text to a stream.\n" * 3,
             "Lists hold items; dictionaries map keys to values.\n" * 3] * 10
    tok = train_tokenizer(texts, 300, str(work / "tokenizer.model"))
    cfg = load_config(None, [f"model.vocab_size={tok.vocab_size}", "model.d_model=32", "model.n_layers=1",
                             "model.n_heads=2", "model.d_ff=64", "model.init_std=0.3", "model.max_seq_len=64",
                             "mesh.data=1", f"train.workdir={work}"])
    (work / "config.yaml").write_text(dump_config(cfg))
    _, params, _ = init_params(cfg.model, parallel.make_mesh(cfg.mesh, jax.devices()[:1]), seed=0)
    ckpt = Checkpointer(str(work / "checkpoints"))
    ckpt.save(1, {"params": params})
    ckpt.close()
    return work, cfg


def test_deploy_serves_a_work_dir(tmp_path):
    """A sentencepiece work dir (the quickstart's layout) through fastserve.deploy: greedy text over HTTP equals
    fastserve.infer's; the model has no chat template."""
    work, cfg = toy_work_dir(tmp_path / "toy")
    from fastserve.data import Tokenizer
    tok = Tokenizer.from_file(str(work / "tokenizer.model"))

    overrides = [f"source.path={work}", "serve.port=0", "serve.slots=2", "serve.buckets=[16]",
                 "serve.max_cache_len=48", "serve.scheduler=fcfs"]
    handle = fastserve.deploy(cfg, *overrides, block=False)
    try:
        c = client(handle)
        assert [m.id for m in c.models.list().data] == ["toy"]
        r = c.completions.create(model="toy", prompt="the print", max_tokens=8, temperature=0)
        want = fastserve.infer(cfg, ["the print"], *overrides, "generate.max_new_tokens=8", "generate.batch_size=1",
                               "generate.buckets=[16]")
        assert r.choices[0].text == want[0] and r.usage.prompt_tokens == 1 + len(tok.encode("the print"))  # + BOS
        code, _, out = request(handle, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
        assert code == 400 and out["error"]["code"] == "no_chat_template" and out["error"]["param"] == "messages"
    finally:
        handle.stop()
    with pytest.raises(OSError):
        request(handle, "GET", "/health")

    # ... and exported (python -m fastserve.export), served with source.kind=exported: the same text
    from fastserve.artifacts.writer import ExportOptions, export_from_config
    export_from_config(cfg, str(tmp_path / "toy-export"), ExportOptions(platforms=("cpu",), buckets=(16,),
                                                                        max_cache_len=48,
                                                                        functions=("prefill", "decode")))
    handle = fastserve.deploy(None, "source.kind=exported", f"source.path={tmp_path / 'toy-export'}", *overrides[1:],
                              block=False)
    try:
        c = client(handle)
        assert [m.id for m in c.models.list().data] == ["toy-export"]
        r = c.completions.create(model="toy-export", prompt="the print", max_tokens=8, temperature=0)
        assert r.choices[0].text == want[0] and r.usage.prompt_tokens == 1 + len(tok.encode("the print"))
    finally:
        handle.stop()


def test_deploy_serves_an_export_with_its_chat_template_and_stop_ids(loaded, reference, tmp_path):
    """source.kind=exported: the export's tokenizer, chat template and stop ids reach the server, and greedy text
    over HTTP equals in-process generation; serve.max_cache_len 0 takes the export's, a mismatch is refused."""
    from fastserve.artifacts.writer import ExportOptions, export_params
    out = tmp_path / "tiny-chat"
    export_params(loaded.model_cfg, loaded.params, loaded.tokenizer, str(out),
                  ExportOptions(platforms=("cpu",), buckets=tuple(BUCKETS), max_cache_len=96,
                                functions=("prefill", "decode")))
    overrides = ["source.kind=exported", f"source.path={out}", "serve.port=0", "serve.slots=2",
                 f"serve.buckets={BUCKETS}", "serve.scheduler=mlfq", f"serve.max_new_tokens_limit={LIMIT}"]
    handle = fastserve.deploy(None, *overrides, block=False)
    try:
        c = client(handle)
        assert handle.engine.max_len == 96
        for prompt in PROMPTS:
            r = c.completions.create(model="tiny-chat", prompt=prompt, max_tokens=MAX_NEW, temperature=0)
            text, reason, _ = expected(loaded, reference, loaded.tokenizer.encode(prompt))
            assert (r.choices[0].text, r.choices[0].finish_reason) == (text, reason)
        messages = [{"role": "user", "content": "hello"}]
        ids = loaded.tokenizer.encode(loaded.tokenizer.apply_chat_template(messages))
        text, reason, _ = expected(loaded, reference, ids)
        r = c.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=MAX_NEW, temperature=0)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text, reason)
    finally:
        handle.stop()
    with pytest.raises(ValueError, match="differs from the export's max_cache_len=96"):
        fastserve.deploy(None, *overrides, "serve.max_cache_len=64", block=False)


def test_cli_reports_config_errors(capsys):
    from fastserve.serve.cli import main
    with pytest.raises(SystemExit) as e:
        main(["serve.slotz=2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "serve.slotz" in err and "serve.slots" in err     # names the typo and the nearest valid key


def _metric(srv, line_prefix):
    text = request(srv, "GET", "/metrics")[2]
    for line in text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_ignore_eos_generates_max_tokens_through_a_stop_token(loaded, reference):
    """vLLM's `ignore_eos`: a stop token ends a choice unless the request asks to ignore it (benchmarks that
    need exact output lengths send it). A server whose stop id is the second greedy token of the prompt stops
    there by default, and with ignore_eos generates max_tokens, equal to the free-running greedy tokens."""
    from fastserve.interop.tokenizer import BPETokenizer
    ids = loaded.tokenizer.encode(PROMPTS[1])
    free = reference(ids)
    assert len(free) == MAX_NEW and 2 not in free, "the prompt must run to max_tokens under the fixture's stop id"
    stop = free[1]
    tok = BPETokenizer(train_tiny_bpe(), bos_id=1, eos_id=2, pad_id=0, chat_template=CHATML, stop_ids=[stop])
    stopping = dataclasses.replace(loaded, tokenizer=tok)
    cfg = ServeConfig(slots=1, buckets=BUCKETS, max_cache_len=96, max_new_tokens_limit=LIMIT, port=0)
    srv = Server(Engine.from_loaded(stopping, cfg), stopping, cfg, model_name=NAME).start()
    try:
        body = {"model": NAME, "prompt": ids, "max_tokens": MAX_NEW, "temperature": 0}
        status, _, plain = request(srv, "POST", "/v1/completions", body)
        assert status == 200
        assert (plain["choices"][0]["finish_reason"], plain["usage"]["completion_tokens"]) == ("stop", 2)
        status, _, ignored = request(srv, "POST", "/v1/completions", {**body, "ignore_eos": True})
        assert status == 200
        assert (ignored["choices"][0]["finish_reason"], ignored["usage"]["completion_tokens"]) == ("length", MAX_NEW)
        assert ignored["choices"][0]["text"] == tok.decode(free)
        status, _, bad = request(srv, "POST", "/v1/completions", {**body, "ignore_eos": "yes"})
        assert status == 400 and bad["error"]["param"] == "ignore_eos"
    finally:
        srv.stop()
