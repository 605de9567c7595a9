"""Prometheus metrics for /metrics, counted in every process of the server and shown as one set of totals.

prometheus_client's multiprocess mode: each process (the workers and the engine process) writes its
values to memory-mapped files under PROMETHEUS_MULTIPROC_DIR (set by the supervisor, a fresh folder per
server), and any worker's /metrics sums them all. A worker that dies keeps its counts in the totals;
its live gauges are dropped (`process_gone`). Each stage of a request is timed apart: tokenization,
queue (arrival at the engine to its first batch), engine (per batch), aggregation, encoding."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)
STAGES = ("tokenization", "queue", "engine", "aggregation", "encoding")


class Metrics:
    """The server's metrics; create one per process (values go to that process's files)."""

    def __init__(self) -> None:
        self.requests = Counter("nerserve_requests", "HTTP requests by route and status", ["route", "status"])
        self.texts = Counter("nerserve_texts", "Texts answered")
        self.tokens = Counter("nerserve_tokens", "Model tokens answered (windows included)")
        self.queue_depth = Gauge(
            "nerserve_queue_depth", "Sequences waiting for the engine", multiprocess_mode="livemax"
        )
        self.batch_size = Histogram(
            "nerserve_batch_size", "Sequences per engine batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
        )
        self.batch_fill = Histogram(
            "nerserve_batch_fill",
            "Real tokens over padded tokens per batch",
            buckets=(0.1, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
        )
        self.stage_seconds = Histogram(
            "nerserve_stage_seconds",
            "Time in each stage of a request (engine: per batch)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
        )
        self.total_seconds = Histogram(
            "nerserve_request_seconds", "Whole request, server side", buckets=_LATENCY_BUCKETS
        )

    def stage(self, name: str, seconds: float) -> None:
        self.stage_seconds.labels(name).observe(seconds)

    def observe_batch(self, size: int, tokens: int, padded_tokens: int, seconds: float) -> None:
        """Called by the scheduler's thread after each engine batch."""
        self.batch_size.observe(size)
        self.batch_fill.observe(tokens / max(padded_tokens, 1))
        self.stage("engine", seconds)

    def observe_queue(self, seconds: float) -> None:
        """Called by the scheduler's thread when a request's first batch starts."""
        self.stage("queue", seconds)


def render() -> bytes:
    """Every process's metrics, summed (Prometheus text format)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)


def process_gone(pid: int) -> None:
    """Drop a dead process's live gauges (its counters stay in the totals)."""
    if os.environ.get(MULTIPROC_DIR):
        multiprocess.mark_process_dead(pid)
