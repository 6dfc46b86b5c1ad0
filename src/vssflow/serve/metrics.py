"""`GET /metrics`: what `vssflow-serve` has done, in Prometheus' text format (prometheus_client).

Each server has a registry of its own (nothing of the process's default one, so two apps in one
process, as in tests, never share counts):

* `vssflow_requests_total{path, status}`: requests answered, by path and HTTP status (499: the
  client left); paths other than the service's are counted as `other`, so a scan cannot grow
  the label set without bound;
* `vssflow_request_seconds{path}`: a histogram of their seconds, upload to last byte;
* `vssflow_requests_in_flight`: admitted and not yet answered;
* `vssflow_requests_waiting`: `/v1/generate` requests read and waiting for the model;
* `vssflow_batch_requests`: a histogram of the requests whose windows ran together in one batch;
* `vssflow_audio_seconds_total`: seconds of sound sent;
* `vssflow_model_info{model, backend, precision}`: what is loaded.

No token is asked, as for `/healthz`: the server listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from starlette.requests import Request
from starlette.responses import Response

PATHS = frozenset({"/v1/generate", "/v1/stream", "/healthz", "/metrics"})
# Seconds: a health check, a short clip on a GPU ... a long clip on a CPU.
BUCKETS = (0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    def __init__(self, in_flight: Callable[[], int], waiting: Callable[[], int], most_batch: int,
                 model: Mapping[str, str]):
        self.registry = CollectorRegistry()
        self.requests = Counter("vssflow_requests", "Requests answered, by path and HTTP status",
                                ["path", "status"], registry=self.registry)
        self.seconds = Histogram("vssflow_request_seconds", "Seconds from a request's arrival to its last byte",
                                 ["path"], buckets=BUCKETS, registry=self.registry)
        Gauge("vssflow_requests_in_flight", "Requests admitted and not yet answered",
              registry=self.registry).set_function(in_flight)
        Gauge("vssflow_requests_waiting", "Requests to /v1/generate read and waiting for the model",
              registry=self.registry).set_function(waiting)
        self.batches = Histogram("vssflow_batch_requests", "Requests whose windows ran together in one batch",
                                 buckets=[n for n in (1, 2, 4, 8, 16, 32, 64) if n < most_batch] + [most_batch],
                                 registry=self.registry)
        self.audio_seconds = Counter("vssflow_audio_seconds", "Seconds of sound sent", registry=self.registry)
        Info("vssflow_model", "The model this server runs", registry=self.registry).info(dict(model))

    def request(self, path: str, status: int, seconds: float) -> None:
        path = path if path in PATHS else "other"
        self.requests.labels(path, str(status)).inc()
        self.seconds.labels(path).observe(seconds)

    def batch(self, requests: int) -> None:
        self.batches.observe(requests)

    def audio(self, seconds: float) -> None:
        self.audio_seconds.inc(seconds)

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
