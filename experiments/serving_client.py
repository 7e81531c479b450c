"""The serving benchmarks' HTTP client: each request of a trace streamed over its own connection at its arrival
time (`POST /v1/completions`, token-id prompt, greedy, `ignore_eos`), its TTFT / TPOT / E2E measured by the client.
One client for every server measured (fastserve's, llama.cpp's), so none is timed by a different stopwatch."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from serving_workload import Item, summarize


async def _stream_one(host: str, port: int, it: Item, t0: float) -> dict[str, Any]:
    """One streamed /v1/completions request at its arrival time: its TTFT / TPOT / E2E and token count. Reads the
    body chunked or close-delimited, and counts one token per streamed choice chunk that has text or no finish_reason
    yet (usage when the server sends it): a byte-level BPE token can decode to no text on its own."""
    await asyncio.sleep(max(0.0, t0 + it.t - time.perf_counter()))
    sent = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    body = json.dumps({"model": "bench", "prompt": it.prompt, "max_tokens": it.out, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"HTTP error: {status!r} {await reader.read()!r}")
    chunked = False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        chunked |= line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower()
    times, chunks, usage, buf, done = [], 0, None, b"", False
    while not done:
        if chunked:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                break
            buf += (await reader.readexactly(size + 2))[:-2]
        else:
            data = await reader.read(65536)
            if not data:
                break
            buf += data
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            event = event.strip()
            if not event.startswith(b"data:"):
                continue
            data = event[len(b"data:"):].strip()
            if data == b"[DONE]":
                done = True
                break
            msg = json.loads(data)
            choice = (msg.get("choices") or [None])[0]
            # a token's chunk: text, or no finish_reason yet (llama.cpp ends with an empty chunk that has one)
            if choice is not None and (choice.get("text") or choice.get("finish_reason") is None):
                chunks += 1
                times.append(time.perf_counter())
            if msg.get("usage"):
                usage = msg["usage"].get("completion_tokens")
    writer.close()
    end = time.perf_counter()
    tokens = usage if usage is not None else chunks
    return {"ttft": times[0] - sent, "tpot": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None,
            "e2e": end - sent, "tokens": tokens, "sent": sent, "end": end}


def run_http(url: str, items: list[Item], warmup: int) -> dict[str, Any]:
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)

    async def go():
        t0 = time.perf_counter() + 0.05
        return await asyncio.wait_for(asyncio.gather(*[_stream_one(host, int(port), it, t0) for it in items]),
                                      timeout=items[-1].t + 600)
    recs = asyncio.run(go())[warmup:]
    short = [(r["tokens"], it.out) for r, it in zip(recs, items[warmup:]) if r["tokens"] != it.out]
    if short:
        raise RuntimeError(f"{len(short)} requests did not generate their max_tokens (got, wanted): {short[:5]}")
    return summarize(recs, max(r["end"] for r in recs) - min(r["sent"] for r in recs))
