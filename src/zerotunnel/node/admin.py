"""The node proxy's HTTP endpoints: admin (15000, localhost only), metrics (15020), readiness (15021).

istio-ambient.md §2.1: ztunnel's admin port serves `/config_dump` and friends on localhost only
(security.md: admin never on a routable address); 15020 serves Prometheus at `/metrics` and
`/stats/prometheus`; 15021 answers `/healthz/ready`. These are GET-only, tiny and rarely hit, so a
minimal HTTP/1.0-style responder is enough: one request per connection, bounded request size.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any, cast

from zerotunnel.errors import InputError
from zerotunnel.node.proxy import NodeProxy

log = logging.getLogger("zerotunnel.admin")

MAX_REQUEST = 8192
Response = tuple[int, str, bytes]
Handler = Callable[[str, str], Awaitable[Response] | Response]


def parse_listen(value: str, *, what: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` → (host, port), with a one-line error naming the flag."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InputError(f"{what}: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - an explicit ":port" means all addresses


def require_loopback(host: str, *, what: str) -> None:
    """security.md: the admin endpoint (config dump, certificates) is never on a routable address."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise InputError(
            f"{what}: {host} is not a loopback address; the admin endpoint must stay on localhost"
        )


def _json(body: object, status: int = 200) -> Response:
    return status, "application/json", (json.dumps(body, indent=2, default=str) + "\n").encode()


class _HttpProtocol(asyncio.Protocol):
    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only duck-typed alike
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if b"\r\n\r\n" not in self._buf and b"\n\n" not in self._buf:
            if len(self._buf) > MAX_REQUEST:
                self._reply((431, "text/plain", b"request too large\n"))
            return
        line = self._buf.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self._reply((400, "text/plain", b"bad request\n"))
            return
        method, target = parts[0], parts[1]
        asyncio.get_running_loop().create_task(self._answer(method, target))

    async def _answer(self, method: str, target: str) -> None:
        try:
            result = self._handler(method, target.split("?", 1)[0])
            reply = await result if not isinstance(result, tuple) else result
        except Exception as exc:  # an admin page must never take the proxy down
            log.exception("admin handler failed")
            reply = (500, "text/plain", f"{exc}\n".encode())
        self._reply(reply)

    def _reply(self, reply: Response) -> None:
        status, ctype, body = reply
        reason = {
            200: "OK",
            400: "Bad Request",
            404: "Not Found",
            405: "Method Not Allowed",
            431: "Request Header Fields Too Large",
            500: "Internal Server Error",
            503: "Service Unavailable",
        }.get(status, "")
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(head.encode() + body)
            self._transport.close()


async def serve(handler: Handler, host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _HttpProtocol(handler), host, port, reuse_address=True)


class AdminEndpoints:
    """The three handlers, reading the live node proxy."""

    def __init__(self, proxy: NodeProxy, stop: Callable[[], None]) -> None:
        self.proxy = proxy
        self._stop = stop

    def admin(self, method: str, path: str) -> Response:
        if path == "/quitquitquit":
            if method != "POST":
                return 405, "text/plain", b"use POST\n"
            self._stop()
            return 200, "text/plain", b"OK\n"
        if method != "GET":
            return 405, "text/plain", b"GET only\n"
        pages: dict[str, Callable[[], object]] = {
            "/": lambda: {"pages": ["/config_dump", "/certs", "/connections", "/policies", "/quitquitquit"]},
            "/config_dump": self.config_dump,
            "/certs": lambda: [asdict(s) for s in self.proxy.certs.status()],
            "/connections": self.connections,
            "/policies": self.policies,
        }
        page = pages.get(path)
        return _json(page()) if page is not None else (404, "text/plain", b"not found\n")

    def metrics(self, method: str, path: str) -> Response:
        if path in ("/metrics", "/stats/prometheus"):
            return 200, "text/plain; version=0.0.4", self.proxy.metrics.render()
        return 404, "text/plain", b"not found\n"

    def readiness(self, method: str, path: str) -> Response:
        if path != "/healthz/ready":
            return 404, "text/plain", b"not found\n"
        if self.proxy.ready:
            return 200, "text/plain", b"ready\n"
        return 503, "text/plain", b"not ready: no configuration loaded\n"

    def config_dump(self) -> dict[str, Any]:
        snap = self.proxy.snapshot
        out: dict[str, Any] = {"node": self.proxy.node, "version": snap.version if snap else None}
        if snap is None:
            return out
        out["workloads"] = [
            {
                "uid": w.uid,
                "ip": w.ip,
                "identity": w.identity,
                "node": w.node,
                "in_mesh": w.in_mesh,
                "waypoint": str(w.waypoint) if w.waypoint else None,
            }
            for w in snap.state.workloads.values()
        ]
        out["services"] = [
            {
                "name": s.key,
                "hostname": s.hostname,
                "vip": s.vip,
                "endpoints": list(s.endpoints),
                "ports": [{"port": p.port, "target_port": p.target_port} for p in s.ports],
                "waypoint": str(s.waypoint) if s.waypoint else None,
            }
            for s in snap.state.services.values()
        ]
        out["pods"] = [
            {"uid": uid, "ip": pod.ip, "identity": str(pod.identity)} for uid, pod in self.proxy.pods.items()
        ]
        out["policies"] = self.policies()
        return out

    def policies(self) -> dict[str, Any]:
        snap = self.proxy.snapshot
        result: dict[str, Any] = {}
        if snap is None:
            return result
        for uid, pod in self.proxy.pods.items():
            w = pod.workload()
            if w is None:
                continue
            policies, warnings = snap.engine.l4_policies(w.namespace, w.labels)
            result[uid] = {"policies": [p.key for p in policies], "warnings": warnings}
        return result

    def connections(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for uid, pod in self.proxy.pods.items():
            if pod.hbone is not None:
                for t in pod.hbone.tunnels():
                    out.append(
                        {
                            "pod": uid,
                            "direction": "inbound",
                            "protocol": "HBONE",
                            "src": f"{t.request.src_addr[0]}:{t.request.src_addr[1]}",
                            "src_identity": str(t.request.source_identity),
                            "target": f"{t.request.target[0]}:{t.request.target[1]}",
                        }
                    )
            for c in pod.plaintext:
                out.append(
                    {
                        "pod": uid,
                        "direction": "inbound",
                        "protocol": "TCP",
                        "src": c.request.src_ip,
                        "target": f"{c.request.dst_ip}:{c.request.dst_port}",
                    }
                )
            for relay in pod.outbound:
                out.append(
                    {
                        "pod": uid,
                        "direction": "outbound",
                        "src": f"{relay.peer_addr[0]}:{relay.peer_addr[1]}" if relay.peer_addr else None,
                    }
                )
        return out
