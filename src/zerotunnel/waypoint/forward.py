"""Forward one HTTP request into the mesh, as the waypoint or the ingress gateway does.

istio-ambient.md §2.4 and §6.1: the route is the pure `mesh.routing.plan_outbound` decision taken for
the proxy's own workload, so a waypoint goes straight to an endpoint (`podIP:15008`, authority
`podIP:targetPort`) while the ingress gateway goes through the destination's waypoint when it has one.
The tunnel is opened with the proxy's **own** identity (no impersonation, §6.1, §7.3), on the pooled
HBONE connections of `HbonePool` (§1.5). A backend failure is answered 503 with Envoy's reason text.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets

import h11

from zerotunnel.hbone.headers import Baggage, build_request_headers
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.mesh.model import MeshState, Workload
from zerotunnel.mesh.routing import HboneRoute, PassthroughRoute, RoutingError, plan_outbound
from zerotunnel.node.hbone_client import HboneConnectError, HbonePool, PoolKey
from zerotunnel.waypoint.http import (
    ByteChannel,
    Headers,
    HttpError,
    HttpRequest,
    HttpResponse,
    StaleConnection,
    StreamChannel,
    TcpChannel,
    UpstreamHttp,
    exchange,
    text_response,
)
from zerotunnel.waypoint.telemetry import RequestRecord

UPSTREAM_FAILURE = "upstream connect error or disconnect/reset before headers. reset reason: "


MAX_IDLE_PER_KEY = 64


class MeshForwarder:
    """Forwards each request over an HTTP/1.1 connection inside an HBONE stream (one stream per
    upstream connection, many streams per pooled mTLS connection, §1.5). Upstream connections are
    kept alive and reused per (pool key, authority) — the destination's node proxy then keeps one app
    connection per stream instead of dialling the app for every request; a reused connection found
    closed before any response byte is retried once on a fresh stream."""

    def __init__(self, pool: HbonePool, cluster: str = "Kubernetes", timeout: float = 30.0) -> None:
        self.pool = pool
        self.cluster = cluster
        self.timeout = timeout
        self._pick = itertools.count()
        self._idle: dict[tuple[object, str], list[UpstreamHttp]] = {}

    def close_idle(self) -> None:
        for conns in self._idle.values():
            for up in conns:
                up.channel.abort("forwarder closed")
        self._idle.clear()

    def _take(self, key: tuple[object, str]) -> UpstreamHttp | None:
        conns = self._idle.get(key)
        while conns:
            up = conns.pop()
            if not up.closed:
                return up
        return None

    def _give_back(self, key: tuple[object, str], up: UpstreamHttp, response: HttpResponse) -> None:
        close = any(k == "connection" and "close" in v.lower() for k, v in response.headers)
        conns = self._idle.setdefault(key, [])
        if not close and not up.closed and up.recycle() and len(conns) < MAX_IDLE_PER_KEY:
            conns.append(up)
        else:
            up.channel.send_eof()

    async def forward(
        self,
        state: MeshState,
        source: Workload,
        dst: tuple[str, int],
        request: HttpRequest,
        target: str,
        headers: Headers,
        record: RequestRecord,
    ) -> HttpResponse:
        """`target` is the (normalized) request target to send, `headers` the sanitized set."""
        try:
            route = plan_outbound(state, source, dst[0], dst[1], next(self._pick))
        except RoutingError as exc:
            record.response_flags = exc.response_flag or "NR"
            return text_response(exc.status or 503, f"{UPSTREAM_FAILURE}{exc.message}\n")
        key: PoolKey | None = None
        if isinstance(route, HboneRoute):
            record.upstream_host = f"{route.next_hop_ip}:{route.next_hop_port}"
            record.dst_identity = ",".join(route.expected_identities)
            if route.destination_workload:
                record.dst_workload = route.destination_workload.partition("/")[2]
                record.dst_namespace = route.destination_workload.partition("/")[0]
            key = PoolKey(
                src_identity=SpiffeId.parse(source.identity),
                dst_identities=frozenset(SpiffeId.parse(i) for i in route.expected_identities),
                dst=(route.next_hop_ip, route.next_hop_port),
            )
            idle_key: tuple[object, str] = (key, route.authority)
        else:
            record.upstream_host = f"{route.ip}:{route.port}"
            idle_key = ("tcp", record.upstream_host)
        for attempt in (0, 1):
            up = self._take(idle_key) if attempt == 0 else None
            if up is None:
                try:
                    up = UpstreamHttp(await self._open(route, key, source))
                except HboneConnectError as exc:
                    record.response_flags = "UF"
                    return text_response(
                        503,
                        f"{UPSTREAM_FAILURE}connection failure, transport failure reason: {exc.message}\n",
                    )
                except (OSError, TimeoutError) as exc:
                    record.response_flags = "UF"
                    return text_response(
                        503, f"{UPSTREAM_FAILURE}connection failure, transport failure reason: {exc}\n"
                    )
            try:
                response = await exchange(
                    up, request.method, target, request.host, headers, request.body, timeout=self.timeout
                )
            except StaleConnection:
                up.channel.abort("stale upstream connection")
                continue
            except HttpError as exc:
                record.response_flags = "UMSDR"
                up.channel.abort(exc.message)
                return text_response(exc.status or 502, f"{exc.message}\n")
            except TimeoutError:
                record.response_flags = "UT"
                up.channel.abort("upstream request timeout")
                return text_response(504, "upstream request timeout\n")
            except (OSError, h11.ProtocolError, asyncio.IncompleteReadError) as exc:
                record.response_flags = "UC"
                up.channel.abort(str(exc))
                return text_response(503, f"{UPSTREAM_FAILURE}connection termination: {exc}\n")
            self._give_back(idle_key, up, response)
            return response
        record.response_flags = "UC"
        return text_response(503, f"{UPSTREAM_FAILURE}connection termination\n")

    async def _open(
        self, route: HboneRoute | PassthroughRoute, key: PoolKey | None, source: Workload
    ) -> ByteChannel:
        if isinstance(route, HboneRoute):
            assert key is not None
            extra = build_request_headers(
                baggage=Baggage(
                    cluster=self.cluster,
                    namespace=source.namespace,
                    workload_type="deployment",
                    workload_name=source.name,
                ),
                trace_id=secrets.token_bytes(16),
                parent_id=secrets.token_bytes(8),
            )
            return StreamChannel(await self.pool.connect(key, route.authority, extra))
        return await TcpChannel.open(route.ip, route.port)

    async def open_stream(
        self, state: MeshState, source: Workload, dst: tuple[str, int], record: RequestRecord
    ) -> ByteChannel:
        """A raw byte channel to the endpoint chosen for `dst` (the waypoint's TCP path, §4.6).
        Raises RoutingError, HboneConnectError or OSError."""
        route = plan_outbound(state, source, dst[0], dst[1], next(self._pick))
        key: PoolKey | None = None
        if isinstance(route, HboneRoute):
            record.upstream_host = f"{route.next_hop_ip}:{route.next_hop_port}"
            record.dst_identity = ",".join(route.expected_identities)
            key = PoolKey(
                src_identity=SpiffeId.parse(source.identity),
                dst_identities=frozenset(SpiffeId.parse(i) for i in route.expected_identities),
                dst=(route.next_hop_ip, route.next_hop_port),
            )
        else:
            record.upstream_host = f"{route.ip}:{route.port}"
        return await self._open(route, key, source)


async def pipe(a: ByteChannel, b: ByteChannel) -> tuple[int, int]:
    """Copy both ways until both sides ended (half-close kept); returns (bytes a→b, bytes b→a)."""

    async def copy(src: ByteChannel, dst: ByteChannel) -> int:
        total = 0
        while data := await src.recv():
            total += len(data)
            await dst.send(data)
        dst.send_eof()
        return total

    up = asyncio.ensure_future(copy(a, b))
    down = asyncio.ensure_future(copy(b, a))
    try:
        sent, received = await asyncio.gather(up, down)
    except (ConnectionError, OSError) as exc:
        up.cancel()
        down.cancel()
        a.abort(str(exc))
        b.abort(str(exc))
        return 0, 0
    return sent, received
