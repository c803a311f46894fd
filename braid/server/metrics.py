"""``GET /metrics``: Prometheus text for one server.

Engine state (running and waiting requests, KV use, cache hit rate, token counters) is read from
``Engine.get_stats()`` at scrape time; latencies (time to first token, inter-token latency,
request latency) are observed by the routes. Each app has its own registry, so several servers
in one process (tests) do not collide.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

STATS_TIMEOUT_S = 30.0  # the scheduler answers between steps; one step can be a long prefill
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120)


class _EngineCollector:
    """Reports the stats snapshot taken just before rendering (get_stats waits on the scheduler:
    it runs on a worker thread, never on the event loop)."""

    def __init__(self) -> None:
        self.stats: dict = {}

    def collect(self):
        stats = self.stats
        if not stats:
            return
        yield GaugeMetricFamily("braid_running_requests", "requests being prefilled or decoded", stats["running"])
        yield GaugeMetricFamily("braid_waiting_requests", "requests queued for admission", stats["waiting"])
        used = stats["pool_slots"] - stats["free_slots"] - stats["evictable_slots"]
        yield GaugeMetricFamily("braid_kv_usage_ratio", "KV slots held by requests / pool size",
                                used / max(stats["pool_slots"], 1))
        yield GaugeMetricFamily("braid_kv_cached_slots", "KV slots held only by the radix cache",
                                stats["evictable_slots"])
        yield GaugeMetricFamily("braid_cache_hit_rate", "prompt tokens served from the radix cache / prompt tokens",
                                stats["cached_tokens"] / max(stats["prompt_tokens"], 1))
        yield CounterMetricFamily("braid_prompt_tokens", "prompt tokens received", stats["prompt_tokens"])
        yield CounterMetricFamily("braid_cached_prompt_tokens", "prompt tokens served from the cache",
                                  stats["cached_tokens"])
        yield CounterMetricFamily("braid_generation_tokens", "tokens generated", stats["generated_tokens"])
        yield CounterMetricFamily("braid_retractions", "requests retracted for lack of KV", stats["retractions"])


class Metrics:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        self.engine_stats = _EngineCollector()
        self.registry.register(self.engine_stats)
        self.ttft = Histogram("braid_time_to_first_token_seconds", "streamed requests: arrival to first text",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("braid_inter_token_latency_seconds", "streamed requests: time between text chunks",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("braid_request_latency_seconds", "arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)

    async def render(self) -> tuple[bytes, str]:
        """The metrics text; the engine's stats are read on a worker thread (bounded wait)."""
        self.engine_stats.stats = await asyncio.wait_for(asyncio.to_thread(self.engine.get_stats), STATS_TIMEOUT_S)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def timer(self) -> StreamTimer:
        return StreamTimer(self)


class StreamTimer:
    """Latencies of one request, with one or more choices (streams) identified by index."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.last: dict[int, float] = {}

    def chunk(self, index: int, has_text: bool) -> None:
        if not has_text:
            return
        now = time.monotonic()
        if index in self.last:
            self.metrics.itl.observe(now - self.last[index])
        else:
            self.metrics.ttft.observe(now - self.start)
        self.last[index] = now

    def done(self) -> None:
        self.metrics.e2e.observe(time.monotonic() - self.start)
