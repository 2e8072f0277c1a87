"""The node proxy: one process per node serving every mesh pod on it (our ztunnel).

DESIGN.md §1/§4 and istio-ambient.md §2. For each pod the node opens, *inside the pod's network
namespace*, the outbound capture listener (15001), the plaintext inbound listener (15006) and the HBONE
listener (15008), with the pod's own certificate. The decisions are the pure packages' — routing
(`mesh.routing.plan_outbound`), authorization (`policy.Engine.check_l4`) — taken against one immutable
snapshot that `apply` swaps whole; every policy change re-checks live inbound connections and closes the
ones now denied (§4.3, §10.12).

A pod is served only once its certificate is in hand (`add_pod` waits for it), so new pods never see a
spurious denial (issue 4, "Certificates").
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from zerotunnel.config import Config
from zerotunnel.hbone.headers import Baggage, build_request_headers
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.mesh.build import Addresses, build_mesh
from zerotunnel.mesh.model import (
    INBOUND_PLAINTEXT_PORT,
    OUTBOUND_CAPTURE_PORT,
    PROXY_PORTS,
    MeshState,
    Workload,
)
from zerotunnel.mesh.routing import HboneRoute, PassthroughRoute, RoutingError, plan_outbound
from zerotunnel.node.accesslog import AccessLog, ConnectionRecord
from zerotunnel.node.capture import NetnsHandle, open_listener_in_netns, original_dst, socket_in_netns
from zerotunnel.node.certs import CertificateManager
from zerotunnel.node.hbone_client import HboneConnectError, HbonePool, PoolKey
from zerotunnel.node.hbone_conn import HboneStream
from zerotunnel.node.hbone_server import HboneServer, InboundRequest, LocalWorkload
from zerotunnel.node.metrics import UNKNOWN, ProxyMetrics, TrafficLabels
from zerotunnel.node.passthrough import TcpStream, connect_from_netns
from zerotunnel.node.relay import TcpRelay
from zerotunnel.node.tls import WorkloadCredentials
from zerotunnel.node.workload_api import WorkloadApiServer
from zerotunnel.policy.decision import Decision
from zerotunnel.policy.engine import Engine
from zerotunnel.policy.l4 import L4Request

log = logging.getLogger("zerotunnel.node")

POLICY_REJECTION = "connection closed due to policy rejection: "
POLICY_CHANGE = "connection closed due to policy change"
DRAIN = "connection closed due to connection drain"
BIND_ALL = "0.0.0.0"  # noqa: S104 - in-pod listeners bind inside the pod's own network namespace


class PodError(Exception):
    """A pod could not be served (unknown to the mesh, no certificate, listener failed)."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a decision needs, swapped whole; connections record the version they began under."""

    version: int
    config: Config
    state: MeshState
    engine: Engine


def authorize_l4(snapshot: Snapshot, workload: Workload, request: L4Request) -> Decision:
    return snapshot.engine.check_l4(workload.namespace, workload.labels, request)


@dataclass(slots=True, eq=False)
class _PlainConnection:
    """A live plaintext inbound connection (15006), kept for re-checks on policy change."""

    request: L4Request
    relay: TcpRelay
    record: ConnectionRecord
    version: int


class _ResetAtOnce(asyncio.Protocol):
    """A connection accepted only to be refused: RST as soon as the transport exists."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()  # uvloop transports are duck-typed alike


MAX_SETTING_UP = 512
"""Default cap on a node's outbound connections in setup (`zerotunnel node --max-setting-up`)."""


@functools.lru_cache(maxsize=4096)
def _expected_ids(identities: tuple[str, ...]) -> frozenset[SpiffeId]:
    """The identities a route's server may present, parsed once per distinct route rather than per
    connection (3.6 % of the client proxy's CPU under connection churn, bench/RESULTS.md)."""
    return frozenset(SpiffeId.parse(i) for i in identities)


@dataclass(slots=True)
class PodProxy:
    """The listeners, pool and certificate of one pod."""

    node: NodeProxy
    uid: str
    netns: NetnsHandle
    ip: str
    identity: SpiffeId
    credentials: WorkloadCredentials
    hbone: HboneServer | None = None
    pool: HbonePool | None = None
    workload_api: WorkloadApiServer | None = None
    servers: list[asyncio.Server] = field(default_factory=list)
    plaintext: set[_PlainConnection] = field(default_factory=set)
    outbound: set[TcpRelay] = field(default_factory=set)
    _pick: itertools.count[int] = field(default_factory=itertools.count)
    _hbone_closing: asyncio.Task[None] | None = None
    _expiry_reported: bool = False

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.pool = HbonePool(
            lambda _ident: self.credentials,
            metrics=self.node.metrics,
            sock_factory=lambda family: socket_in_netns(self.netns, family),
        )
        self.hbone = HboneServer(
            self.credentials,
            authorize=self._authorize_hbone,
            local_workload=self._local_workload,
            connect_upstream=self._connect_app,
            metrics=self.node.metrics,
            access_log=self.node.access_log,
        )
        # 15008 never presents an expired certificate (security.md §4 item 25).
        self.hbone.set_handshake_gate(lambda: self.certificate_problem() is None)
        await self.hbone.start(sock=open_listener_in_netns(self.netns, BIND_ALL, 15008, blocking=False))
        out_sock = open_listener_in_netns(self.netns, BIND_ALL, OUTBOUND_CAPTURE_PORT, blocking=False)
        in_sock = open_listener_in_netns(self.netns, BIND_ALL, INBOUND_PLAINTEXT_PORT, blocking=False)
        self.servers.append(await loop.create_server(self._outbound_protocol, sock=out_sock, backlog=1024))
        self.servers.append(await loop.create_server(self._plaintext_protocol, sock=in_sock, backlog=1024))

    def live_connections(self) -> int:
        """Connections carrying an app's data now: inbound tunnels (15008), plaintext inbound (15006)
        and outbound (15001, tunneled or passed through)."""
        hbone = len(self.hbone.live) if self.hbone is not None else 0
        return hbone + len(self.plaintext) + len(self.outbound)

    async def stop_accepting(self, grace: float) -> None:
        """The first step of a drain, on its own so that the node can report "listeners closed" only
        once it is true: 15001/15006 close here, 15008 in the first step of `HboneServer.close`, which
        runs before this returns (the task is scheduled first, and asyncio runs ready tasks in order)."""
        if self._hbone_closing is not None:
            return
        for server in self.servers:
            server.close()
        loop = asyncio.get_running_loop()
        self._hbone_closing = loop.create_task(self.hbone.close(grace)) if self.hbone is not None else None
        await asyncio.sleep(0)

    async def close(self, grace: float = 5.0) -> tuple[int, int]:
        """Drain (security.md rule 19 and §2a "Lifecycle", ztunnel's connection termination deadline):
        every listener stops at once (a new connection is refused by the kernel, a new CONNECT on a
        pooled HBONE connection gets 503), the connections already carrying data in *both* directions
        get `grace` seconds to finish, and only those still open at the deadline are closed with
        `connection closed due to connection drain`. Returns (finished, cut)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self.stop_accepting(grace)
        at_start = self.live_connections()
        hbone = self._hbone_closing
        if self.workload_api is not None:
            await self.workload_api.close()
        while self.live_connections() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        cut = self.live_connections()
        for conn in list(self.plaintext):
            conn.relay.close(DRAIN)
        for relay in list(self.outbound):
            relay.close(DRAIN)
        if hbone is not None:
            await hbone
        if self.pool is not None:
            await self.pool.close()
        for server in self.servers:
            await server.wait_closed()
        self.netns.close()
        return max(at_start - cut, 0), cut

    def update_credentials(self, credentials: WorkloadCredentials) -> None:
        self.credentials = credentials
        if self._expiry_reported:
            log.info("certificate for %s renewed; %s serves again", self.identity, self.uid)
            self._expiry_reported = False
        if self.hbone is not None:
            self.hbone.update_credentials(credentials)

    # -- certificate expiry (security.md §4 item 25) --------------------------------------------------

    def certificate_problem(self) -> str | None:
        """None while the pod's certificate is valid; once it has expired without a renewal (the CA is
        unreachable for longer than the TTL), the reason every tunnel needing it is refused with: the
        node fails closed — no expired certificate is presented or accepted as ours — and serves again
        as soon as a renewal arrives."""
        not_after = self.credentials.not_after
        if datetime.now(UTC) <= not_after:
            return None
        reason = self.node.certs.expired_reason(self.identity) or (
            f"no valid certificate for {self.identity}: expired at {not_after.isoformat()}")
        if not self._expiry_reported:
            self._expiry_reported = True
            log.error("%s; refusing %s's tunnels until a new certificate arrives", reason, self.uid)
        return reason

    def _retire_stale(self, key: PoolKey) -> None:
        """No new tunnel on a pooled connection authenticated by a certificate that has since expired
        (its peer's, or an old one of ours); tunnels it carries finish, it idles out."""
        assert self.pool is not None
        now = datetime.now(UTC)
        for conn in self.pool.connections(key):
            if conn.retired:
                continue
            if (conn.peer is not None and conn.peer.not_after < now) or (
                    conn.creds is not self.credentials and conn.creds.not_after < now):
                conn.retired = True

    def workload(self) -> Workload | None:
        snapshot = self.node.snapshot
        return snapshot.state.workloads.get(self.uid) if snapshot is not None else None

    # -- inbound HBONE (15008) --------------------------------------------------------------------

    def _local_workload(self, landed_ip: str) -> LocalWorkload | None:
        workload = self.workload()
        if workload is None or landed_ip != self.ip:
            return None
        return LocalWorkload(
            name=workload.name,
            namespace=workload.namespace,
            identity=self.identity,
            cluster=self.node.cluster,
        )

    def _authorize_hbone(self, request: InboundRequest) -> Decision:
        problem = self.certificate_problem()
        if problem is not None:  # a CONNECT on a connection made while our certificate was valid
            return Decision(False, None, None, problem, 401)
        return self.authorize(request.l4_request())

    def authorize(self, request: L4Request) -> Decision:
        snapshot = self.node.snapshot
        workload = self.workload()
        if snapshot is None or workload is None:
            return Decision(False, None, None, f"workload {self.uid} is not in the mesh configuration", 401)
        return authorize_l4(snapshot, workload, request)

    async def _connect_app(self, request: InboundRequest, factory: Callable[[], TcpRelay]) -> TcpRelay:
        """Upstream to the app: a marked connection from inside the pod's netns (§1.4 step 8)."""
        host, port = request.target
        return cast(TcpRelay, await connect_from_netns(factory, self.netns, host, port))

    def recheck(self) -> int:
        """Policy changed: close every live inbound connection the new snapshot denies."""
        closed = self.hbone.recheck() if self.hbone is not None else 0
        for conn in list(self.plaintext):
            decision = self.authorize(conn.request)
            if not decision.allowed:
                conn.record.error = POLICY_CHANGE
                conn.record.response_flag = "DENY"
                conn.relay.close(POLICY_CHANGE)
                self.plaintext.discard(conn)
                closed += 1
        return closed

    # -- inbound plaintext (15006) ----------------------------------------------------------------

    def _plaintext_protocol(self) -> TcpRelay:
        relay = TcpRelay(on_done=self._plaintext_done)
        asyncio.get_running_loop().call_soon(self._start_plaintext, relay)
        return relay

    def _start_plaintext(self, relay: TcpRelay) -> None:
        asyncio.get_running_loop().create_task(self._contained(self._plaintext(relay), relay))

    async def _contained(self, work: Coroutine[Any, Any, None], relay: TcpRelay) -> None:
        """Every error of one connection stays with that connection (issue 4, operations)."""
        try:
            await work
        except Exception as exc:
            log.exception("connection from %s failed", relay.peer_addr)
            relay.fail(f"internal error: {exc}")

    async def _plaintext(self, relay: TcpRelay) -> None:
        record = ConnectionRecord(direction="inbound", src_addr=relay.peer_addr)
        workload = self.workload()
        if workload is not None:
            record.dst_workload, record.dst_namespace = workload.name, workload.namespace
            record.dst_identity = str(self.identity)
        transport = relay.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        try:
            if sock is None:
                raise OSError("no socket")
            dst = original_dst(sock)
        except OSError as exc:
            relay.fail(f"no original destination: {exc}")
            return
        record.dst_addr = dst
        if dst[1] in PROXY_PORTS:
            record.error = "attempted recursive call to ourselves"
            self.node.access_log.failed(record)
            relay.fail(record.error)
            return
        src_ip = relay.peer_addr[0] if relay.peer_addr else ""
        request = L4Request(src_ip=src_ip, dst_ip=dst[0], dst_port=dst[1], src_identity=None)
        decision = self.authorize(request)
        labels = self._labels("destination", record, "-", security="none")
        if not decision.allowed:
            record.error = POLICY_REJECTION + decision.reason
            record.response_flag = "DENY"
            self.node.metrics.connection_failed_early(self._labels("destination", record, "DENY", "none"))
            self.node.access_log.complete(record)
            relay.fail(record.error)
            return
        try:
            upstream = cast(TcpStream, await connect_from_netns(TcpStream, self.netns, dst[0], dst[1]))
        except (OSError, TimeoutError) as exc:
            record.error = f"connection failed: {exc}"
            record.response_flag = "CONNECT"
            self.node.access_log.complete(record)
            relay.fail(record.error)
            return
        snapshot = self.node.snapshot
        conn = _PlainConnection(request, relay, record, snapshot.version if snapshot else 0)
        self.plaintext.add(conn)
        record.established = True
        self.node.metrics.connection_opened(labels)
        relay._on_done = lambda r: self._plaintext_finished(conn, labels)
        relay.attach(cast(HboneStream, upstream))

    def _plaintext_done(self, relay: TcpRelay) -> None:
        """Relay ended before the upstream was joined: nothing counted yet."""

    def _plaintext_finished(self, conn: _PlainConnection, labels: TrafficLabels) -> None:
        self.plaintext.discard(conn)
        relay, record = conn.relay, conn.record
        record.bytes_sent, record.bytes_recv = relay.bytes_down, relay.bytes_up
        record.error = record.error or relay.error
        self.node.metrics.connection_closed(labels, record.bytes_sent, record.bytes_recv)
        self.node.access_log.complete(record)

    # -- outbound (15001) -------------------------------------------------------------------------

    def _outbound_protocol(self) -> asyncio.Protocol:
        node = self.node
        if node.setting_up >= node.max_setting_up:
            # Load shedding: past this many tunnels still being set up, more work only delays the
            # admitted ones until their clients give up (1,000/s offered against a 250/s capacity
            # answered 48-96/s); the app gets an immediate reset instead, as at a full backlog.
            node.shed_connection()
            return _ResetAtOnce()
        relay = TcpRelay()
        node.setting_up += 1
        asyncio.get_running_loop().call_soon(self._start_outbound, relay)
        return relay

    def _start_outbound(self, relay: TcpRelay) -> None:
        task = asyncio.get_running_loop().create_task(self._contained(self._outbound(relay), relay))
        task.add_done_callback(self.node.setup_done)

    async def _outbound(self, relay: TcpRelay) -> None:
        source = self.workload()
        record = ConnectionRecord(direction="outbound", src_addr=relay.peer_addr)
        record.src_identity = str(self.identity)
        if source is not None:
            record.src_workload, record.src_namespace = source.name, source.namespace
        transport = relay.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        snapshot = self.node.snapshot
        try:
            if sock is None:
                raise OSError("no socket")
            dst = original_dst(sock)
        except OSError as exc:
            relay.fail(f"no original destination: {exc}")
            return
        if snapshot is None or source is None:
            record.error = f"workload {self.uid} is not in the mesh configuration"
            self.node.access_log.failed(record)
            relay.fail(record.error)
            return
        try:
            route = plan_outbound(snapshot.state, source, dst[0], dst[1], next(self._pick))
        except RoutingError as exc:
            record.dst_addr, record.error, record.response_flag = dst, exc.message, exc.response_flag
            self.node.access_log.failed(record)
            relay.fail(exc.message)
            return
        if isinstance(route, PassthroughRoute):
            await self._passthrough(relay, record, route, snapshot.state)
        else:
            await self._hbone_out(relay, record, route, source, dst)

    def _dst_fields(
        self, record: ConnectionRecord, state: MeshState, uid: str | None, service: str | None
    ) -> None:
        record.dst_service = service
        workload = state.workloads.get(uid) if uid else None
        if workload is not None:
            record.dst_workload, record.dst_namespace = workload.name, workload.namespace

    async def _hbone_out(
        self,
        relay: TcpRelay,
        record: ConnectionRecord,
        route: HboneRoute,
        source: Workload,
        dst: tuple[str, int],
    ) -> None:
        assert self.pool is not None
        snapshot = self.node.snapshot
        assert snapshot is not None
        self._dst_fields(record, snapshot.state, route.destination_workload, route.service)
        record.dst_addr = (route.next_hop_ip, route.next_hop_port)
        record.dst_hbone_addr = route.authority
        record.dst_identity = ",".join(route.expected_identities)
        key = PoolKey(
            src_identity=self.identity,
            dst_identities=_expected_ids(route.expected_identities),
            dst=(route.next_hop_ip, route.next_hop_port),
            src_ip=self.ip,
        )
        peer = relay.peer_addr or (self.ip, 0)
        headers = build_request_headers(
            baggage=Baggage(
                cluster=self.node.cluster,
                namespace=source.namespace,
                workload_type="pod",
                workload_name=source.name,
            ),
            forwarded_for=peer,
            forwarded_host=route.service,
            trace_id=secrets.token_bytes(16),
            parent_id=secrets.token_bytes(8),
        )
        problem = self.certificate_problem()
        if problem is not None:
            record.error, record.response_flag = problem, "CONNECT"
            self.node.metrics.connection_failed_early(
                self._labels("source", record, record.response_flag, "mutual_tls")
            )
            self.node.access_log.complete(record)
            relay.fail(problem)
            return
        self._retire_stale(key)
        try:
            stream = await self.pool.connect(key, route.authority, headers)
        except HboneConnectError as exc:
            record.error, record.response_flag = exc.message, exc.response_flag or "CONNECT"
            self.node.metrics.connection_failed_early(
                self._labels("source", record, record.response_flag, "mutual_tls")
            )
            self.node.access_log.complete(record)
            relay.fail(exc.message)
            return
        self._outbound_established(relay, record, stream, "mutual_tls")

    async def _passthrough(
        self, relay: TcpRelay, record: ConnectionRecord, route: PassthroughRoute, state: MeshState
    ) -> None:
        self._dst_fields(record, state, route.destination_workload, route.service)
        record.dst_addr = (route.ip, route.port)
        try:
            upstream = cast(TcpStream, await connect_from_netns(TcpStream, self.netns, route.ip, route.port))
        except (OSError, TimeoutError) as exc:
            record.error, record.response_flag = f"connection failed: {exc}", "CONNECT"
            self.node.access_log.complete(record)
            relay.fail(record.error)
            return
        self._outbound_established(relay, record, cast(HboneStream, upstream), "unknown")

    def _outbound_established(
        self, relay: TcpRelay, record: ConnectionRecord, stream: HboneStream, security: str
    ) -> None:
        """Count the connection and join the app to its stream (HBONE, or plain TCP passthrough)."""
        labels = self._labels("source", record, "-", security)
        self.node.metrics.connection_opened(labels)
        record.established = True
        self.outbound.add(relay)
        relay._on_done = lambda r: self._outbound_finished(r, record, labels)
        relay.attach(stream)

    def _outbound_finished(self, relay: TcpRelay, record: ConnectionRecord, labels: TrafficLabels) -> None:
        self.outbound.discard(relay)
        record.bytes_sent, record.bytes_recv = relay.bytes_up, relay.bytes_down
        record.error = record.error or relay.error
        self.node.metrics.connection_closed(labels, record.bytes_sent, record.bytes_recv)
        self.node.access_log.complete(record)

    def _labels(self, reporter: str, record: ConnectionRecord, flag: str, security: str) -> TrafficLabels:
        return TrafficLabels(
            reporter=reporter,
            source_workload=record.src_workload or UNKNOWN,
            source_workload_namespace=record.src_namespace or UNKNOWN,
            source_principal=record.src_identity or UNKNOWN,
            destination_service=record.dst_service or UNKNOWN,
            destination_workload=record.dst_workload or UNKNOWN,
            destination_workload_namespace=record.dst_namespace or UNKNOWN,
            destination_principal=record.dst_identity or UNKNOWN,
            response_flags=flag,
            connection_security_policy=security,
        )


class NodeProxy:
    """All pods of one node, one snapshot, one certificate manager."""

    def __init__(
        self,
        node: str,
        certs: CertificateManager,
        *,
        cluster: str = "Kubernetes",
        metrics: ProxyMetrics | None = None,
        access_log: AccessLog | None = None,
        max_setting_up: int = MAX_SETTING_UP,
    ) -> None:
        self.node = node
        self.cluster = cluster
        self.max_setting_up = max_setting_up
        """Outbound connections accepted and not yet tunnelled (or failed), across the node's pods;
        beyond it new ones are reset at once (`shed_connection`)."""
        self.setting_up = 0
        self.shed = 0
        self._shed_reported = 0.0
        self.certs = certs
        self.metrics = metrics or ProxyMetrics()
        self.access_log = access_log or AccessLog()
        self.snapshot: Snapshot | None = None
        self.pods: dict[str, PodProxy] = {}
        self.started = datetime.now(UTC)
        self.drained = 0
        """Connections that finished inside a drain period (pod removal or shutdown), and those cut."""
        self.cut = 0
        certs.on_update(self._credentials_updated)

    # -- load shedding ---------------------------------------------------------------------------

    def setup_done(self, _task: asyncio.Task[None]) -> None:
        self.setting_up -= 1

    def shed_connection(self) -> None:
        """An outbound connection accepted past `max_setting_up` is being reset; counted, and logged
        at most every 10 s (no access-log line each: overload must not become a log flood)."""
        self.shed += 1
        self.metrics.connection_shed()
        now = asyncio.get_running_loop().time()
        if now - self._shed_reported >= 10.0:
            self._shed_reported = now
            log.warning("overloaded: %d tunnels in setup (cap %d); %d new connection(s) reset so far",
                        self.setting_up, self.max_setting_up, self.shed)

    # -- configuration --------------------------------------------------------------------------

    def apply(self, config: Config, addresses: Addresses, version: int) -> int:
        """Swap in a new snapshot and re-check live inbound connections; returns how many closed."""
        self.snapshot = Snapshot(version, config, build_mesh(config, addresses), Engine.from_config(config))
        closed = sum(pod.recheck() for pod in self.pods.values())
        log.info(
            "snapshot version %d applied (%d workloads, %d services); %d connection(s) closed",
            version,
            len(self.snapshot.state.workloads),
            len(self.snapshot.state.services),
            closed,
        )
        return closed

    @property
    def ready(self) -> bool:
        return self.snapshot is not None

    # -- pods -------------------------------------------------------------------------------------

    async def add_pod(
        self, uid: str, netns: str | os.PathLike[str], ip: str, workload_api: Path | None = None
    ) -> PodProxy:
        """Serve a pod: certificate first, then its three listeners inside its netns, and (when asked)
        the SPIFFE Workload API on `workload_api`, a Unix socket that serves only this pod's identity."""
        existing = self.pods.get(uid)
        if existing is not None:
            return existing
        snapshot = self.snapshot
        if snapshot is None:
            raise PodError("no configuration loaded yet")
        workload = snapshot.state.workloads.get(uid)
        if workload is None:
            raise PodError(f"pod {uid} is not in the mesh configuration")
        if not workload.in_mesh:
            raise PodError(
                f"pod {uid} is not in the mesh (namespace without istio.io/dataplane-mode=ambient)"
            )
        if workload.node not in (None, self.node):
            raise PodError(f"pod {uid} is scheduled on node {workload.node}, not {self.node}")
        identity = SpiffeId.parse(workload.identity)
        credentials = await self.certs.acquire(identity)
        try:
            handle = NetnsHandle(netns)
        except Exception:
            self.certs.release(identity)
            raise
        pod = PodProxy(self, uid, handle, ip, identity, credentials)
        try:
            await pod.start()
            if workload_api is not None:
                pod.workload_api = WorkloadApiServer(workload_api, identity, self.certs)
                await pod.workload_api.start()
        except Exception:
            await pod.close(grace=0)
            self.certs.release(identity)
            raise
        self.pods[uid] = pod
        log.info("pod %s (%s, %s) served", uid, ip, identity)
        return pod

    async def remove_pod(self, uid: str, grace: float = 1.0) -> bool:
        pod = self.pods.pop(uid, None)
        if pod is None:
            return False
        finished, cut = await pod.close(grace)
        self.drained += finished
        self.cut += cut
        self.certs.release(pod.identity)
        log.info("pod %s removed (%d connection(s) finished, %d cut)", uid, finished, cut)
        return True

    async def close(self, grace: float = 5.0) -> tuple[int, int]:
        """Drain every pod at once (one deadline for the node, not one per pod); returns and logs how
        many live connections finished inside the drain period and how many were cut at its end."""
        started = asyncio.get_running_loop().time()
        before = self.drained, self.cut
        await asyncio.gather(*(pod.stop_accepting(grace) for pod in self.pods.values()))
        log.info("listeners closed; draining %d live connection(s) for up to %gs",
                 sum(pod.live_connections() for pod in self.pods.values()), grace)
        await asyncio.gather(*(self.remove_pod(uid, grace) for uid in list(self.pods)))
        await self.certs.close()
        finished, cut = self.drained - before[0], self.cut - before[1]
        log.info("drain complete after %.1fs: %d connection(s) finished, %d cut at the %gs deadline",
                 asyncio.get_running_loop().time() - started, finished, cut, grace)
        return finished, cut

    def _credentials_updated(self, credentials: WorkloadCredentials) -> None:
        for pod in self.pods.values():
            if pod.identity == credentials.identity:
                pod.update_credentials(credentials)
