"""Outbound HBONE: a pool of mTLS + HTTP/2 connections, one CONNECT stream per app connection.

spec/istio-ambient.md §1.5 (and performance.md §1.4: a full mTLS handshake in CPython costs
~1.5 ms, so pooling matters even more for us than for ztunnel):

- connections are keyed by (source identity, expected destination identities, next hop, source
  IP); a different key never shares a TLS session ("each unique source and destination must get
  their own dedicated, secure tunnel connection");
- at most 100 streams per connection, capped by the server's SETTINGS_MAX_CONCURRENT_STREAMS;
  a full connection makes the pool open another one for the same key;
- concurrent first use of a key waits for exactly one dial (single flight, a per-key lock);
- a connection without streams is released after 5 minutes; PING every 10 s, dropped when no
  answer arrives within 20 s;
- sockets get SO_MARK 0x539 and TCP_NODELAY; the server's identity is checked after every
  handshake (§1.7) and a mismatch refuses the connection with Istio's error text.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from zerotunnel.errors import ZerotunnelError
from zerotunnel.hbone.authority import HboneAuthority
from zerotunnel.hbone.events import ConnectResponse, Event, Header, PeerSettingsChanged, PingAcknowledged
from zerotunnel.hbone.protocol import CLIENT_SETTINGS, AbuseLimits, HboneClientConnection, HboneSettings
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.identity.verify import VerifiedPeer
from zerotunnel.node.hbone_conn import HboneConnectionProtocol, HboneStream, open_tcp
from zerotunnel.node.metrics import ProxyMetrics
from zerotunnel.node.tls import WorkloadCredentials, client_context, verify_server_peer

MAX_STREAMS_PER_CONNECTION = 100
IDLE_RELEASE = 300.0
PING_INTERVAL = 10.0
PING_TIMEOUT = 20.0
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class PoolKey:
    """ztunnel's `WorkloadKey` (§1.5); equal keys share connections, anything else does not."""

    src_identity: SpiffeId
    dst_identities: frozenset[SpiffeId]
    dst: tuple[str, int]  # next hop, ip:15008
    src_ip: str | None = None


class HboneConnectError(ZerotunnelError):
    """The tunnel could not be opened; `message` is the access log's error, `response_flag` §8.1's."""


class _ClientConnection(HboneConnectionProtocol):
    h2: HboneClientConnection

    def __init__(
        self, pool: HbonePool, key: PoolKey, ctx: ssl.SSLContext, creds: WorkloadCredentials
    ) -> None:
        super().__init__(ctx, server_side=False, handshake_timeout=pool.connect_timeout)
        self.pool = pool
        self.key = key
        self.creds = creds
        self.h2 = HboneClientConnection(settings=pool.settings, limits=pool.limits,
                                        max_streams=pool.max_streams)
        self.ready: asyncio.Future[None] = self._loop.create_future()
        self.retired = False  # no new streams (e.g. stream ids exhausted); live ones finish
        self._responses: dict[int, asyncio.Future[int]] = {}
        self._idle: asyncio.TimerHandle | None = None
        self._ping: asyncio.TimerHandle | None = None
        self._ping_deadline: asyncio.TimerHandle | None = None

    def verify(self, ssl_object: ssl.SSLObject) -> VerifiedPeer:
        return verify_server_peer(ssl_object, self.creds, self.key.dst_identities, self.pool.clock())

    def established(self) -> None:
        self._schedule_ping()
        self._arm_idle()

    def handshake_failed(self, reason: str, label: str, flag: str) -> None:
        self.pool.metrics.handshake_failed("outbound", label)
        if not self.ready.done():
            self.ready.set_exception(HboneConnectError(reason, response_flag=flag))

    @property
    def capacity(self) -> int:
        if self.closed or self.retired or not self.ready.done():
            return 0
        return self.h2.capacity

    def open(self, authority: HboneAuthority | str, headers: list[Header] | None) -> tuple[
            HboneStream, asyncio.Future[int]]:
        sid = self.h2.open_connect(authority, headers)
        stream = self.register(sid)
        fut: asyncio.Future[int] = self._loop.create_future()
        self._responses[sid] = fut
        self.schedule_flush()
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        return stream, fut

    def role_event(self, event: Event) -> None:
        if isinstance(event, ConnectResponse):
            fut = self._responses.pop(event.stream_id, None)
            if event.status != 200:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    self.drop(stream, f"http status: {event.status}")
            if fut is not None and not fut.done():
                fut.set_result(event.status)
        elif isinstance(event, PingAcknowledged):
            if self._ping_deadline is not None:
                self._ping_deadline.cancel()
                self._ping_deadline = None
            self._schedule_ping()
        elif isinstance(event, PeerSettingsChanged) and not self.ready.done():
            # Ready only once the server's SETTINGS are known: opening streams before we know its
            # SETTINGS_MAX_CONCURRENT_STREAMS could overrun it (§1.5: capped by the server).
            self.ready.set_result(None)

    def stream_forgotten(self, stream: HboneStream) -> None:
        fut = self._responses.pop(stream.stream_id, None)
        if fut is not None and not fut.done():
            reason = stream.reset_reason or "stream closed"
            fut.set_exception(HboneConnectError(reason, response_flag="CONNECT"))
        if not self.streams:
            self._arm_idle()

    def closed_hook(self, reason: str) -> None:
        for timer in (self._idle, self._ping, self._ping_deadline):
            if timer is not None:
                timer.cancel()
        for fut in self._responses.values():
            if not fut.done():
                fut.set_exception(HboneConnectError(reason, response_flag="CONNECT"))
        self._responses.clear()
        if not self.ready.done():
            self.ready.set_exception(HboneConnectError(reason, response_flag="CONNECT"))
        self.pool._forget(self)

    # keepalive and idle release (§1.5)
    def _schedule_ping(self) -> None:
        if not self.closed and self.pool.ping_interval > 0:
            self._ping = self._loop.call_later(self.pool.ping_interval, self._send_ping)

    def _send_ping(self) -> None:
        if self.closed:
            return
        self.h2.ping(os.urandom(8))
        self.flush()
        self._ping_deadline = self._loop.call_later(self.pool.ping_timeout, self.close, "ping timeout")

    def _arm_idle(self) -> None:
        if self._idle is None and not self.closed and not self.streams:
            self._idle = self._loop.call_later(self.pool.idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle = None
        if not self.streams:
            self.close("idle")


class HbonePool:
    """Outbound HBONE connections of one node proxy (or one pod), shared by key (§1.5)."""

    def __init__(
        self,
        credentials: Callable[[SpiffeId], WorkloadCredentials],
        *,
        max_streams: int = MAX_STREAMS_PER_CONNECTION,
        idle_timeout: float = IDLE_RELEASE,
        ping_interval: float = PING_INTERVAL,
        ping_timeout: float = PING_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        mark: bool = True,
        metrics: ProxyMetrics | None = None,
        clock: Callable[[], datetime] | None = None,
        settings: HboneSettings = CLIENT_SETTINGS,
        limits: AbuseLimits | None = None,
        sock_factory: Callable[[socket.AddressFamily], socket.socket] | None = None,
    ) -> None:
        self._credentials = credentials
        self.sock_factory = sock_factory
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        self.mark = mark
        self.metrics = metrics or ProxyMetrics()
        self.clock = clock or (lambda: datetime.now(UTC))
        self.settings = settings
        self.limits = limits or AbuseLimits()
        self._conns: dict[PoolKey, list[_ClientConnection]] = {}
        self._locks: dict[PoolKey, asyncio.Lock] = {}
        self._contexts: dict[SpiffeId, tuple[WorkloadCredentials, ssl.SSLContext]] = {}

    async def connect(self, key: PoolKey, authority: HboneAuthority | str,
                      headers: list[Header] | None = None) -> HboneStream:
        """Open a tunnel to `authority` through the pooled connection for `key`; returns once the
        server answered 200. Raises HboneConnectError (`http status: <code>` for a refusal)."""
        for _ in range(3):
            conn = await self._checkout(key)
            try:
                stream, response = conn.open(authority, headers)
            except Exception:
                # Do not kill the tunnels it carries: stop using it, let it idle out.
                conn.retired = True
                conn._arm_idle()
                continue
            status = await response
            if status != 200:
                raise HboneConnectError(f"http status: {status}", status=status,
                                        response_flag="DENY" if status == 401 else "CONNECT")
            return stream
        raise HboneConnectError("connection failed: no usable HBONE connection", response_flag="CONNECT")

    def connections(self, key: PoolKey | None = None) -> list[_ClientConnection]:
        if key is not None:
            return list(self._conns.get(key, ()))
        return [c for conns in self._conns.values() for c in conns]

    async def close(self) -> None:
        for conn in self.connections():
            conn.close("pool closed")

    # -- internals --------------------------------------------------------------------------------

    def _usable(self, key: PoolKey) -> _ClientConnection | None:
        for conn in self._conns.get(key, ()):
            if conn.capacity > 0:
                return conn
        return None

    async def _checkout(self, key: PoolKey) -> _ClientConnection:
        conn = self._usable(key)
        if conn is not None:
            return conn
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            conn = self._usable(key)
            if conn is not None:
                return conn
            conn = await self._dial(key)
            self._conns.setdefault(key, []).append(conn)
            self.metrics.hbone_connections.inc()
            return conn

    def _context(self, identity: SpiffeId) -> tuple[WorkloadCredentials, ssl.SSLContext]:
        creds = self._credentials(identity)
        cached = self._contexts.get(identity)
        if cached is None or cached[0] is not creds:
            cached = (creds, client_context(creds))
            self._contexts[identity] = cached
        return cached

    async def _dial(self, key: PoolKey) -> _ClientConnection:
        creds, ctx = self._context(key.src_identity)
        host, port = key.dst
        try:
            conn = await open_tcp(lambda: _ClientConnection(self, key, ctx, creds), host, port,
                                  bind_ip=key.src_ip, mark=self.mark, timeout=self.connect_timeout,
                                  sock_factory=self.sock_factory)
        except TimeoutError:
            raise HboneConnectError(
                "connection timed out, maybe a NetworkPolicy is blocking HBONE port 15008: "
                f"connect to {host}:{port} timed out", response_flag="NETWORK_POLICY") from None
        except OSError as exc:
            raise HboneConnectError(f"connection failed: {exc}", response_flag="CONNECT") from None
        await conn.ready
        return conn

    def _forget(self, conn: _ClientConnection) -> None:
        conns = self._conns.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)
            self.metrics.hbone_connections.dec()
            if not conns:
                self._conns.pop(conn.key, None)
