"""The waypoint: HBONE in, HTTP parsed, L7 policy, HBONE out with the waypoint's own identity.

istio-ambient.md §6.1: a waypoint receives only HBONE (15008) and only for what is bound to it (a
Service VIP whose service, or a pod IP whose workload, uses this waypoint, §2.4); anything else is
refused (HBONE 401 `... is not served by waypoint <ns>/<name>`), and a configuration that unbinds a
destination closes its live tunnels. Inside each tunnel it serves HTTP/1.1 or HTTP/2 (serve.py);
each request is decided by the policy engine (`Engine.check_l7`: 400 for a malformed request, 401
for a bad JWT, 403 `RBAC: access denied`, §6.2), normalized once as the mesh config says (§6.3,
security.md §1a) and forwarded — normalized path, sanitized headers (security.md §1b) — over HBONE
to an endpoint chosen by `mesh.routing` (forward.py). The destination node proxy therefore sees
the waypoint's identity.

The TLS, CONNECT handling and tunnel bookkeeping are the node proxy's `HboneServer` (with its
`waypoint=True` hook: the authority names the destination behind us, not our own IP).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from zerotunnel.config import Config
from zerotunnel.gateway.config import gateway_identity
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.mesh.build import Addresses, build_mesh
from zerotunnel.mesh.model import MeshService, MeshState, WaypointRef, Workload
from zerotunnel.mesh.routing import RoutingError
from zerotunnel.node.accesslog import AccessLog
from zerotunnel.node.hbone_client import HboneConnectError, HbonePool
from zerotunnel.node.hbone_conn import HboneStream
from zerotunnel.node.hbone_server import HboneServer, InboundRejected, InboundRequest, LocalWorkload
from zerotunnel.node.metrics import ProxyMetrics
from zerotunnel.node.relay import TcpRelay
from zerotunnel.node.tls import WorkloadCredentials
from zerotunnel.policy.decision import RBAC_DENIED_BODY, Decision
from zerotunnel.policy.engine import Engine
from zerotunnel.policy.l7 import L7Request
from zerotunnel.policy.normalize import BadRequest, normalize
from zerotunnel.waypoint.forward import MeshForwarder, pipe
from zerotunnel.waypoint.http import (
    HttpRequest,
    HttpResponse,
    StreamChannel,
    forwarding_headers,
    is_untrusted,
    sanitize_request_headers,
    sanitize_response_headers,
    text_response,
)
from zerotunnel.waypoint.serve import serve_http
from zerotunnel.waypoint.telemetry import RequestRecord, RequestTelemetry

log = logging.getLogger("zerotunnel.waypoint")
TCP_PROTOCOLS = frozenset({"tcp", "tls", "https", "mongo", "mysql", "redis"})
XFCC = "x-forwarded-client-cert"

ALLOW_TUNNEL = Decision(True, None, None, "waypoint: policy is applied per request", 200)
WAYPOINT_FOR_SERVICE = ("service", "all")
WAYPOINT_FOR_WORKLOAD = ("workload", "all")


@dataclass(frozen=True, slots=True)
class WaypointSnapshot:
    version: int
    config: Config
    state: MeshState
    engine: Engine
    xfcc_sources: frozenset[str] = frozenset()
    """Identities whose `x-forwarded-client-cert` is kept: the ingress gateways' (§7.3). From anyone
    else the header is dropped before policy sees it (security.md §1b)."""


@dataclass(frozen=True, slots=True)
class Binding:
    """What a tunnel's authority addresses behind this waypoint."""

    service: MeshService | None
    workload: Workload | None


def waypoint_identity(config: Config, ref: WaypointRef) -> SpiffeId:
    """The waypoint's SPIFFE ID: its pod's service account (the pod labelled
    `gateway.networking.k8s.io/gateway-name: <name>` in the Gateway's namespace); Istio's default
    waypoint deployment uses a service account named after the Gateway when there is no such pod."""
    pod = next(
        (
            p
            for p in config.pods
            if p.meta.namespace == ref.namespace
            and p.meta.labels.get("gateway.networking.k8s.io/gateway-name") == ref.name
        ),
        None,
    )
    sa = pod.service_account if pod is not None else ref.name
    return SpiffeId.istio(config.mesh.trust_domain, ref.namespace, sa)


class _Tunnel(TcpRelay):
    """One HBONE tunnel into the waypoint, served as HTTP. It stands where the node proxy puts a
    TCP relay (the HboneServer attaches the stream, closes it on drain), but the other side is the
    L7 handler rather than an app socket."""

    def __init__(self, waypoint: Waypoint, request: InboundRequest, binding: Binding) -> None:
        super().__init__()
        self.waypoint = waypoint
        self.request = request
        self.binding = binding
        self.channel: StreamChannel | None = None
        self.task: asyncio.Task[None] | None = None

    def attach(self, stream: HboneStream) -> None:
        self.stream = stream
        self.channel = StreamChannel(stream)
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        assert self.channel is not None
        try:
            if self.waypoint.is_tcp(self.binding, self.request.target[1]):
                await self.waypoint.relay_tcp(self.request, self.binding, self.channel)
            else:
                await serve_http(self.channel, self._handle)
        except (ConnectionError, OSError) as exc:
            self.error = self.error or f"connection closed: {exc}"
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            log.exception("tunnel from %s failed", self.request.src_addr)
            self.error = self.error or f"internal error: {exc}"
            self.channel.abort(self.error)
        finally:
            self.bytes_up, self.bytes_down = self.channel.bytes_in, self.channel.bytes_out
            self._finish()

    async def _handle(self, request: HttpRequest) -> HttpResponse:
        return await self.waypoint.handle(self.request, self.binding, request)

    def fail(self, error: str) -> None:
        self.error = self.error or error
        self._finish()

    def close(self, error: str) -> None:
        self.error = self.error or error
        if self.stream is not None:
            self.stream.abort(error)
        if self.task is not None:
            self.task.cancel()


class Waypoint:
    """One waypoint (a Gateway of class istio-waypoint) serving HBONE on one listener."""

    def __init__(
        self,
        ref: WaypointRef,
        credentials: WorkloadCredentials,
        *,
        telemetry: RequestTelemetry | None = None,
        access_log: AccessLog | None = None,
        metrics: ProxyMetrics | None = None,
        clock: Callable[[], datetime] | None = None,
        jwks_by_uri: Mapping[str, str] | None = None,
        mark: bool = True,
        cluster: str = "Kubernetes",
        handshake_timeout: float = 10.0,
        max_connections: int = 4096,
        max_pending_handshakes: int = 256,
    ) -> None:
        """`handshake_timeout`, `max_connections`, `max_pending_handshakes`: the 15008 listener's
        bounds (security.md §3; `HboneServer`'s, the node proxy's defaults)."""
        self.ref = ref
        self.credentials = credentials
        self.telemetry = telemetry or RequestTelemetry("waypoint")
        self.metrics = metrics or ProxyMetrics()
        self.clock = clock or (lambda: datetime.now(UTC))
        self.jwks_by_uri: Mapping[str, str] = jwks_by_uri or {}
        self.snapshot: WaypointSnapshot | None = None
        self.pool = HbonePool(lambda _ident: self.credentials, metrics=self.metrics, mark=mark)
        self.forwarder = MeshForwarder(self.pool, cluster)
        self.server = HboneServer(
            credentials,
            authorize=self._authorize_tunnel,
            local_workload=self._local_workload,
            connect_upstream=self._connect,
            metrics=self.metrics,
            access_log=access_log,
            waypoint=True,
            handshake_timeout=handshake_timeout,
            max_connections=max_connections,
            max_pending_handshakes=max_pending_handshakes,
        )

    @property
    def identity(self) -> SpiffeId:
        return self.credentials.identity

    # -- lifecycle --------------------------------------------------------------------------------

    def apply(self, config: Config, addresses: Addresses, version: int) -> int:
        """Swap in a new configuration: the next request is decided under it, and live tunnels to a
        destination no longer bound to this waypoint are closed (security.md rule 11). Returns how
        many were closed."""
        state = build_mesh(config, addresses)
        sources = frozenset(gateway_identity(config, g) for g in config.gateways)
        self.snapshot = WaypointSnapshot(version, config, state, Engine.from_config(config), sources)
        return self.server.recheck()

    def _authorize_tunnel(self, request: InboundRequest) -> Decision:
        """Per tunnel only the binding (§6.1); the policies are applied to every request."""
        if self.binding(request.target[0]) is None:
            return Decision(
                False, None, None, f"{request.authority} is not served by waypoint {self.ref}", 401
            )
        return ALLOW_TUNNEL

    async def start(self, host: str = "0.0.0.0", port: int = 15008) -> None:  # noqa: S104 - HBONE listener
        await self.server.start(host, port)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def update_credentials(self, credentials: WorkloadCredentials) -> None:
        self.credentials = credentials
        self.server.update_credentials(credentials)

    async def close(self, grace: float = 5.0) -> None:
        await self.server.close(grace)
        self.forwarder.close_idle()
        await self.pool.close()

    # -- tunnels ----------------------------------------------------------------------------------

    def _local_workload(self, _landed_ip: str) -> LocalWorkload | None:
        return LocalWorkload(
            name=self.ref.name,
            namespace=self.ref.namespace,
            identity=self.identity,
            workload_type="deployment",
        )

    def binding(self, ip: str) -> Binding | None:
        """§2.4/§6.1: the service or workload at `ip` when this waypoint serves it, else None."""
        snapshot = self.snapshot
        if snapshot is None:
            return None
        service = snapshot.state.service_at(ip)
        if service is not None:
            return Binding(service, None) if service.waypoint == self.ref else None
        workload = snapshot.state.workload_at(ip)
        if workload is not None and workload.waypoint == self.ref:
            return Binding(None, workload)
        return None

    async def _connect(self, request: InboundRequest, _factory: Callable[[], TcpRelay]) -> TcpRelay:
        binding = self.binding(request.target[0])
        if binding is None:
            raise InboundRejected(
                f"{request.authority} is not served by waypoint {self.ref}", status=503, response_flag="NR"
            )
        return cast(TcpRelay, _Tunnel(self, request, binding))

    # -- requests ---------------------------------------------------------------------------------

    def is_tcp(self, binding: Binding, port: int) -> bool:
        """Istio's protocol selection for the addressed port: `appProtocol`, else the port name's
        prefix (`tcp-db`, `tls`, `https`, `mongo`…) declares a non-HTTP port, which the waypoint
        relays as TCP after the TCP-chain policy check (§4.6) instead of parsing it as HTTP."""
        snapshot = self.snapshot
        if snapshot is None or binding.service is None:
            return False
        svc = snapshot.config.service(binding.service.namespace, binding.service.name)
        spec = next((p for p in svc.ports if p.port == port), None) if svc is not None else None
        if spec is None:
            return False
        declared = (spec.app_protocol or spec.name or "").lower().split("-", 1)[0]
        return declared in TCP_PROTOCOLS

    async def relay_tcp(self, tunnel: InboundRequest, binding: Binding, channel: StreamChannel) -> None:
        """§4.6: policies decide with Envoy's TCP-chain semantics; a denial closes the connection."""
        snapshot = self.snapshot
        assert snapshot is not None
        started = time.monotonic()
        service = binding.service
        record = RequestRecord(
            method="-",
            path="-",
            authority=str(tunnel.authority),
            protocol="TCP",
            src_addr=f"{tunnel.src_addr[0]}:{tunnel.src_addr[1]}",
            src_identity=str(tunnel.source_identity),
        )
        record.dst_service = service.hostname if service is not None else None
        l7 = L7Request(
            method="",
            path="",
            host="",
            port=tunnel.target[1],
            source_identity=str(tunnel.source_identity),
            source_ip=tunnel.src_addr[0],
            destination_ip=tunnel.target[0],
        )
        decision = snapshot.engine.check_l7_tcp(
            self.ref.namespace,
            self.ref.name,
            l7,
            service=(service.namespace, service.name) if service is not None else None,
        )
        record.policy, record.reason = decision.policy, decision.reason
        if not decision.allowed:
            record.response_flags = "UAEX"
            record.response_code_details = "rbac_access_denied"
            channel.abort("connection closed due to policy rejection")
        else:
            try:
                upstream = await self.forwarder.open_stream(
                    snapshot.state, self._self_workload(snapshot.state), tunnel.target, record
                )
            except (RoutingError, HboneConnectError, OSError, TimeoutError) as exc:
                record.response_flags = "UF"
                record.reason = getattr(exc, "message", None) or str(exc)
                channel.abort(record.reason)
            else:
                record.bytes_received, record.bytes_sent = await pipe(channel, upstream)
        record.duration_ms = (time.monotonic() - started) * 1000
        self.telemetry.record(record)

    def _self_workload(self, state: MeshState) -> Workload:
        uid = state.waypoints.get(self.ref)
        if uid is not None:
            return state.workloads[uid]
        return Workload(
            uid=f"{self.ref.namespace}/waypoint/{self.ref.name}",
            name=self.ref.name,
            namespace=self.ref.namespace,
            service_account=self.identity.path.rsplit("/", 1)[-1],
            identity=str(self.identity),
            ip=None,
            node=None,
            is_waypoint_of=self.ref,
        )

    async def handle(self, tunnel: InboundRequest, binding: Binding, request: HttpRequest) -> HttpResponse:
        started = time.monotonic()
        snapshot = self.snapshot
        assert snapshot is not None
        record = RequestRecord(
            method=request.method,
            path=request.target,
            authority=request.host,
            protocol=f"HTTP/{request.http_version}",
            src_addr=f"{tunnel.src_addr[0]}:{tunnel.src_addr[1]}",
            src_identity=str(tunnel.source_identity),
            bytes_received=len(request.body),
        )
        src_ns, src_sa = _ns_sa(tunnel.source_identity)
        record.src_namespace, record.src_workload = src_ns, src_sa
        service = binding.service
        if service is not None:
            record.dst_service = service.hostname
        elif binding.workload is not None:
            record.dst_workload, record.dst_namespace = binding.workload.name, binding.workload.namespace
        response = await self._decide_and_forward(snapshot, tunnel, binding, request, record)
        record.response_code = response.status
        record.bytes_sent = len(response.body)
        record.duration_ms = (time.monotonic() - started) * 1000
        self.telemetry.record(record)
        return response

    async def _decide_and_forward(
        self,
        snapshot: WaypointSnapshot,
        tunnel: InboundRequest,
        binding: Binding,
        request: HttpRequest,
        record: RequestRecord,
    ) -> HttpResponse:
        service = binding.service
        trusted = str(tunnel.source_identity) in snapshot.xfcc_sources
        kept = [(k, v) for k, v in request.headers if trusted and k == XFCC]
        seen = [(k, v) for k, v in request.headers if not is_untrusted(k)] + kept
        l7 = L7Request(
            method=request.method,
            path=request.target,
            host=request.host,
            port=tunnel.target[1],
            headers=tuple(seen),
            source_identity=str(tunnel.source_identity),
            source_ip=tunnel.src_addr[0],
            destination_ip=tunnel.target[0],
        )
        decision = snapshot.engine.check_l7(
            self.ref.namespace,
            self.ref.name,
            l7,
            now=self.clock(),
            service=(service.namespace, service.name) if service is not None else None,
            jwks_by_uri=self.jwks_by_uri,
        )
        record.policy, record.reason = decision.policy, decision.reason
        if not decision.allowed:
            return _denial(decision, record)
        try:
            normalized = normalize(request.target, snapshot.engine.path_normalization)
        except BadRequest as exc:
            record.response_code_details = "path_normalization_failed"
            return text_response(400, f"Bad Request: {exc.message}\n")
        target = normalized.path + (f"?{normalized.query}" if normalized.query else "")
        headers = sanitize_request_headers(request.headers)
        # behind an ingress gateway the client's scheme is the gateway's to state (§7.3)
        proto = (request.header("x-forwarded-proto") if trusted else None) or "http"
        headers += forwarding_headers(request, tunnel.src_addr[0], proto=proto) + kept
        response = await self.forwarder.forward(
            snapshot.state,
            self._self_workload(snapshot.state),
            tunnel.target,
            request,
            target,
            headers,
            record,
        )
        response.headers = sanitize_response_headers(response.headers)
        if record.response_flags == "-":
            record.response_code_details = "via_upstream"
        return response


def _ns_sa(identity: SpiffeId) -> tuple[str | None, str | None]:
    parts = identity.path.strip("/").split("/")
    if len(parts) == 4 and parts[0] == "ns" and parts[2] == "sa":
        return parts[1], parts[3]
    return None, None


def _denial(decision: Decision, record: RequestRecord) -> HttpResponse:
    """§6.2: 403 `RBAC: access denied`; 401 with Envoy's JWT text; 400 for what cannot be parsed."""
    if decision.status == 401:
        record.response_code_details = "jwt_authn_access_denied"
        text = decision.reason.removeprefix("jwt authentication failed: ")
        return text_response(401, text, [("www-authenticate", 'Bearer realm="http://"')])
    if decision.status == 400:
        record.response_code_details = "request_normalization_failed"
        return text_response(400, f"Bad Request: {decision.reason}\n")
    record.response_code_details = f"rbac_access_denied_matched_policy[{decision.policy or 'none'}]"
    return text_response(403, RBAC_DENIED_BODY)
