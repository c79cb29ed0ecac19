"""Prometheus metrics of the gateway, in a registry per app (so several apps in one process don't collide).

- `dae_http_requests_total{method, route, status}` and `dae_http_request_duration_seconds{method, route}`:
  labelled by the route template (`/jobs/{job_id}`), never by the raw path, so ids don't explode cardinality;
  paths no route matches and methods outside GET/POST/PUT/PATCH/DELETE/HEAD/OPTIONS are `other`, so no client input
  becomes a label value.
- `dae_reconstruct_batch_size` (images per onnxruntime run) and `dae_reconstruct_batch_seconds`.
- `dae_jobs{state}`: read from Redis (JobStore.counts_by_state) when /metrics is scraped.
- `dae_inference_sessions`, `dae_inference_session_bytes`, `dae_inference_queued_images`: read at scrape time.

With several uvicorn worker processes each has its own registry; scrape each, or run one process per container.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

#: Methods that get their own label value; any other (clients may invent them) is counted as OTHER.
KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
#: The label value of methods outside KNOWN_METHODS, of paths no route matched and of impossible statuses.
OTHER = "other"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class _ScrapeTimeGauges(Collector):
    """Gauges computed when scraped: jobs by state (Redis) and the inference engine's state."""

    def __init__(self) -> None:
        self.job_counts: Callable[[], dict[str, int]] | None = None
        self.inference_state: Callable[[], dict[str, float]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.job_counts is not None:
            try:
                counts = self.job_counts()
            except Exception:  # Redis down must not break the scrape of everything else
                logger.warning("could not read job counts for /metrics", exc_info=True)
            else:
                family = GaugeMetricFamily("dae_jobs", "Training jobs by state.", labels=["state"])
                for state, count in sorted(counts.items()):
                    family.add_metric([state], count)
                yield family
        if self.inference_state is not None:
            inference = self.inference_state()
            yield GaugeMetricFamily(
                "dae_inference_sessions", "onnxruntime sessions loaded.", value=inference["sessions"]
            )
            yield GaugeMetricFamily(
                "dae_inference_session_bytes", "Estimated memory of the loaded sessions.", value=inference["session_bytes"]
            )
            yield GaugeMetricFamily(
                "dae_inference_queued_images", "Images waiting or running in the micro-batcher.", value=inference["queued"]
            )


class GatewayMetrics:
    """The gateway's metrics and their registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dae_http_requests", "HTTP requests by route template and status.", ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "dae_http_request_duration_seconds", "Time to answer, by route template.", ["method", "route"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "dae_reconstruct_batch_size", "Images per onnxruntime run (micro-batch size).",
            buckets=_BATCH_BUCKETS, registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "dae_reconstruct_batch_seconds", "Time of one onnxruntime run.", buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.scrape_time = _ScrapeTimeGauges()
        self.registry.register(self.scrape_time)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request; a method outside HTTP's standard ones is counted as `other`."""
        # Clients choose the method: unbounded label values would grow /metrics (and this cache) without limit.
        if method not in KNOWN_METHODS:
            method = OTHER
        # The labelled children, looked up once per label set: labels() costs a few µs per call on the hot path.
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            status_label = str(status) if 100 <= status <= 599 else OTHER
            children = (self.requests.labels(method, route, status_label), self.latency.labels(method, route))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        """Record one micro-batch (called on the event loop when the batch is back; prometheus_client is thread-safe)."""
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
