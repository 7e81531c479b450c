"""Prometheus metrics of the HTTP server: engine state read at scrape time (queue length, slots used, host KV,
tokens, preemptions, offloaded bytes, prefix-cache hits, ...) and per-request histograms (TTFT, TPOT, E2E) observed
on finish."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fastserve.serve.engine import Engine
from fastserve.serve.request import Request

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _EngineCollector:
    """Engine state read at scrape time (no locking: a scrape may see a step half done)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        e = self.engine
        c = dict(e.counters)
        resident = [j for j in list(e._slot_job) if j is not None]
        running = len(resident)
        # live requests only: a cancelled one stops counting at once, not when the loop retires it
        waiting = max(e.live - sum(j._live for j in resident), 0)
        for name, doc, value in (
                ("fastserve_queue_length", "Requests submitted and waiting for a slot", waiting),
                ("fastserve_slots_used", "Decode slots holding a request", running),
                ("fastserve_slots_total", "Decode slots (serve.slots)", e.slots),
                ("fastserve_host_kv_in_use", "Preempted requests whose KV is in host memory", len(e._host_jobs))):
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, key in (
                ("fastserve_generation_tokens", "Tokens generated", "tokens"),
                ("fastserve_preemptions", "Times a running request was not scheduled in the next iteration",
                 "preemptions"),
                ("fastserve_offloads", "Evictions whose KV went to host memory", "offloads"),
                ("fastserve_offloaded_bytes", "Bytes of KV offloaded to host memory", "offloaded_bytes"),
                ("fastserve_recomputes", "Evictions whose KV was dropped and recomputed", "recomputes"),
                ("fastserve_prefills", "Prompt prefills", "prefills"),
                ("fastserve_engine_steps", "Engine iterations that ran", "steps")):
            yield CounterMetricFamily(name, doc, value=c[key])
        if e.prefix is not None:
            p = e.prefix
            yield CounterMetricFamily("fastserve_prefix_cache_hit_tokens",
                                      "Prompt tokens whose KV was copied from the prefix cache", value=p.hit_tokens)
            yield CounterMetricFamily("fastserve_prefix_cache_queried_tokens",
                                      "Prompt tokens looked up in the prefix cache", value=p.queried_tokens)
            yield GaugeMetricFamily("fastserve_prefix_cache_blocks", "Blocks held by the prefix cache",
                                    value=len(p.index))


class Metrics:
    """A registry of its own per server (several servers may live in one process)."""

    def __init__(self, engine: Engine):
        r = self.registry = CollectorRegistry()
        self.http = Counter("fastserve_http_requests", "HTTP requests by path and status code", ["path", "status"],
                            registry=r)
        self.finished = Counter("fastserve_requests_finished", "Generations (choices) finished, by finish_reason",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("fastserve_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.ttft = Histogram("fastserve_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("fastserve_time_per_output_token_seconds", "Mean gap between output tokens",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("fastserve_e2e_request_latency_seconds", "Arrival to last token (JCT)",
                             buckets=_E2E_BUCKETS, registry=r)
        r.register(_EngineCollector(engine))

    def observe(self, req: Request) -> None:
        """On the engine thread when a request finishes."""
        if req.finish_reason == "error":
            return
        for hist, value in ((self.ttft, req.ttft), (self.tpot, req.tpot), (self.e2e, req.jct)):
            if value is not None:
                hist.observe(value)

    def text(self) -> bytes:
        return generate_latest(self.registry)
