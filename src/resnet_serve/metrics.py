"""Prometheus metrics (prometheus-client), served at ``GET /metrics``.

Metric objects are module-level, as prometheus-client intends. Under ``--workers N`` every
worker is a separate process: the CLI then sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers
start, each process writes its samples there, and ``/metrics`` aggregates all of them, so any
worker answers for the whole server.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)

REQUESTS = Counter("resnet_serve_requests", "HTTP requests by route and status", ["route", "method", "status"])
CONNECTIONS_CLOSED = Counter("resnet_serve_connections_closed",
                             "Connections closed before their request was read: headers late or too large",
                             ["reason"])
REQUEST_SECONDS = Histogram("resnet_serve_request_duration_seconds", "HTTP request latency", ["route"],
                            buckets=LATENCY_BUCKETS)
# Per model (the ``model`` label): what its pipeline and inference thread do.
QUEUE_WAIT_SECONDS = Histogram("resnet_serve_queue_wait_seconds", "Time a request waited for its batch",
                               ["model"], buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("resnet_serve_batch_size", "Requests per forward pass", ["model"], buckets=BATCH_BUCKETS)
INFERENCE_SECONDS = Histogram("resnet_serve_inference_seconds", "Forward-pass time per batch", ["model"],
                              buckets=LATENCY_BUCKETS)
QUEUE_DEPTH = Gauge("resnet_serve_queue_depth", "Requests waiting for a batch", ["model"],
                    multiprocess_mode="livesum")
IN_FLIGHT = Gauge("resnet_serve_in_flight", "Images admitted and not yet answered (each image of a batch counts)",
                  ["model"], multiprocess_mode="livesum")
CACHE_LOOKUPS = Counter("resnet_serve_cache_lookups", "Result cache lookups", ["model", "result"])
MODEL_INFO = Gauge("resnet_serve_model_info", "The model being served (value 1)",
                   ["model", "device", "precision", "weights", "runtime"], multiprocess_mode="max")


def render() -> tuple[bytes, str]:
    """The exposition text for this process, or for all workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def route_of(scope: dict[str, object]) -> str:
    """The matched route's template (bounded label values), or ``unmatched``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
