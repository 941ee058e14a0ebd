"""Prometheus metrics of one server (its own CollectorRegistry, so several servers can live in one process).

Engine gauges are read from the engine's stats snapshot at scrape time: `llava_next_num_requests_running`,
`llava_next_num_requests_waiting`, `llava_next_kv_blocks_used`, `llava_next_kv_blocks_total`,
`llava_next_prefix_cache_hit_tokens_total`, `llava_next_prefix_cache_queried_tokens_total`,
`llava_next_num_preemptions_total`, plus the server's own `llava_next_num_requests_admitted` (requests holding
an admission slot) and `llava_next_engine_healthy`. Counters and histograms are updated by the handlers:
`llava_next_requests_total{endpoint, status}` (HTTP status of every answered request, 401/413/415 included),
`llava_next_request_finish_total{reason}`, `llava_next_prompt_tokens_total`,
`llava_next_generation_tokens_total`, `llava_next_time_to_first_token_seconds`,
`llava_next_time_per_output_token_seconds`, `llava_next_e2e_request_latency_seconds`.

Leaves out: multi-process collection, per-model labels (one model per server), queue-time histograms.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_TPOT = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 1.0, 2.5)
_E2E = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0)


class _EngineCollector:
    def __init__(self, stats: Callable[[], dict], admitted: Callable[[], int]):
        self.stats, self.admitted = stats, admitted

    def collect(self):
        try:
            s = self.stats()
        except Exception:  # noqa: BLE001 (a dead engine still gets scraped)
            s = {"healthy": False}
        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        values = (("num_requests_running", gauge, "Sequences running in the engine", s.get("num_running")),
                  ("num_requests_waiting", gauge, "Sequences waiting in the engine", s.get("num_waiting")),
                  ("kv_blocks_used", gauge, "KV cache blocks in use", s.get("kv_blocks_used")),
                  ("kv_blocks_total", gauge, "KV cache blocks in the pool", s.get("kv_blocks_total")),
                  ("prefix_cache_hit_tokens", counter, "Prompt tokens served from the prefix cache",
                   s.get("prefix_cache_hit_tokens")),
                  ("prefix_cache_queried_tokens", counter, "Prompt tokens looked up",
                   s.get("prefix_cache_queried_tokens")),
                  ("num_preemptions", counter, "Sequences preempted", s.get("num_preemptions")),
                  ("num_requests_admitted", gauge, "Requests holding an admission slot (server)", self.admitted()),
                  ("engine_healthy", gauge, "1 while the engine serves", 1 if s.get("healthy") else 0))
        for name, family, doc, value in values:
            metric = family(f"llava_next_{name}", doc)
            metric.add_metric([], float(value or 0))
            yield metric


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict], admitted: Callable[[], int]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(stats, admitted))
        r = self.registry
        self.requests = Counter("llava_next_requests", "Answered HTTP requests", ["endpoint", "status"], registry=r)
        self.finished = Counter("llava_next_request_finish", "Finished completions by reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("llava_next_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("llava_next_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("llava_next_time_to_first_token_seconds", "Time to first token", buckets=_TTFT,
                              registry=r)
        self.tpot = Histogram("llava_next_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=_TPOT, registry=r)
        self.e2e = Histogram("llava_next_e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=_E2E, registry=r)

    def answered(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def observe(self, arrival: float, first: float | None, end: float, prompt_tokens: int, output_tokens: int,
                reasons: list[str]) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        for reason in reasons:
            self.finished.labels(reason or "unknown").inc()
        self.e2e.observe(end - arrival)
        if first is not None:
            self.ttft.observe(first - arrival)
            if output_tokens > 1:
                self.tpot.observe((end - first) / (output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
