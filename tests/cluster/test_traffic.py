"""The traffic matrix's parsing of cases and of the node proxies' access-log lines (unit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zerotunnel.cluster.traffic import (
    Result,
    _log_sizes,
    _mine,
    _new_records,
    parse_case,
    render,
    split_method,
)
from zerotunnel.errors import InputError


def test_parse_case() -> None:
    assert parse_case("ns-b/app-b=http://app-a.ns-a/data?x=1") == ("ns-b/app-b", "http://app-a.ns-a/data?x=1")
    assert parse_case("ns-b/app-b=POST http://a/data") == ("ns-b/app-b", "POST http://a/data")
    for bad in ("app-b=http://x", "ns/app", "ns/app=", "ns/app=post http://a", "ns/app=POST "):
        with pytest.raises(InputError):
            parse_case(bad)


def test_split_method() -> None:
    assert split_method("http://a/data") == ("GET", "http://a/data")
    assert split_method("POST http://a/data") == ("POST", "http://a/data")
    assert split_method("DELETE  http://a/x?y=1") == ("DELETE", "http://a/x?y=1")


def test_new_records_reads_only_appended_access_lines(tmp_path: Path) -> None:
    log = tmp_path / "node-node-1.log"
    old = {"target": "access", "src.addr": "10.0.0.9:1", "direction": "inbound"}
    log.write_text(json.dumps(old) + "\n")
    sizes = _log_sizes([log, tmp_path / "node-missing.log"])
    deny = {"level": "error", "target": "access", "message": "connection complete",
            "src.addr": "10.0.0.3:4000", "direction": "inbound",
            "error": "connection closed due to policy rejection: explicitly denied by: a/b"}
    v6 = {"target": "access", "src.addr": "[fd00::3]:80", "direction": "outbound"}
    with log.open("a") as f:
        f.write("2026-01-01 INFO zerotunnel.node: pod served\n")
        f.write("2026-01-01 INFO zerotunnel.access: " + json.dumps(deny) + "\n")
        f.write(json.dumps({"target": "other"}) + "\n{broken json\n")
        f.write(json.dumps(v6) + "\n")
    records = _new_records(sizes)
    assert [(n, r["src.addr"]) for n, r in records] == [
        ("node proxy node-1", "10.0.0.3:4000"), ("node proxy node-1", "[fd00::3]:80")]
    assert _mine(records, "10.0.0.3") == [("node proxy node-1", deny)]
    assert _mine(records, "fd00::3") == [("node proxy node-1", v6)]
    assert _mine(records, "10.0.0.30") == []
    wp_log = tmp_path / "pod-ns-a.waypoint.log"
    wp_log.write_text("")
    sizes = _log_sizes([wp_log])
    wp = {"target": "access", "message": "request complete", "src_addr": "10.0.0.3:5000",
          "response_code": 403}
    wp_log.write_text(json.dumps(wp) + "\n")
    assert _mine(_new_records(sizes), "10.0.0.3") == [("waypoint ns-a/waypoint", wp)]


def test_render() -> None:
    r = Result("ns-b/app-b", "http://a/data", "zerotunnel exec -n ns-b app-b -- curl -s http://a/data",
               "spiffe://td/ns/ns-b/sa/b", "ns-a/app-a", "spiffe://td/ns/ns-a/sa/a", "ALLOW",
               "allowed by: ns-a/p", "200", "node proxy n1 (inbound)")
    text = render([r])
    assert text.splitlines()[0] == "$ zerotunnel exec -n ns-b app-b -- curl -s http://a/data"
    assert "client identity  spiffe://td/ns/ns-b/sa/b" in text
    assert "decision         ALLOW  (by node proxy n1 (inbound))" in text
    assert "reason           allowed by: ns-a/p" in text and "HTTP result      200" in text
