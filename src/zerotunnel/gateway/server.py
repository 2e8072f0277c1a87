"""The ingress gateway: TLS/mTLS from outside clients, routes by host/path, HBONE into the mesh.

istio-ambient.md §7. One listener per Gateway server port; the TLS context is chosen per connection
(so a Secret change takes effect for the next handshake without a restart, and several servers on
one port are told apart by SNI). After the handshake, clientcert.py's checks run (CA-as-leaf, EKU,
CRL, subjectAltNames); a refused certificate closes the connection and its reason is logged. Requests
are routed with the VirtualServices bound to the Gateway, their path normalized as the mesh config
says, headers sanitized and XFCC set (SANITIZE_SET, §7.3), and forwarded over HBONE with the
gateway's **own** mesh identity — through the destination service's waypoint when it has one
(`mesh.routing.plan_outbound`, §2.4).

The TLS front is hardened as security.md §3 asks of every listener: TLS runs on the gateway's own
memory BIO (tls.py) so a refused handshake sends its alert (TLS 1.3 `certificate_required` to a client
without a certificate, as Envoy does); the whole handshake must finish within `handshake_timeout`;
each listener caps its open connections and its pending handshakes. When the pending-handshake cap is
reached a pending handshake is dropped for the new one, not the new one refused: the oldest that has
shown no complete ClientHello (silent or dripping sockets), see `_victim`. A real client's ClientHello
arrives with its first packet and its handshake lasts milliseconds; a flood's sockets sit until the
timeout, so the flood evicts itself and cannot starve real clients (refusing the new socket would lock
them out until the flood's sockets time out).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import ssl
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from zerotunnel.config import Config
from zerotunnel.gateway.clientcert import ClientCert, ClientCertRejected, verify_client_cert, xfcc
from zerotunnel.gateway.config import (
    GatewayConfigError,
    ServerPlan,
    host_matches,
    plan_server,
    route_request,
    selected_gateways,
)
from zerotunnel.gateway.tls import HandshakeFailed, TlsChannel
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.mesh.build import Addresses, build_mesh
from zerotunnel.mesh.model import MeshState, Workload
from zerotunnel.node.hbone_client import HbonePool
from zerotunnel.node.metrics import ProxyMetrics
from zerotunnel.node.tls import WorkloadCredentials
from zerotunnel.policy.normalize import BadRequest, normalize
from zerotunnel.waypoint.forward import MeshForwarder
from zerotunnel.waypoint.http import (
    HttpRequest,
    HttpResponse,
    TcpChannel,
    forwarding_headers,
    sanitize_request_headers,
    sanitize_response_headers,
    text_response,
)
from zerotunnel.waypoint.serve import serve_http
from zerotunnel.waypoint.telemetry import RequestRecord, RequestTelemetry

log = logging.getLogger("zerotunnel.gateway")

HANDSHAKE_TIMEOUT = 10.0
"""security.md §3 "handshake/connect 10 s" (ghostunnel)."""
MAX_CONNECTIONS = 4096
"""Per listener, as the node proxy's 15008 (security.md §3 "connection limits"; Envoy's listener
limit, ghostunnel's `--max-concurrent-conns`)."""
MAX_PENDING_HANDSHAKES = 256
"""Per listener: unauthenticated sockets still in their TLS handshake (security.md §4 item 15)."""
ISTIO_DEFAULT_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
"""Istio's default gateway cipher suites for TLS 1.2 (ECDHE + AEAD only; OpenSSL's default list also
offers CBC-SHA256/384 suites, which sslyze found, tests/reliability/test_gateway_abuse.py). TLS 1.3
suites are AEAD by definition. A Gateway that lowers minProtocolVersion below 1.2 keeps OpenSSL's
list: TLS 1.0/1.1 have no AEAD suite."""
_VERSIONS = {
    "TLSV1_0": ssl.TLSVersion.TLSv1,
    "TLSV1_1": ssl.TLSVersion.TLSv1_1,
    "TLSV1_2": ssl.TLSVersion.TLSv1_2,
    "TLSV1_3": ssl.TLSVersion.TLSv1_3,
}


def _load_cert_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """`ssl` loads keys only from a path: an anonymous memory file keeps the key off disk
    (security.md rule 17)."""
    fd = os.memfd_create("gateway-credential", os.MFD_CLOEXEC)
    try:
        os.write(fd, cert_pem + b"\n" + key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def server_context(plan: ServerPlan) -> ssl.SSLContext:
    """§7.1: min/max protocol version (default TLS 1.2), client certificate requested for MUTUAL
    (required) and OPTIONAL_MUTUAL (optional), verified against the whole `ca.crt` bundle; no session
    tickets (security.md rule 5); ALPN h2 and http/1.1; AEAD suites only from TLS 1.2 on."""
    assert plan.tls is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS.get(plan.min_version, ssl.TLSVersion.TLSv1_2)
    if ctx.minimum_version >= ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers(ISTIO_DEFAULT_CIPHERS)
    if plan.max_version in _VERSIONS:
        ctx.maximum_version = _VERSIONS[plan.max_version]
    ctx.options |= ssl.OP_NO_TICKET
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    _load_cert_chain(ctx, plan.tls.cert_pem, plan.tls.key_pem)
    if plan.mode in ("MUTUAL", "OPTIONAL_MUTUAL"):
        assert plan.tls.ca_pem is not None
        ctx.load_verify_locations(cadata=plan.tls.ca_pem.decode())
        ctx.verify_mode = ssl.CERT_REQUIRED if plan.mode == "MUTUAL" else ssl.CERT_OPTIONAL
    return ctx


@dataclass(slots=True)
class PortState:
    """The servers on one port and their contexts, swapped whole on every configuration."""

    plans: list[ServerPlan]
    contexts: dict[int, ssl.SSLContext] = field(default_factory=dict)
    """index in `plans` → context (TLS servers only)."""

    chosen: dict[int, int] = field(default_factory=dict)
    """id(SSLObject) → plan index picked by SNI during that handshake."""

    def plan_for_sni(self, sni: str | None) -> int:
        for i, plan in enumerate(self.plans):
            if sni and i in self.contexts and any(host_matches(h, sni) for h in plan.hosts):
                return i
        return next(iter(self.contexts))

    def enable_sni(self) -> None:
        """Several TLS servers on one port: the first context's SNI callback switches to the server
        whose hosts match the requested name (Envoy's filter-chain match on server names)."""
        if len(self.contexts) < 2:
            return
        # OpenSSL keeps the first context's verify mode across the SNI switch (the CA store does
        # follow): request a certificate whenever any server here wants one; MUTUAL's "required" is
        # then enforced after the handshake — unless every server here is MUTUAL, when it stays
        # in the handshake (and a client without a certificate gets the certificate_required alert).
        modes = {self.plans[i].mode for i in self.contexts}
        if modes & {"MUTUAL", "OPTIONAL_MUTUAL"} and modes != {"MUTUAL"}:
            self.contexts[next(iter(self.contexts))].verify_mode = ssl.CERT_OPTIONAL

        def pick(obj: ssl.SSLObject, sni: str | None, _ctx: ssl.SSLContext) -> None:
            i = self.plan_for_sni(sni)
            self.chosen[id(obj)] = i
            obj.context = self.contexts[i]

        self.contexts[next(iter(self.contexts))].sni_callback = pick


@dataclass(slots=True)
class ListenerLoad:
    """One listener's open sockets and pending handshakes (oldest first)."""

    open: int = 0
    pending: dict[asyncio.StreamWriter, float] = field(default_factory=dict)
    hello: set[asyncio.StreamWriter] = field(default_factory=set)
    """Pending sockets whose ClientHello was complete (evicted only when no other is pending)."""
    evicted: set[asyncio.StreamWriter] = field(default_factory=set)
    refused: int = 0
    evictions: int = 0
    peak_pending: int = 0


def _unread_bytes(writer: asyncio.StreamWriter) -> int:
    """Bytes waiting in the socket's receive queue (FIONREAD): a ClientHello that arrived but whose
    handshake task has not run yet (one event-loop iteration can accept hundreds of sockets)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return 0
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    except OSError:
        return 0
    return buf[0]


def _victim(load: ListenerLoad) -> asyncio.StreamWriter:
    """The pending socket to drop: the oldest that has shown no complete ClientHello (neither
    processed nor waiting unread: silent, or dripping into our buffer), else the oldest without a
    processed ClientHello, else the oldest. Silent flood sockets are found first, in O(1) for
    the usual flood; a client whose ClientHello came with its first packet is dropped last."""
    unprocessed: asyncio.StreamWriter | None = None
    for writer in load.pending:
        if writer in load.hello:
            continue
        if _unread_bytes(writer) == 0:
            return writer
        unprocessed = unprocessed or writer
    return unprocessed or next(iter(load.pending))


class IngressGateway:
    def __init__(
        self,
        credentials: WorkloadCredentials,
        *,
        gateway: str | None = None,
        listen_host: str = "0.0.0.0",  # noqa: S104 - the ingress gateway serves outside clients
        telemetry: RequestTelemetry | None = None,
        metrics: ProxyMetrics | None = None,
        clock: Callable[[], datetime] | None = None,
        mark: bool = True,
        cluster: str = "Kubernetes",
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        max_pending_handshakes: int = MAX_PENDING_HANDSHAKES,
    ) -> None:
        self.credentials = credentials
        self.gateway = gateway
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.max_pending_handshakes = max_pending_handshakes
        self.load: dict[int, ListenerLoad] = {}
        self.listen_host = listen_host
        self.telemetry = telemetry or RequestTelemetry("source")
        self.metrics = metrics or ProxyMetrics()
        self.clock = clock or (lambda: datetime.now(UTC))
        self.pool = HbonePool(lambda _ident: self.credentials, metrics=self.metrics, mark=mark)
        self.forwarder = MeshForwarder(self.pool, cluster)
        self.config: Config | None = None
        self.state: MeshState | None = None
        self.ports: dict[int, PortState] = {}
        self.servers: dict[int, asyncio.Server] = {}
        self.errors: list[str] = []
        self._conns: set[asyncio.Task[None]] = set()

    @property
    def identity(self) -> SpiffeId:
        return self.credentials.identity

    def update_credentials(self, credentials: WorkloadCredentials) -> None:
        self.credentials = credentials

    # -- configuration ----------------------------------------------------------------------------

    def apply(self, config: Config, addresses: Addresses) -> list[str]:
        """Recompute servers and contexts; a server whose Secret is broken keeps its previous TLS
        configuration (DESIGN.md §2: a bad change never replaces the last good one). Returns errors."""
        errors: list[str] = []
        ports: dict[int, PortState] = {}
        for gw in selected_gateways(config, self.gateway):
            for server in gw.servers:
                try:
                    plan = plan_server(config, gw, server)
                    ctx = server_context(plan) if plan.tls is not None else None
                except (GatewayConfigError, ssl.SSLError, ValueError) as exc:
                    message = exc.message if isinstance(exc, GatewayConfigError) else str(exc)
                    errors.append(message)
                    previous = self._previous(
                        server.port.number, gw.meta.namespace, gw.meta.name, server.name
                    )
                    if previous is None:
                        continue
                    plan, ctx = previous
                state = ports.setdefault(plan.port, PortState([]))
                state.plans.append(plan)
                if ctx is not None:
                    state.contexts[len(state.plans) - 1] = ctx
        for state in ports.values():
            state.enable_sni()
        for message in errors:
            log.error("gateway configuration: %s", message)
        self.config = config
        self.state = build_mesh(config, addresses)
        self.ports = ports
        self.errors = errors
        return errors

    def _previous(
        self, port: int, ns: str, name: str, server_name: str | None
    ) -> tuple[ServerPlan, ssl.SSLContext | None] | None:
        state = self.ports.get(port)
        if state is None:
            return None
        for i, plan in enumerate(state.plans):
            if plan.gateway == f"{ns}/{name}" and plan.name == server_name:
                return plan, state.contexts.get(i)
        return None

    # -- listeners --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on every configured port not yet served (call again after `apply`)."""
        for port in sorted(self.ports):
            if port in self.servers:
                continue
            self.servers[port] = await asyncio.start_server(
                functools.partial(self._accept, port=port), self.listen_host, port, reuse_address=True
            )
            log.info("gateway listening on %s:%d", self.listen_host, port)

    async def close(self) -> None:
        for server in self.servers.values():
            server.close()
        for task in list(self._conns):
            task.cancel()
        for server in self.servers.values():
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self.forwarder.close_idle()
        await self.pool.close()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, port: int) -> None:
        load = self.load.setdefault(port, ListenerLoad())
        if not self._admit(load):
            load.refused += 1
            self.metrics.handshake_failed("inbound", "overload")
            writer.transport.abort()
            return
        load.open += 1
        state = self.ports.get(port)
        if state is not None and state.contexts:
            load.pending[writer] = time.monotonic()
            load.peak_pending = max(load.peak_pending, len(load.pending))
        task = asyncio.get_running_loop().create_task(self._connection(reader, writer, port, load))
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)

    def _admit(self, load: ListenerLoad) -> bool:
        """Room for one more socket: evict a pending handshake (`_victim`) when the pending cap or
        the connection cap is reached; refuse only when every open socket is past its handshake.
        Refusals and evictions are counted in the metrics, not logged: a flood must not become a
        log flood."""
        while load.pending and (
            len(load.pending) >= self.max_pending_handshakes or load.open >= self.max_connections
        ):
            victim = _victim(load)
            del load.pending[victim]
            load.hello.discard(victim)
            load.evicted.add(victim)
            load.open -= 1
            load.evictions += 1
            self.metrics.handshake_failed("inbound", "evicted")
            victim.transport.abort()
        return load.open < self.max_connections and len(load.pending) < self.max_pending_handshakes

    def _event(self, message: str, **fields: object) -> None:
        self.telemetry.event(message, {k: v for k, v in fields.items() if v is not None})

    async def _connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int, load: ListenerLoad
    ) -> None:
        try:
            await self._serve_connection(reader, writer, port, load)
        finally:
            if writer in load.evicted:  # already uncounted by `_admit`
                load.evicted.discard(writer)
            else:
                load.open -= 1
            load.pending.pop(writer, None)
            load.hello.discard(writer)

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int, load: ListenerLoad
    ) -> None:
        peer = writer.get_extra_info("peername")
        src = f"{peer[0]}:{peer[1]}" if peer else None
        state = self.ports.get(port)
        if state is None or not state.plans:
            writer.transport.abort()
            return
        index = 0
        client: ClientCert | None = None
        channel: TcpChannel | TlsChannel
        try:
            if state.contexts:
                try:
                    channel, index, client = await self._handshake(reader, writer, state, src, load)
                finally:
                    load.pending.pop(writer, None)
                    load.hello.discard(writer)
            else:
                channel = TcpChannel(reader, writer)
            plan = state.plans[index]
            scheme = "https" if plan.tls is not None else "http"

            async def handler(request: HttpRequest) -> HttpResponse:
                return await self.handle(plan, client, src, request)

            await serve_http(channel, handler, scheme=scheme)
        except _Refused:
            writer.transport.abort()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            writer.transport.abort()
        except Exception:  # one connection's failure never reaches the others
            log.exception("connection from %s failed", src)
            writer.transport.abort()
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _handshake(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        state: PortState,
        src: str | None,
        load: ListenerLoad,
    ) -> tuple[TlsChannel, int, ClientCert | None]:
        base_index = next(iter(state.contexts))
        channel = TlsChannel(reader, writer, state.contexts[base_index])
        try:
            await channel.handshake(
                self.handshake_timeout, lambda: load.hello.add(writer) if writer in load.pending else None
            )
        except HandshakeFailed as exc:
            state.chosen.pop(id(channel.ssl_object), None)
            if writer in load.evicted:  # counted in the metrics by `_admit`
                raise _Refused from None
            if exc.verify_message is not None:
                error = f"client certificate refused: {exc.verify_message}"
            elif exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
                error = "tls handshake failed: client certificate required (the client presented none)"
            else:
                error = f"tls handshake failed: {exc.reason}"
            self.metrics.handshake_failed("inbound", exc.reason.lower())
            self._event(
                "tls handshake failed",
                **{"src.addr": src, "error": error, "response_flags": "TLS_FAILURE",
                   "tls.alert_sent": exc.alert},
            )
            if exc.alert:
                await channel.refuse()
            raise _Refused from None
        ssl_object = channel.ssl_object
        index = state.chosen.pop(id(ssl_object), base_index)
        plan = state.plans[index]
        der = ssl_object.getpeercert(binary_form=True)
        if plan.mode == "SIMPLE":
            return channel, index, None
        if der is None:
            if plan.mode == "MUTUAL":
                self._event(
                    "tls handshake failed", **{"src.addr": src, "error": "client certificate required"}
                )
                channel.send_eof()
                raise _Refused
            return channel, index, None
        assert plan.tls is not None and plan.tls.ca_pem is not None
        try:
            client = verify_client_cert(
                der, plan.tls.ca_pem, plan.tls.crl_pem, plan.subject_alt_names, self.clock()
            )
        except ClientCertRejected as exc:
            self._event(
                "client certificate refused",
                **{"src.addr": src, "error": exc.message, "response_flags": "TLS_FAILURE"},
            )
            channel.send_eof()
            raise _Refused from None
        return channel, index, client

    # -- requests ---------------------------------------------------------------------------------

    def _self_workload(self) -> Workload:
        ident = self.identity
        parts = ident.path.strip("/").split("/")
        ns = parts[1] if len(parts) > 1 else "istio-system"
        return Workload(
            uid=f"{ns}/ingressgateway",
            name="ingressgateway",
            namespace=ns,
            service_account=parts[-1],
            identity=str(ident),
            ip=None,
            node=None,
        )

    async def handle(
        self, plan: ServerPlan, client: ClientCert | None, src: str | None, request: HttpRequest
    ) -> HttpResponse:
        started = time.monotonic()
        record = RequestRecord(
            method=request.method,
            path=request.target,
            authority=request.host,
            protocol=f"HTTP/{request.http_version}",
            src_addr=src,
            src_identity=client.subject if client is not None else None,
            bytes_received=len(request.body),
        )
        response = await self._route_and_forward(plan, client, src, request, record)
        response.headers = sanitize_response_headers(response.headers)
        record.response_code = response.status
        record.bytes_sent = len(response.body)
        record.duration_ms = (time.monotonic() - started) * 1000
        self.telemetry.record(record)
        return response

    async def _route_and_forward(
        self,
        plan: ServerPlan,
        client: ClientCert | None,
        src: str | None,
        request: HttpRequest,
        record: RequestRecord,
    ) -> HttpResponse:
        config, state = self.config, self.state
        assert config is not None and state is not None
        try:
            normalized = normalize(request.target, config.mesh.path_normalization)
        except BadRequest as exc:
            return text_response(400, f"Bad Request: {exc.message}\n")
        route = route_request(config, plan.gateway, plan.hosts, request.host, normalized.path)
        if route is None:
            record.response_flags = "NR"
            return text_response(404, "route not found\n")
        record.reason = f"virtualservice {route.virtual_service}" + (
            f" route {route.route}" if route.route else ""
        )
        service = state.service_named(route.hostname)
        if service is None or service.vip is None:
            record.response_flags = "NR"
            return text_response(503, f"no healthy upstream: unknown service {route.hostname}\n")
        port = route.port or (service.ports[0].port if len(service.ports) == 1 else None)
        if port is None:
            record.response_flags = "NR"
            return text_response(503, f"no healthy upstream: {route.hostname} needs a destination port\n")
        record.dst_service = service.hostname
        headers = sanitize_request_headers(request.headers)
        peer_ip = src.rpartition(":")[0] if src else None
        headers += forwarding_headers(request, peer_ip, proto=request.scheme)
        if client is not None:
            value = xfcc(str(self.identity), client)
            record.xfcc = value
            headers.append(("x-forwarded-client-cert", value))
        target = normalized.path + (f"?{normalized.query}" if normalized.query else "")
        return await self.forwarder.forward(
            state, self._self_workload(), (service.vip, port), request, target, headers, record
        )


class _Refused(Exception):
    """The connection is refused after (or during) the handshake; already logged."""
