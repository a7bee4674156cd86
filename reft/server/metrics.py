"""Prometheus metrics of the server (GET /metrics), in a registry of its own.

Request counts and latencies are recorded as they happen (TTFT and inter-token latency by the
engine thread, at the moment a token is sampled); the engine's state (running and waiting
sequences, KV pages, prefix-cache hit rate, token totals) is read at scrape time.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   2.5, 5.0, 10.0, 20.0, 40.0)


class _EngineState:
    """Collector reading the serving engine when Prometheus scrapes."""

    def __init__(self, serving):
        self.serving = serving

    def collect(self):
        s, pool = self.serving, self.serving.pool
        gauges = [
            ("reft_num_requests_running", "Sequences in the running batch.", s.num_running),
            ("reft_num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting),
            ("reft_kv_cache_pages_used", "KV-cache pages held by sequences.", pool.used_pages),
            ("reft_kv_cache_pages_total", "KV-cache pages in the pool.", pool.num_pages),
            ("reft_kv_cache_usage_ratio", "Fraction of KV-cache pages held by sequences.",
             pool.used_pages / max(pool.num_pages, 1)),
            ("reft_prefix_cache_hit_rate", "Fraction of looked-up full prompt pages found in the prefix cache.",
             pool.hit_rate)]
        counters = [
            ("reft_prefix_cache_queries", "Full prompt pages looked up in the prefix cache.", pool.queries),
            ("reft_prefix_cache_hits", "Full prompt pages found in the prefix cache.", pool.hits),
            ("reft_prompt_tokens", "Prompt tokens of admitted requests.", s.prompt_tokens_total),
            ("reft_preemptions", "Sequences preempted for lack of KV pages (recomputed later).",
             s.scheduler.preemptions)]
        spec = getattr(s, "spec", None)   # generation only (an embed plan's engine generates nothing)
        if spec is not None:
            gauges += [
                ("reft_spec_decode_acceptance_rate", "Speculative decoding: fraction of draft tokens accepted.",
                 spec.acceptance_rate),
                ("reft_spec_decode_mean_accepted_length",
                 "Speculative decoding: tokens generated per verification step (accepted drafts + 1).",
                 spec.mean_accepted_length)]
            counters += [
                ("reft_generation_tokens", "Tokens generated.", s.generation_tokens_total),
                ("reft_spec_decode_draft_tokens", "Speculative decoding: draft tokens verified.", spec.drafted),
                ("reft_spec_decode_accepted_tokens", "Speculative decoding: draft tokens accepted.", spec.accepted)]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("reft_requests", "HTTP requests by route and status code.", ["route", "status"],
                                registry=self.registry)
        self.ttft = Histogram("reft_time_to_first_token_seconds", "Time from a request's arrival to its first token.",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("reft_inter_token_latency_seconds", "Time between consecutive tokens of a sequence.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.finished = Counter("reft_request_finished", "Sequences finished, by finish reason.", ["reason"],
                                registry=self.registry)

    def watch(self, serving) -> None:
        self.registry.register(_EngineState(serving))

    # the ServingEngine observer interface (called on the engine thread)
    def token(self, seconds: float, first: bool) -> None:
        (self.ttft if first else self.itl).observe(seconds)

    def finish(self, out) -> None:
        self.finished.labels(out.finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
