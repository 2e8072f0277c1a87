"""The inbound HBONE server (port 15008), in the exact order of spec/istio-ambient.md §1.4.

Per TLS connection: handshake with a mandatory client certificate, then `verify_client_peer`
(same trust domain, aliases honoured). Per CONNECT stream:

1. method CONNECT, else 400 `expected method CONNECT, got X`          (zerotunnel.hbone)
2. authority `ip:port` / `host:port`, else 400 `no valid authority ...` (zerotunnel.hbone)
3. the local workload that owns the IP the connection landed on, else 503
4. authority IP == landed IP, else 400 `ip mismatch: <landed> != <authority>`
5. target port not one of ours (15001/15006/15008), else 503 `attempted recursive call to ourselves`
6. `authorize(request)`, else 401 `connection closed due to policy rejection: <reason>` (flag DENY)
7. connect to the app, else 503 `connection failed: ...` (flag CONNECT)
8. 200 — only now, after the upstream connect (§1.4, §10.13) — then relay.

What the node proxy knows and this module must not (which workloads are local, the policies, how
to reach the app inside a pod's network namespace) is injected: `local_workload`, `authorize` and
`connect_upstream`. Live tunnels are tracked so `recheck` can close those a new policy denies
(security.md rule 11, §10.12), with `connection closed due to policy change`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import cast

from zerotunnel.errors import ZerotunnelError
from zerotunnel.hbone.authority import HboneAuthority
from zerotunnel.hbone.events import ConnectRequest, Event, Header, RequestRejected
from zerotunnel.hbone.headers import Baggage, parse_baggage
from zerotunnel.hbone.protocol import SERVER_SETTINGS, AbuseLimits, HboneServerConnection, HboneSettings
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.identity.verify import VerifiedPeer
from zerotunnel.node.accesslog import AccessLog, ConnectionRecord
from zerotunnel.node.hbone_conn import HboneConnectionProtocol, HboneStream, open_tcp
from zerotunnel.node.metrics import UNKNOWN, ProxyMetrics, TrafficLabels
from zerotunnel.node.relay import TcpRelay
from zerotunnel.node.tls import WorkloadCredentials, server_context, update_context, verify_client_peer
from zerotunnel.policy.decision import Decision
from zerotunnel.policy.l4 import L4Request

ILLEGAL_PORTS = frozenset({15001, 15006, 15008})
POLICY_CHANGE = "connection closed due to policy change"
DRAIN = "connection closed due to connection drain"


@dataclass(frozen=True, slots=True)
class LocalWorkload:
    """The destination workload as the node proxy describes it (for authorization, logs, metrics)."""

    name: str
    namespace: str
    identity: SpiffeId | None = None
    service: str | None = None
    canonical_service: str | None = None
    canonical_revision: str | None = None
    cluster: str | None = None
    workload_type: str = "pod"


@dataclass(frozen=True, slots=True)
class InboundRequest:
    """One CONNECT that passed steps 1-5: who (TLS identity only, security.md rule 1), from where,
    to which workload and target. Headers are telemetry hints, never identity."""

    source_identity: SpiffeId
    src_addr: tuple[str, int]
    landed_addr: tuple[str, int]
    authority: HboneAuthority
    target: tuple[str, int]
    headers: tuple[Header, ...]
    workload: LocalWorkload

    def l4_request(self) -> L4Request:
        """The policy engine's view (§4.2): the pod's target port and IP, the peer's identity."""
        return L4Request(src_ip=self.src_addr[0], dst_ip=self.target[0], dst_port=self.target[1],
                         src_identity=str(self.source_identity))


def _baggage_workload(baggage: dict[str, str]) -> str | None:
    """§1.3: any of the four workload-name keys names the source workload (telemetry only)."""
    keys = ("k8s.deployment.name", "k8s.cronjob.name", "k8s.pod.name", "k8s.job.name")
    return next((baggage[k] for k in keys if k in baggage), None)


Authorizer = Callable[[InboundRequest], Decision]
WorkloadLookup = Callable[[str], LocalWorkload | None]
UpstreamConnector = Callable[[InboundRequest, Callable[[], TcpRelay]], Awaitable[TcpRelay]]


async def connect_upstream_direct(request: InboundRequest, factory: Callable[[], TcpRelay]) -> TcpRelay:
    """Default upstream: a marked TCP connection to the target (§1.4 step 8, 10 s timeout)."""
    return await open_tcp(factory, request.target[0], request.target[1], mark=True, timeout=10.0)


class InboundRejected(ZerotunnelError):
    """A stream refused at one of the §1.4 steps; `status` is what the client receives."""


@dataclass(slots=True)
class LiveTunnel:
    """A tunnel that got its 200: what `recheck` re-authorizes, what the admin page lists."""

    request: InboundRequest
    stream: HboneStream
    relay: TcpRelay
    record: ConnectionRecord
    labels: TrafficLabels
    logged: bool = False


@dataclass(slots=True)
class _Pending:
    request: InboundRequest | None = None
    task: asyncio.Task[None] | None = None
    epoch: int = 0
    extras: dict[str, object] = field(default_factory=dict)


class HboneServer:
    """One 15008 listener (in-pod mode: one per pod, with that pod's certificate)."""

    def __init__(
        self,
        credentials: WorkloadCredentials,
        *,
        authorize: Authorizer,
        local_workload: WorkloadLookup,
        connect_upstream: UpstreamConnector = connect_upstream_direct,
        metrics: ProxyMetrics | None = None,
        access_log: AccessLog | None = None,
        clock: Callable[[], datetime] | None = None,
        settings: HboneSettings = SERVER_SETTINGS,
        limits: AbuseLimits | None = None,
        handshake_timeout: float = 10.0,
        waypoint: bool = False,
        max_connections: int = 4096,
        max_pending_handshakes: int = 256,
    ) -> None:
        self.credentials = credentials
        self.waypoint = waypoint
        """A waypoint receives tunnels for what is behind it (a service VIP, a pod IP), so step 4
        does not apply (security.md §1b: "unless the receiver is the target's waypoint"); its
        `connect_upstream` checks the target is bound to it."""
        self.authorize = authorize
        self.local_workload = local_workload
        self.connect_upstream = connect_upstream
        self.metrics = metrics or ProxyMetrics()
        self.access_log = access_log or AccessLog()
        self.clock = clock or (lambda: datetime.now(UTC))
        self.settings = settings
        self.limits = limits or AbuseLimits()
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        """Security.md rule 12 / §3 "connection limits" (Envoy's listener limit, ghostunnel's
        `--max-concurrent-conns`): sockets beyond this many open ones are reset at accept."""
        self.max_pending_handshakes = max_pending_handshakes
        """Sockets still in their TLS handshake (unauthenticated, security.md §4 item 15): a flood
        of silent or slow clients is capped here and reaped by `handshake_timeout`, so it can
        neither exhaust memory nor grow without bound before the timeout fires."""
        self.open_sockets = 0
        self.refused_sockets = 0
        self.evicted_sockets = 0
        self._handshaking: dict[_ServerConnection, None] = {}  # in accept order, oldest first
        self._ctx = server_context(credentials)
        self.metrics.set_cert_expiry(str(credentials.identity), credentials.not_after)
        self._server: asyncio.Server | None = None
        self.connections: set[_ServerConnection] = set()
        self.live: dict[tuple[int, int], LiveTunnel] = {}
        self._pending: dict[tuple[int, int], _Pending] = {}
        self._epoch = 0
        self._draining = False

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self, host: str | None = None, port: int = 15008, *, sock: socket.socket | None = None,
                    backlog: int = 1024) -> None:
        """Listen on `host:port`, or on `sock` (the node proxy creates it inside the pod's netns)."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await loop.create_server(self._protocol, sock=sock, backlog=backlog)
        else:
            self._server = await loop.create_server(self._protocol, host, port, backlog=backlog,
                                                    reuse_address=True)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None and self._server.sockets
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    @property
    def pending_handshakes(self) -> int:
        """Sockets accepted and still in their TLS handshake."""
        return len(self._handshaking)

    def set_handshake_gate(self, may_handshake: Callable[[], bool]) -> None:
        """Ask `may_handshake()` at every ClientHello (the SNI callback runs with or without SNI);
        False refuses the handshake with a handshake_failure alert before any certificate is sent —
        the node proxy's gate for a pod whose certificate expired while the CA was unreachable."""

        def on_client_hello(_obj: ssl.SSLObject | ssl.SSLSocket, _name: str | None,
                            _ctx: ssl.SSLContext) -> int | None:
            return None if may_handshake() else ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE

        self._ctx.sni_callback = on_client_hello

    def update_credentials(self, credentials: WorkloadCredentials) -> None:
        """Certificate rotation: new handshakes present the new chain; verification uses its bundle."""
        update_context(self._ctx, credentials)
        self.credentials = credentials
        self.metrics.set_cert_expiry(str(credentials.identity), credentials.not_after)

    async def close(self, grace: float = 5.0) -> None:
        """Graceful drain (security.md rule 19): stop accepting, let tunnels finish for `grace`
        seconds, then close the rest with `connection closed due to connection drain`."""
        self._draining = True
        if self._server is not None:
            self._server.close()
        deadline = asyncio.get_running_loop().time() + grace
        while self.live and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for tunnel in list(self.live.values()):
            tunnel.record.error = DRAIN
            tunnel.relay.close(DRAIN)
        for pending in list(self._pending.values()):
            if pending.task is not None:
                pending.task.cancel()
        for conn in list(self.connections):
            conn.close(DRAIN)
        if self._server is not None:
            await self._server.wait_closed()

    def recheck(self, authorize: Authorizer | None = None) -> int:
        """Re-authorize every live tunnel (policy changed) and close the denied ones; returns how
        many were closed. Tunnels still connecting re-check before their 200."""
        if authorize is not None:
            self.authorize = authorize
        self._epoch += 1
        closed = 0
        for key, tunnel in list(self.live.items()):
            decision = self._decide(tunnel.request)
            if not decision.allowed:
                tunnel.record.error = POLICY_CHANGE
                tunnel.record.response_flag = "DENY"
                tunnel.relay.close(POLICY_CHANGE)
                self.live.pop(key, None)
                closed += 1
        return closed

    def tunnels(self) -> Iterable[LiveTunnel]:
        return list(self.live.values())

    # -- per connection ---------------------------------------------------------------------------

    def _protocol(self) -> _ServerConnection:
        return _ServerConnection(self)

    def _decide(self, request: InboundRequest) -> Decision:
        try:
            return self.authorize(request)
        except Exception as exc:
            return Decision(False, None, None, f"authorization failed: {exc}", 401)

    def _labels(self, record: ConnectionRecord, peer: SpiffeId | None, workload: LocalWorkload | None,
                baggage: dict[str, str], flag: str) -> TrafficLabels:
        src_workload = _baggage_workload(baggage) or UNKNOWN
        return TrafficLabels(
            reporter="destination",
            source_workload=src_workload,
            source_canonical_service=baggage.get("service.name", UNKNOWN),
            source_canonical_revision=baggage.get("service.version", UNKNOWN),
            source_workload_namespace=baggage.get("k8s.namespace.name", UNKNOWN),
            source_principal=str(peer) if peer else UNKNOWN,
            source_cluster=baggage.get("k8s.cluster.name", UNKNOWN),
            destination_service=(workload.service if workload and workload.service else UNKNOWN),
            destination_workload=workload.name if workload else UNKNOWN,
            destination_workload_namespace=workload.namespace if workload else UNKNOWN,
            destination_canonical_service=(workload.canonical_service or UNKNOWN) if workload else UNKNOWN,
            destination_canonical_revision=(workload.canonical_revision or UNKNOWN) if workload else UNKNOWN,
            destination_principal=str(self.credentials.identity),
            destination_cluster=(workload.cluster or UNKNOWN) if workload else UNKNOWN,
            response_flags=flag,
            connection_security_policy="mutual_tls",
        )

    async def handle_connect(self, conn: _ServerConnection, stream: HboneStream, ev: ConnectRequest) -> None:
        """Steps 3-8 for one stream; every failure answers the client and writes the access log."""
        key = (id(conn), stream.stream_id)
        pending = self._pending[key] = _Pending(epoch=self._epoch)
        pending.task = asyncio.current_task()
        peer = conn.peer.spiffe_id if conn.peer else None
        landed = conn.local_addr or ("", 0)
        record = ConnectionRecord(direction="inbound", src_addr=conn.peer_addr, dst_addr=landed,
                                  dst_hbone_addr=str(ev.authority), src_identity=str(peer) if peer else None)
        baggage = parse_baggage((ev.header(b"baggage") or b"").decode("latin-1"))
        record.src_workload = _baggage_workload(baggage)
        record.src_namespace = baggage.get("k8s.namespace.name")
        workload: LocalWorkload | None = None
        relay: TcpRelay | None = None
        try:
            if stream.done:  # reset before this task ran (rapid reset): no upstream dial for it
                raise InboundRejected("stream reset before the upstream connect", status=0)
            if self._draining:  # h2 cannot send a graceful GOAWAY and keep streams; refuse new ones
                raise InboundRejected(DRAIN, status=503)
            workload = self.local_workload(landed[0])
            if workload is None:
                raise InboundRejected(f"failed to fetch information about local workload: {landed[0]}",
                                      status=503)
            record.dst_workload, record.dst_namespace = workload.name, workload.namespace
            record.dst_identity = str(workload.identity or self.credentials.identity)
            record.dst_service = workload.service
            if ev.authority.ip is None:
                raise InboundRejected(f"unknown service: {ev.authority.host}", status=503)
            if not self.waypoint and str(ev.authority.ip) != landed[0]:
                raise InboundRejected(f"ip mismatch: {landed[0]} != {ev.authority.ip}", status=400)
            if ev.authority.port in ILLEGAL_PORTS:
                raise InboundRejected("attempted recursive call to ourselves", status=503)
            assert peer is not None
            request = InboundRequest(peer, conn.peer_addr or ("", 0), landed, ev.authority,
                                     (str(ev.authority.ip), ev.authority.port), ev.headers, workload)
            pending.request = request
            decision = self._decide(request)
            if not decision.allowed:
                raise InboundRejected(f"connection closed due to policy rejection: {decision.reason}",
                                      status=401, response_flag="DENY")
            try:
                relay = await self.connect_upstream(request, TcpRelay)
            except (OSError, TimeoutError) as exc:
                detail = "timed out" if isinstance(exc, TimeoutError) else str(exc)
                raise InboundRejected(f"connection failed: {detail}", status=503,
                                      response_flag="CONNECT") from None
            if pending.epoch != self._epoch:  # policy changed while we were connecting
                decision = self._decide(request)
                if not decision.allowed:
                    relay.fail(POLICY_CHANGE)
                    raise InboundRejected(f"connection closed due to policy rejection: {decision.reason}",
                                          status=401, response_flag="DENY")
            if stream.done or conn.closed:
                relay.fail("downstream closed before the upstream connected")
                raise InboundRejected("connection closed before upstream connected", status=0)
        except InboundRejected as exc:
            self._pending.pop(key, None)
            record.error = exc.message
            record.response_flag = exc.response_flag or "-"
            if exc.status:
                conn.respond(stream, exc.status)
            self.metrics.connection_failed_early(
                self._labels(record, peer, workload, baggage, exc.response_flag or "-"))
            self.access_log.complete(record)
            return
        except asyncio.CancelledError:
            self._pending.pop(key, None)
            if relay is not None:
                relay.fail(DRAIN)
            raise
        self._pending.pop(key, None)
        labels = self._labels(record, peer, workload, baggage, "-")
        response: list[Header] = []
        bag = Baggage(cluster=workload.cluster or "", namespace=workload.namespace,
                      workload_type=workload.workload_type, workload_name=workload.name,
                      service_name=workload.canonical_service or "",
                      service_version=workload.canonical_revision or "").encode()
        if bag:
            response.append((b"baggage", bag.encode()))
        conn.respond(stream, 200, response)
        record.established = True
        tunnel = LiveTunnel(request, stream, relay, record, labels)
        self.live[key] = tunnel
        self.metrics.connection_opened(labels)
        relay._on_done = lambda r: self._tunnel_done(key, tunnel)
        relay.attach(stream)
        if relay.finished:
            self._tunnel_done(key, tunnel)

    def _tunnel_done(self, key: tuple[int, int], tunnel: LiveTunnel) -> None:
        if tunnel.logged:
            return
        tunnel.logged = True
        self.live.pop(key, None)
        record = tunnel.record
        # inbound, access-log view: "sent" went back to the client (from the app), "recv" came in
        record.bytes_sent = tunnel.relay.bytes_down
        record.bytes_recv = tunnel.relay.bytes_up
        if record.error is None and tunnel.relay.error:
            record.error = tunnel.relay.error
        labels = tunnel.labels
        if record.response_flag != "-":
            labels = replace(labels, response_flags=record.response_flag)
        self.metrics.connection_closed(labels, record.bytes_sent, record.bytes_recv)
        self.access_log.complete(record)

    def rejected_by_protocol(self, conn: _ServerConnection, ev: RequestRejected) -> None:
        """Steps 1-2 answered by zerotunnel.hbone: log and count them like the others."""
        peer = conn.peer.spiffe_id if conn.peer else None
        record = ConnectionRecord(direction="inbound", src_addr=conn.peer_addr, dst_addr=conn.local_addr,
                                  src_identity=str(peer) if peer else None, error=ev.reason)
        self.metrics.connection_failed_early(self._labels(record, peer, None, {}, "-"))
        self.access_log.complete(record)

    def admit(self, conn: _ServerConnection) -> bool:
        """A socket was accepted: count it, or refuse it at the connection cap (metric only, no
        access-log line, so a flood cannot turn into a log flood). At the pending-handshake cap the
        newcomer is admitted and the oldest socket still in its handshake is dropped instead —
        preferring one that has not sent a byte (an honest client sends its ClientHello at once).
        Refusing the newcomer let a flood that keeps the cap full lock every new client out until
        the flood's sockets timed out (docs/RELIABILITY.md open finding 9); the gateway does the same."""
        if self.open_sockets >= self.max_connections:
            self.refused_sockets += 1
            self.metrics.handshake_failed("inbound", "overload")
            return False
        if self.pending_handshakes >= self.max_pending_handshakes:
            victim = next((c for c in self._handshaking if not c.heard_from), None)
            if victim is None:
                victim = next(iter(self._handshaking))
            self.evicted_sockets += 1
            self.metrics.handshake_failed("inbound", "overload")
            victim.evict()
        self.open_sockets += 1
        self._handshaking[conn] = None
        return True

    def handshake_failed(self, conn: _ServerConnection, reason: str, label: str) -> None:
        self.metrics.handshake_failed("inbound", label)
        record = ConnectionRecord(direction="inbound", src_addr=conn.peer_addr, dst_addr=conn.local_addr,
                                  error=reason, response_flag="TLS_FAILURE")
        self.access_log.failed(record)


class _ServerConnection(HboneConnectionProtocol):
    """One client's mTLS connection to 15008."""

    h2: HboneServerConnection

    def __init__(self, server: HboneServer) -> None:
        super().__init__(server._ctx, server_side=True, handshake_timeout=server.handshake_timeout)
        self.server = server
        self.h2 = HboneServerConnection(settings=server.settings, limits=server.limits)
        self._tasks: set[asyncio.Task[None]] = set()
        self._admitted = False
        self.heard_from = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.server.admit(self):
            self.closed = True
            cast(asyncio.Transport, transport).abort()  # uvloop transports are duck-typed alike
            return
        self._admitted = True
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.heard_from = True
        super().data_received(data)

    def evict(self) -> None:
        """Dropped at the pending-handshake cap to make room for a newer socket."""
        self._handshake_over()
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _handshake_over(self) -> None:
        self.server._handshaking.pop(self, None)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._handshake_over()
        if self._admitted:
            self._admitted = False
            self.server.open_sockets -= 1

    def verify(self, ssl_object: ssl.SSLObject) -> VerifiedPeer:
        return verify_client_peer(ssl_object, self.server.credentials, self.server.clock())

    def established(self) -> None:
        self._handshake_over()
        self.server.connections.add(self)

    def handshake_failed(self, reason: str, label: str, flag: str) -> None:
        self._handshake_over()
        self.server.handshake_failed(self, reason, label)

    def role_event(self, event: Event) -> None:
        if isinstance(event, ConnectRequest):
            stream = self.register(event.stream_id)
            task = asyncio.get_running_loop().create_task(self.server.handle_connect(self, stream, event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif isinstance(event, RequestRejected):
            self.server.rejected_by_protocol(self, event)

    def respond(self, stream: HboneStream, status: int, headers: list[Header] | None = None) -> None:
        if self.closed:
            return
        self.h2.respond(stream.stream_id, status, headers)
        self.schedule_flush()
        if status != 200:
            self.drop(stream, f"http status: {status}")

    def closed_hook(self, reason: str) -> None:
        self.server.connections.discard(self)
        for task in list(self._tasks):
            task.cancel()

