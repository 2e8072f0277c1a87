from __future__ import annotations

import pytest

from zerotunnel.hbone.authority import HboneAuthority
from zerotunnel.hbone.headers import (
    Baggage,
    build_request_headers,
    connect_request_headers,
    format_forwarded,
    format_traceparent,
    parse_baggage,
    parse_forwarded_host,
)


def test_baggage_order_and_empty_fields() -> None:
    b = Baggage(
        cluster="Kubernetes",
        namespace="default",
        workload_type="Deployment",
        workload_name="curl",
        service_name="curl",
        service_version="v1",
    )
    assert b.encode() == (
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=curl,"
        "service.name=curl,service.version=v1"
    )
    assert Baggage().encode() == ""
    assert parse_baggage(b.encode())["k8s.deployment.name"] == "curl"
    assert parse_baggage("a=,b=2, c = 3,junk") == {"b": "2", "c": "3"}


def test_forwarded() -> None:
    assert format_forwarded("10.0.0.1", 5555) == 'for="10.0.0.1:5555"'
    assert (
        format_forwarded("fd00::1", 5, "svc.ns.svc.cluster.local")
        == 'for="[fd00::1]:5";host=svc.ns.svc.cluster.local'
    )
    assert parse_forwarded_host('for="1.2.3.4:5";host="a.b"') == "a.b"
    assert parse_forwarded_host('for="1.2.3.4:5";host=') is None
    assert parse_forwarded_host('for="1.2.3.4:5"') is None
    assert parse_forwarded_host("host=ünï") is None


def test_traceparent() -> None:
    tp = format_traceparent(bytes(range(16)), bytes(range(8)))
    assert tp == "00-000102030405060708090a0b0c0d0e0f-0001020304050607-00"
    assert len(tp) == 55
    with pytest.raises(ValueError):
        format_traceparent(b"x", b"y")


def test_request_headers() -> None:
    hs = build_request_headers(
        baggage=Baggage(namespace="ns"),
        forwarded_for=("10.0.0.1", 1),
        forwarded_host="s.ns.svc.cluster.local",
        trace_id=b"\x01" * 16,
        parent_id=b"\x02" * 8,
    )
    assert [k for k, _ in hs] == [b"baggage", b"forwarded", b"traceparent"]
    full = connect_request_headers(HboneAuthority.from_ip("fd00::2", 80), hs)
    assert full[:2] == [(b":method", b"CONNECT"), (b":authority", b"[fd00::2]:80")]
    assert not any(k in (b":scheme", b":path") for k, _ in full)
