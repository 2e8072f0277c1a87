"""Istio's HTTP metrics and the per-request access-log line (istio-ambient.md §8)."""

from __future__ import annotations

import json

from zerotunnel.waypoint.telemetry import RequestRecord, RequestTelemetry


def test_record_metrics_and_log_line() -> None:
    lines: list[str] = []
    telemetry = RequestTelemetry("waypoint", sink=lines.append)
    for code in (200, 200, 403):
        telemetry.record(
            RequestRecord(
                method="GET",
                path="/data",
                authority="app-a",
                protocol="HTTP/1.1",
                src_identity="spiffe://cluster.local/ns/b/sa/b",
                response_code=code,
                duration_ms=3.5,
                policy="ns/p" if code == 403 else None,
                bytes_sent=10,
            )
        )
    text = telemetry.render().decode()
    assert (
        'istio_requests_total{connection_security_policy="mutual_tls",destination_principal="unknown"' in text
    )
    assert 'reporter="waypoint",request_protocol="http",response_code="200"' in text
    assert (
        'response_code="200",response_flags="-",source_principal="spiffe://cluster.local/ns/b/sa/b"' in text
    )
    counts = {
        line.split("response_code=")[1][:5]: line.rsplit(" ", 1)[1]
        for line in text.splitlines()
        if line.startswith("istio_requests_total{")
    }
    assert counts == {'"200"': "2.0", '"403"': "1.0"}
    assert "istio_request_duration_milliseconds_bucket" in text and 'le="5.0"' in text
    first, _, denied = (json.loads(x) for x in lines)
    assert first["message"] == "request complete" and first["level"] == "info"
    assert "policy" not in first and first["duration_ms"] == 3.5
    assert denied["level"] == "warn" and denied["policy"] == "ns/p" and denied["response_code"] == 403


def test_event_line() -> None:
    lines: list[str] = []
    RequestTelemetry("source", sink=lines.append).event("tls handshake failed", {"error": "x"})
    assert json.loads(lines[0]) == {
        "level": "warn",
        "target": "access",
        "message": "tls handshake failed",
        "error": "x",
    }
