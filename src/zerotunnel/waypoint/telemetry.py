"""Per-request telemetry of the L7 proxies: Istio's HTTP metrics and one access-log line per request.

istio-ambient.md §8: `istio_requests_total` and `istio_request_duration_milliseconds` with Istio's
standard labels (`reporter="waypoint"` at a waypoint, `"source"` at the ingress gateway), on a registry
owned by the proxy (no global state; several proxies per test process). The access log is JSON, one
line per request, with Envoy's field names where they exist (`method`, `path`, `protocol`,
`response_code`, `response_flags`, `response_code_details`, `upstream_host`) and the identities and
the deciding policy, so a denial is never anonymous (DESIGN.md §5).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

LOGGER = logging.getLogger("zerotunnel.access")
UNKNOWN = "unknown"

REQUEST_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_service",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "request_protocol",
    "response_code",
    "response_flags",
    "connection_security_policy",
)
DURATION_BUCKETS = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)
"""Istio's default buckets for `istio_request_duration_milliseconds`."""


@dataclass(slots=True)
class RequestRecord:
    """What is known about one HTTP request; logged once it is answered."""

    method: str
    path: str
    authority: str
    protocol: str
    src_addr: str | None = None
    src_identity: str | None = None
    src_workload: str | None = None
    src_namespace: str | None = None
    dst_service: str | None = None
    dst_workload: str | None = None
    dst_namespace: str | None = None
    dst_identity: str | None = None
    upstream_host: str | None = None
    response_code: int = 0
    response_flags: str = "-"
    response_code_details: str | None = None
    policy: str | None = None
    reason: str | None = None
    xfcc: str | None = None
    bytes_received: int = 0
    bytes_sent: int = 0
    duration_ms: float = 0.0


_RECORD_FIELDS = tuple(f.name for f in fields(RequestRecord))


class RequestTelemetry:
    """Counters, histogram and access log of one proxy process."""

    def __init__(
        self,
        reporter: str,
        *,
        sink: Callable[[str], None] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.reporter = reporter
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.requests = Counter("istio_requests_total", "Requests", REQUEST_LABELS, registry=self.registry)
        self.duration = Histogram(
            "istio_request_duration_milliseconds",
            "Request duration in ms",
            REQUEST_LABELS,
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.request_bytes = Counter(
            "istio_request_bytes", "Request body bytes", REQUEST_LABELS, registry=self.registry
        )
        self.response_bytes = Counter(
            "istio_response_bytes", "Response body bytes", REQUEST_LABELS, registry=self.registry
        )
        self._sink = sink
        self._children: dict[tuple[str, ...], tuple[Any, Any, Any, Any]] = {}
        """Label tuple → metric children: resolving labels is a measurable share of a request."""

    def record(self, rec: RequestRecord) -> None:
        if rec.protocol == "TCP":  # a relayed TCP stream: a log line, not an HTTP request metric
            body = {name: value for name in _RECORD_FIELDS if (value := getattr(rec, name)) is not None}
            body.pop("response_code", None)
            body["duration_ms"] = round(rec.duration_ms, 3)
            level = "info" if rec.response_flags == "-" else "warn"
            self._emit(level, "connection complete", body)
            return
        key = (
            self.reporter,
            rec.src_workload or UNKNOWN,
            rec.src_namespace or UNKNOWN,
            rec.src_identity or UNKNOWN,
            rec.dst_service or UNKNOWN,
            rec.dst_workload or UNKNOWN,
            rec.dst_namespace or UNKNOWN,
            rec.dst_identity or UNKNOWN,
            "http",
            str(rec.response_code),
            rec.response_flags,
            "mutual_tls",
        )
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(*key),
                self.duration.labels(*key),
                self.request_bytes.labels(*key),
                self.response_bytes.labels(*key),
            )
        requests, duration, request_bytes, response_bytes = children
        requests.inc()
        duration.observe(rec.duration_ms)
        request_bytes.inc(rec.bytes_received)
        response_bytes.inc(rec.bytes_sent)
        body = {name: value for name in _RECORD_FIELDS if (value := getattr(rec, name)) is not None}
        body["duration_ms"] = round(rec.duration_ms, 3)
        self._emit("info" if rec.response_code < 400 else "warn", "request complete", body)

    def event(self, message: str, fields: dict[str, object]) -> None:
        """A connection-level event (a refused handshake, a refused client certificate), one line."""
        self._emit("warn", message, fields)

    def _emit(self, level: str, message: str, body: dict[str, object]) -> None:
        line = json.dumps(
            {"level": level, "target": "access", "message": message, **body},
            separators=(",", ":"),
            ensure_ascii=False,
        )
        if self._sink is not None:
            self._sink(line)
        else:
            LOGGER.info(line)

    def render(self) -> bytes:
        return generate_latest(self.registry)
