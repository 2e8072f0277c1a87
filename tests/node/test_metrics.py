from __future__ import annotations

from datetime import UTC, datetime

from zerotunnel.node.metrics import TRAFFIC_LABELS, ProxyMetrics, TrafficLabels


def _line(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


def test_istio_names_and_labels() -> None:
    m = ProxyMetrics()
    labels = TrafficLabels(
        reporter="destination",
        source_principal="spiffe://cluster.local/ns/a/sa/b",
        destination_principal="spiffe://cluster.local/ns/c/sa/d",
        connection_security_policy="mutual_tls",
    )
    m.connection_opened(labels)
    m.connection_closed(labels, bytes_sent=10, bytes_recv=20)
    text = m.render().decode()
    for name in (
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
    ):
        (line,) = _line(text, name)
        for label in TRAFFIC_LABELS:
            assert f'{label}="' in line
        assert 'source_workload="unknown"' in line and 'request_protocol="tcp"' in line
    assert _line(text, "istio_tcp_sent_bytes_total")[0].endswith(" 10.0")
    assert _line(text, "istio_tcp_received_bytes_total")[0].endswith(" 20.0")
    assert 'istio_tcp_sockets_open{reporter="destination"} 0.0' in text
    assert not _line(text, "istio_tcp_connections_failed_total")


def test_source_reporter_flips_bytes_and_failures_counted() -> None:
    m = ProxyMetrics()
    labels = TrafficLabels(reporter="source", response_flags="CONNECT")
    m.connection_opened(labels)
    m.connection_closed(labels, bytes_sent=10, bytes_recv=20)
    text = m.render().decode()
    assert _line(text, "istio_tcp_sent_bytes_total")[0].endswith(" 20.0")  # istio#32399
    assert _line(text, "istio_tcp_received_bytes_total")[0].endswith(" 10.0")
    assert _line(text, "istio_tcp_connections_failed_total")[0].endswith(" 1.0")


def test_extra_metrics_and_own_registry() -> None:
    a, b = ProxyMetrics(), ProxyMetrics()
    when = datetime(2030, 1, 1, tzinfo=UTC)
    a.set_cert_expiry("spiffe://cluster.local/ns/a/sa/b", when)
    a.handshake_failed("inbound", "unknown-root")
    text = a.render().decode()
    (expiry,) = _line(text, "istio_cert_expiry_timestamp_seconds")
    assert 'identity="spiffe://cluster.local/ns/a/sa/b"' in expiry
    assert float(expiry.rsplit(" ", 1)[1]) == when.timestamp()
    assert 'istio_tls_handshake_failures_total{direction="inbound",reason="unknown-root"} 1.0' in text
    assert "unknown-root" not in b.render().decode()
    a.forget_cert("spiffe://cluster.local/ns/a/sa/b")
    a.forget_cert("never-set")
    assert "ns/a/sa/b" not in a.render().decode()
