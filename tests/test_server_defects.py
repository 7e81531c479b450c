"""Regression tests of the HTTP server's defects: a batch larger than serve.max_queue (400, nothing enqueued, no
stale queue length), prompts longer than the largest bucket served by chunked prefill up to max_model_len, a
graceful exit 0 on SIGTERM, and the Content-Type / chat-role checks.

Reuses tests/test_server.py's tiny model and its module-scoped server (buckets [16, 48], max_cache_len 96,
max_queue 6); the SIGTERM test starts `python -m fastserve.serve` on a tiny sentencepiece work dir."""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

import jax
import numpy as np
import pytest

from fastserve.serve.engine import QueueFull, Request
from test_server import (BUCKETS, MAX_NEW, NAME, _metric, _until, client, expected, greedy_reference,  # noqa: F401
                         toy_work_dir,
                         loaded, request, server)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUEUE_LENGTH = "fastserve_queue_length"


# ------------------------------------------------------------------------------ 1. batches vs max_queue

def test_a_batch_larger_than_max_queue_is_a_400_and_leaves_no_queue_behind(server):
    mq = server.cfg.max_queue
    code, headers, out = request(server, "POST", "/v1/completions", {"prompt": ["hi"] * (mq + 1), "max_tokens": 2})
    assert code == 400, (code, out)
    assert "retry-after" not in {k.lower() for k in headers}
    err = out["error"]
    assert err["param"] == "prompt" and err["code"] == "batch_too_large"
    assert f"prompt has {mq + 1} entries; this server queues at most {mq} requests (serve.max_queue)" \
        in err["message"], err
    assert _metric(server, QUEUE_LENGTH) == 0 and server.engine.live == 0
    t0 = time.monotonic()
    r = client(server).completions.create(model=NAME, prompt="hello", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1 and time.monotonic() - t0 < 5


def test_a_batch_over_the_free_capacity_is_a_429_that_enqueues_nothing(server):
    eng = server.engine
    mq = eng.cfg.max_queue
    eng.stop()                                   # nothing runs: the queue stays as we fill it
    held = [eng.submit(Request([5, 6, 7], max_new_tokens=2)) for _ in range(mq - 2)]
    try:
        code, headers, out = request(server, "POST", "/v1/completions", {"prompt": ["a", "b", "c"], "max_tokens": 2})
        assert code == 429 and headers.get("retry-after") == "1", (code, out)
        assert out["error"]["code"] == "queue_full" and f"max_queue={mq}" in out["error"]["message"]
        assert eng.pending == mq - 2 and eng.live == mq - 2          # none of the batch was enqueued
        assert _metric(server, QUEUE_LENGTH) == mq - 2
        # cancelled requests free their capacity at once, before the engine loop processes them
        for r in held:
            eng.cancel(r)
        assert _metric(server, QUEUE_LENGTH) == 0
        more = [eng.submit(Request([5, 6, 7], max_new_tokens=2)) for _ in range(mq)]
        with pytest.raises(QueueFull):
            eng.submit(Request([5], max_new_tokens=2))
        assert _metric(server, QUEUE_LENGTH) == mq
    finally:
        eng.start()
    assert all(r.wait(30) for r in held + more)
    assert [r.finish_reason for r in held] == ["cancelled"] * len(held)
    assert all(r.finish_reason == "length" for r in more)
    _until(lambda: eng.pending == 0)
    assert eng.live == 0 and _metric(server, QUEUE_LENGTH) == 0


# ----------------------------------------------------------- 2. prompts longer than the largest bucket

@pytest.fixture(scope="module")
def long_reference(loaded):  # noqa: F811
    """The in-process greedy reference for prompts of any length: one padded shape (96) for every prompt."""
    return greedy_reference(loaded, (96,))


def test_prompts_up_to_max_model_len_are_served_by_chunked_prefill(server, loaded, long_reference):  # noqa: F811
    code, _, models = request(server, "GET", "/v1/models")
    max_model_len = models["data"][0]["max_model_len"]
    assert code == 200 and max_model_len == 96 > BUCKETS[-1]
    rng = np.random.default_rng(0)
    vocab = loaded.model_cfg.vocab_size
    c = client(server)
    prefills = server.engine.counters.get("prefill_extends", 0)
    for n in (49, 70, 96 - MAX_NEW):              # 2 chunks, 2 chunks, 2 chunks ending at the cache's end
        ids = rng.integers(3, vocab, n).tolist()
        text, reason, count = expected(loaded, long_reference, ids)
        r = c.completions.create(model=NAME, prompt=ids, max_tokens=MAX_NEW, temperature=0)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (text, reason), n
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n, count)
        chunks = list(c.completions.create(model=NAME, prompt=ids, max_tokens=MAX_NEW, temperature=0, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == text
    assert server.engine.counters["prefill_extends"] > prefills
    # the longest prompt served is max_model_len - 1 (one position left for the one token generated)
    ids = rng.integers(3, vocab, max_model_len - 1).tolist()
    r = c.completions.create(model=NAME, prompt=ids, max_tokens=1, temperature=0)
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason in ("length", "stop")
    code, _, out = request(server, "POST", "/v1/completions", {"prompt": ids + [5], "max_tokens": 1})
    assert code == 400 and f"at most {max_model_len - 1} tokens" in out["error"]["message"], out
    assert f"{max_model_len} positions" in out["error"]["message"]


# ---------------------------------------------------------------------------------- 3. SIGTERM exits 0

@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    """A tiny sentencepiece work dir with a checkpoint of random weights (the quickstart's layout)."""
    return toy_work_dir(tmp_path_factory.mktemp("sigterm") / "toy")[0]


def test_sigterm_shuts_down_gracefully_and_exits_0(work_dir):
    cmd = [sys.executable, "-m", "fastserve.serve", "--config", str(work_dir / "config.yaml"),
           f"source.path={work_dir}", "serve.port=0", "serve.slots=1", "serve.buckets=[16]",
           "serve.max_cache_len=48", "serve.scheduler=fcfs"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("serving" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        url = next(line for line in lines if "serving" in line).split(" at ", 1)[1].split()[0]
        u = urlparse(url)
        while True:                              # the port is bound before uvicorn listens on it
            try:
                socket.create_connection((u.hostname, u.port), timeout=5).close()
                break
            except ConnectionRefusedError:
                assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
                time.sleep(0.05)
        # a streamed request in flight when the signal comes is still answered to its end
        sock = socket.create_connection((u.hostname, u.port), timeout=30)
        body = json.dumps({"prompt": "the print", "max_tokens": 30, "temperature": 0, "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        data = b""
        while b"data: " not in data:
            data += sock.recv(4096)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        while chunk := sock.recv(4096):
            data += chunk
        sock.close()
        assert data.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in data, data[-500:]
        assert proc.wait(20) == 0, "".join(lines)
        assert time.monotonic() - t0 < 20
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    assert any(line.startswith("fastserve: stopped") for line in lines), "".join(lines)


# ---------------------------------------------------------------------- 4. Content-Type and chat roles

@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                   None, "application/jsonx", "application/json; charset=latin-1"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_post_without_a_json_content_type_is_a_415(server, path, ctype):
    u = urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    body = {"prompt": "hi", "max_tokens": 2} if path == "/v1/completions" else \
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    conn.request("POST", path, body=json.dumps(body).encode(), headers={} if ctype is None else {"Content-Type": ctype})
    resp = conn.getresponse()
    out = json.loads(resp.read())
    conn.close()
    assert resp.status == 415, out
    err = out["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "unsupported_media_type"
    assert "application/json" in err["message"]


@pytest.mark.parametrize("ctype", ["application/json; charset=utf-8", "Application/JSON",
                                   "application/json;charset=UTF-8"])
def test_json_content_types_are_accepted(server, ctype):
    code, _, out = request(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2},
                           headers={"Content-Type": ctype})
    assert code == 200, out


def test_unknown_chat_roles_are_refused_and_known_ones_accepted(server):
    msgs = [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "abracadabra"}]
    code, _, out = request(server, "POST", "/v1/chat/completions", {"messages": msgs, "max_tokens": 2})
    assert code == 400 and out["error"]["param"] == "messages[1].role", out
    assert "'wizard'" in out["error"]["message"] and "developer" in out["error"]["message"]
    msgs = [{"role": "developer", "content": "be brief"}, {"role": "system", "content": "ok"},
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
            {"role": "tool", "content": "42"}]
    code, _, out = request(server, "POST", "/v1/chat/completions", {"messages": msgs, "max_tokens": 2})
    assert code == 200, out


def test_shutdown_cancels_what_is_still_generating_after_the_grace_period_and_answers_it(loaded, server):  # noqa: F811
    """A request still generating when the grace period ends is cancelled and answered (its text so far, a
    finish_reason and [DONE]) instead of being cut off when uvicorn kills the handlers."""
    from fastserve.serve.server import Server
    eng = server.engine
    srv = Server(eng, loaded, server.cfg, model_name=NAME, shutdown_grace_s=0.2).start(port=0)
    eng.stop()             # (after start(), which starts it) step by hand: the request stays in flight at will
    stopper = threading.Thread(target=srv.stop, kwargs={"engine": False})
    try:
        u = urlparse(srv.url)
        sock = socket.create_connection((u.hostname, u.port), timeout=30)
        body = json.dumps({"prompt": "hello world", "max_tokens": 40, "temperature": 0, "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        _until(lambda: eng.pending == 1)
        assert eng.step()                                   # prefill: the first token
        (job,) = list(eng._jobs)
        assert len(job.output) == 1
        data = b""
        while b"data: " not in data:
            data += sock.recv(4096)
        stopper.start()                                     # shutdown begins; nothing generates meanwhile
        _until(lambda: job._cancel)                         # ... until the grace period is over
        eng.step()
        assert job.finish_reason == "cancelled"
        while chunk := sock.recv(4096):
            data += chunk
        sock.close()
        events = [json.loads(m) for m in re.findall(rb"data: (\{.*?\})\n\n", data)]
        assert data.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in data, data
        assert events[-1]["choices"][0]["finish_reason"] == "stop"      # (cancelled: the text so far, complete)
        assert "".join(e["choices"][0]["text"] for e in events) == loaded.tokenizer.decode(job.output)
        stopper.join(15)
        assert not stopper.is_alive()
    finally:
        if not stopper.is_alive() and stopper.ident is None:
            srv.stop(engine=False)
        eng.start()
