"""Prometheus metrics for /metrics: one registry per app, so tests and several apps never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)


class Metrics:
    """Requests by route and status, texts, tokens, queue depth, batch size and fill, latencies."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "nerserve_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.texts = Counter("nerserve_texts", "Texts answered", registry=r)
        self.tokens = Counter("nerserve_tokens", "Model tokens answered (windows included)", registry=r)
        self.queue_depth = Gauge("nerserve_queue_depth", "Sequences waiting for the engine", registry=r)
        self.batch_size = Histogram(
            "nerserve_batch_size",
            "Sequences per engine batch",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )
        self.batch_fill = Histogram(
            "nerserve_batch_fill",
            "Real tokens over padded tokens per batch",
            registry=r,
            buckets=(0.1, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
        )
        self.queue_seconds = Histogram(
            "nerserve_queue_seconds", "Submit to engine result", registry=r, buckets=_LATENCY_BUCKETS
        )
        self.engine_seconds = Histogram(
            "nerserve_engine_seconds", "Engine time per batch", registry=r, buckets=_LATENCY_BUCKETS
        )
        self.total_seconds = Histogram(
            "nerserve_request_seconds", "Whole request, server side", registry=r, buckets=_LATENCY_BUCKETS
        )

    def observe_batch(self, size: int, tokens: int, padded_tokens: int, seconds: float) -> None:
        """Called by the scheduler's thread after each engine batch."""
        self.batch_size.observe(size)
        self.batch_fill.observe(tokens / max(padded_tokens, 1))
        self.engine_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
