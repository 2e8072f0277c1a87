"""One JSON access-log line per connection, with ztunnel's field names (spec/istio-ambient.md §8.2).

ztunnel logs `connection complete` (info, or error with `error=`) and `connection failed` (warn, for
failures before a connection was established) under the tracing target `access`. We keep the same
messages and dotted field names so `grep`s and log pipelines carry over, as one JSON object per line,
and the `error` field holds Istio's exact error strings.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

LOGGER = logging.getLogger("zerotunnel.access")


def _addr(addr: tuple[str, int] | None) -> str | None:
    if addr is None:
        return None
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(slots=True)
class ConnectionRecord:
    """What is known about one proxied connection; filled in as it proceeds, logged once at the end."""

    direction: str  # "inbound" | "outbound"
    src_addr: tuple[str, int] | None = None
    dst_addr: tuple[str, int] | None = None  # outbound: next hop ip:15008; inbound: the ip:15008 it landed on
    dst_hbone_addr: str | None = None
    src_workload: str | None = None
    src_namespace: str | None = None
    src_identity: str | None = None
    src_cluster: str | None = None
    dst_service: str | None = None
    dst_workload: str | None = None
    dst_namespace: str | None = None
    dst_identity: str | None = None
    dst_cluster: str | None = None
    bytes_sent: int = 0
    bytes_recv: int = 0
    error: str | None = None
    response_flag: str = "-"
    started: float = field(default_factory=time.monotonic)
    established: bool = False

    def fields(self, now: float | None = None) -> dict[str, object]:
        end = time.monotonic() if now is None else now
        out: dict[str, object] = {
            "src.addr": _addr(self.src_addr),
            "src.workload": self.src_workload,
            "src.namespace": self.src_namespace,
            "src.identity": self.src_identity,
            "src.cluster": self.src_cluster,
            "dst.addr": _addr(self.dst_addr),
            "dst.hbone_addr": self.dst_hbone_addr,
            "dst.service": self.dst_service,
            "dst.workload": self.dst_workload,
            "dst.namespace": self.dst_namespace,
            "dst.identity": self.dst_identity,
            "dst.cluster": self.dst_cluster,
            "direction": self.direction,
            "bytes_sent": self.bytes_sent,
            "bytes_recv": self.bytes_recv,
            "duration": f"{round((end - self.started) * 1000)}ms",
            "error": self.error,
        }
        return {k: v for k, v in out.items() if v is not None}


class AccessLog:
    """Writes each record as one JSON line to `sink` (default: the `zerotunnel.access` logger)."""

    def __init__(self, sink: Callable[[str], None] | None = None) -> None:
        self._sink = sink

    def _emit(self, level: str, message: str, body: dict[str, object]) -> None:
        line = json.dumps({"level": level, "target": "access", "message": message, **body},
                          separators=(",", ":"), ensure_ascii=False)
        if self._sink is not None:
            self._sink(line)
        else:
            LOGGER.log(logging.ERROR if level == "error" else logging.WARNING if level == "warn"
                       else logging.INFO, line)

    def complete(self, record: ConnectionRecord) -> None:
        """`connection complete`: info on success, error with the exact error string on failure."""
        level = "error" if record.error else "info"
        self._emit(level, "connection complete", record.fields())

    def failed(self, record: ConnectionRecord) -> None:
        """`connection failed`: before the connection was established, only addresses and error."""
        body = record.fields()
        keep = ("src.addr", "dst.addr", "dst.hbone_addr", "direction", "error")
        self._emit("warn", "connection failed", {k: body[k] for k in keep if k in body})
