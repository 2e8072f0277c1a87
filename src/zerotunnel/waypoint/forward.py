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
from zerotunnel.mesh.routing import HboneRoute, RoutingError, plan_outbound
from zerotunnel.node.hbone_client import HboneConnectError, HbonePool, PoolKey
from zerotunnel.waypoint.http import (
    ByteChannel,
    Headers,
    HttpError,
    HttpRequest,
    HttpResponse,
    StreamChannel,
    TcpChannel,
    exchange,
    text_response,
)
from zerotunnel.waypoint.telemetry import RequestRecord

UPSTREAM_FAILURE = "upstream connect error or disconnect/reset before headers. reset reason: "


class MeshForwarder:
    """Opens one HBONE stream per request (cheap on a pooled connection) and speaks HTTP/1.1 on it."""

    def __init__(self, pool: HbonePool, cluster: str = "Kubernetes", timeout: float = 30.0) -> None:
        self.pool = pool
        self.cluster = cluster
        self.timeout = timeout
        self._pick = itertools.count()

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
        channel: ByteChannel
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
            try:
                stream = await self.pool.connect(key, route.authority, extra)
            except HboneConnectError as exc:
                record.response_flags = "UF"
                return text_response(
                    503, f"{UPSTREAM_FAILURE}connection failure, transport failure reason: {exc.message}\n"
                )
            channel = StreamChannel(stream)
        else:
            record.upstream_host = f"{route.ip}:{route.port}"
            try:
                channel = await TcpChannel.open(route.ip, route.port)
            except (OSError, TimeoutError) as exc:
                record.response_flags = "UF"
                return text_response(
                    503, f"{UPSTREAM_FAILURE}connection failure, transport failure reason: {exc}\n"
                )
        try:
            response = await exchange(
                channel, request.method, target, request.host, headers, request.body, timeout=self.timeout
            )
        except HttpError as exc:
            record.response_flags = "UMSDR"
            channel.abort(exc.message)
            return text_response(exc.status or 502, f"{exc.message}\n")
        except TimeoutError:
            record.response_flags = "UT"
            channel.abort("upstream request timeout")
            return text_response(504, "upstream request timeout\n")
        except (OSError, h11.ProtocolError, asyncio.IncompleteReadError) as exc:
            record.response_flags = "UC"
            channel.abort(str(exc))
            return text_response(503, f"{UPSTREAM_FAILURE}connection termination: {exc}\n")
        channel.send_eof()
        return response
