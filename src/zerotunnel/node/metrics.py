"""Prometheus metrics with Istio's names and labels (spec/istio-ambient.md §8.1), plus what Istio lacks.

A dashboard or alert written for ztunnel works unchanged: same metric names, same label set, unknown
values rendered as `unknown`. Two additions a Python mesh needs to be operated: certificate expiry
per identity and TLS handshake failures by reason (a refused forged client is otherwise invisible).
Each proxy process owns its registry (`ProxyMetrics()`), so tests and several proxies in one process
never share counters.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

UNKNOWN = "unknown"

TRAFFIC_LABELS = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)


@dataclass(frozen=True, slots=True)
class TrafficLabels:
    """One connection's labels (§8.1). `reporter` is `source` on outbound, `destination` on inbound;
    principals are SPIFFE IDs; `response_flags` is `-` unless the connection failed."""

    reporter: str
    source_workload: str = UNKNOWN
    source_canonical_service: str = UNKNOWN
    source_canonical_revision: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    source_app: str = UNKNOWN
    source_version: str = UNKNOWN
    source_cluster: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_canonical_service: str = UNKNOWN
    destination_canonical_revision: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_app: str = UNKNOWN
    destination_version: str = UNKNOWN
    destination_cluster: str = UNKNOWN
    request_protocol: str = "tcp"
    response_flags: str = "-"
    connection_security_policy: str = UNKNOWN

    def values(self) -> list[str]:
        return [getattr(self, name) or UNKNOWN for name in TRAFFIC_LABELS]


if tuple(f.name for f in fields(TrafficLabels)) != TRAFFIC_LABELS:  # the label order is the contract
    raise AssertionError("TrafficLabels fields must match TRAFFIC_LABELS")


class ProxyMetrics:
    """The node proxy's metrics on its own registry; `render()` is what 15020 `/metrics` serves."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.opened = Counter("istio_tcp_connections_opened", "TCP connections opened", TRAFFIC_LABELS,
                              registry=r)
        self.closed = Counter("istio_tcp_connections_closed", "TCP connections closed", TRAFFIC_LABELS,
                              registry=r)
        self.failed = Counter("istio_tcp_connections_failed", "TCP connections that failed", TRAFFIC_LABELS,
                              registry=r)
        self.sent = Counter("istio_tcp_sent_bytes", "Bytes sent during TCP connections", TRAFFIC_LABELS,
                            registry=r)
        self.received = Counter("istio_tcp_received_bytes", "Bytes received during TCP connections",
                                TRAFFIC_LABELS, registry=r)
        self.sockets_open = Gauge("istio_tcp_sockets_open", "Open sockets", ["reporter"], registry=r)
        self.cert_expiry = Gauge("istio_cert_expiry_timestamp_seconds",
                                 "Unix time at which the workload certificate expires", ["identity"],
                                 registry=r)
        self.handshake_failures = Counter("istio_tls_handshake_failures",
                                          "TLS handshakes refused or failed, by side and reason",
                                          ["direction", "reason"], registry=r)
        self.hbone_connections = Gauge("istio_hbone_pool_connections",
                                       "HBONE client connections open in the pool", registry=r)
        self.shed = Counter("zerotunnel_connections_shed",
                            "Outbound connections reset at accept because too many were being set up",
                            registry=r)

    def connection_opened(self, labels: TrafficLabels) -> None:
        self.opened.labels(*labels.values()).inc()
        self.sockets_open.labels(labels.reporter).inc()

    def connection_closed(self, labels: TrafficLabels, bytes_sent: int, bytes_recv: int) -> None:
        """Counts the close and the bytes. `bytes_sent`/`bytes_recv` are the access log's view;
        for `reporter=source` Istio flips them in the metrics (§8.1, istio#32399)."""
        values = labels.values()
        self.closed.labels(*values).inc()
        self.sockets_open.labels(labels.reporter).dec()
        if labels.response_flags not in ("-", ""):
            self.failed.labels(*values).inc()
        if labels.reporter == "source":
            bytes_sent, bytes_recv = bytes_recv, bytes_sent
        if bytes_sent:
            self.sent.labels(*values).inc(bytes_sent)
        if bytes_recv:
            self.received.labels(*values).inc(bytes_recv)

    def connection_failed_early(self, labels: TrafficLabels) -> None:
        """A connection refused before it was ever counted as opened (e.g. policy denial)."""
        self.opened.labels(*labels.values()).inc()
        self.closed.labels(*labels.values()).inc()
        self.failed.labels(*labels.values()).inc()

    def connection_shed(self) -> None:
        self.shed.inc()

    def handshake_failed(self, direction: str, reason: str) -> None:
        self.handshake_failures.labels(direction, reason).inc()

    def set_cert_expiry(self, identity: str, not_after: datetime) -> None:
        self.cert_expiry.labels(identity).set(not_after.timestamp())

    def forget_cert(self, identity: str) -> None:
        with contextlib.suppress(KeyError):
            self.cert_expiry.remove(identity)

    def render(self) -> bytes:
        return generate_latest(self.registry)
