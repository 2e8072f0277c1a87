from __future__ import annotations

import json
import logging

import pytest

from zerotunnel.node.accesslog import AccessLog, ConnectionRecord


def test_complete_line_fields() -> None:
    lines: list[str] = []
    rec = ConnectionRecord(
        direction="outbound",
        src_addr=("10.244.1.12", 58508),
        dst_addr=("10.244.1.10", 15008),
        dst_hbone_addr="10.244.1.10:9080",
        src_identity="spiffe://cluster.local/ns/default/sa/curl",
        dst_service="productpage.default.svc.cluster.local",
        bytes_sent=80,
        bytes_recv=175,
        started=100.0,
    )
    AccessLog(lines.append).complete(rec)
    (line,) = lines
    entry = json.loads(line)
    assert (
        entry["level"] == "info" and entry["message"] == "connection complete" and entry["target"] == "access"
    )
    assert entry["src.addr"] == "10.244.1.12:58508" and entry["dst.addr"] == "10.244.1.10:15008"
    assert entry["dst.hbone_addr"] == "10.244.1.10:9080" and entry["direction"] == "outbound"
    assert entry["bytes_sent"] == 80 and entry["bytes_recv"] == 175
    assert entry["duration"].endswith("ms")
    assert "dst.identity" not in entry and "error" not in entry  # absent fields are left out


def test_error_and_failed_lines() -> None:
    lines: list[str] = []
    log = AccessLog(lines.append)
    rec = ConnectionRecord(
        direction="inbound",
        src_addr=("fd00::1", 1),
        dst_addr=("fd00::2", 15008),
        src_identity="spiffe://x/ns/a/sa/b",
        error="connection closed due to policy rejection: allow policies exist, but none allowed",
    )
    log.complete(rec)
    log.failed(rec)
    done, failed = (json.loads(x) for x in lines)
    assert done["level"] == "error"
    assert (
        done["error"] == "connection closed due to policy rejection: allow policies exist, but none allowed"
    )
    assert done["src.addr"] == "[fd00::1]:1"
    assert failed["level"] == "warn" and failed["message"] == "connection failed"
    assert set(failed) == {"level", "target", "message", "src.addr", "dst.addr", "direction", "error"}


def test_default_sink_is_the_access_logger(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="zerotunnel.access"):
        AccessLog().complete(ConnectionRecord(direction="inbound"))
    assert json.loads(caplog.records[0].getMessage())["direction"] == "inbound"
