from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import pytest

from zerotunnel.hbone.protocol import HboneSettings
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.node.hbone_client import HboneConnectError, PoolKey
from zerotunnel.node.relay import TcpRelay
from zerotunnel.node.tls import server_context

Env = Any


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_150_concurrent_streams_open_two_connections(env: Env) -> None:
    async def main() -> None:
        app = await env.app("hold")
        server = await env.server()
        pool = env.pool()
        key = env.key(server)
        streams = await asyncio.gather(*(pool.connect(key, f"127.0.0.1:{app}") for _ in range(150)))
        conns = pool.connections(key)
        assert len(conns) == 2
        assert sorted(len(c.streams) for c in conns) == [50, 100]
        assert len({s.stream_id for s in streams if s.connection is conns[0]}) == len(conns[0].streams)
        for s in streams:
            s.abort()
        await env.aclose()

    run(main())


def test_single_flight_per_key(env: Env) -> None:
    async def main() -> None:
        app = await env.app("hold")
        server = await env.server()
        pool = env.pool()
        key = env.key(server)
        await asyncio.gather(*(pool.connect(key, f"127.0.0.1:{app}") for _ in range(20)))
        assert len(pool.connections(key)) == 1
        # a different key (another source identity) never shares the TLS connection
        other = env.pki.creds("default", "other")
        pool2 = env.pool(other)
        await pool2.connect(env.key(server, other), f"127.0.0.1:{app}")
        assert len(server.connections) == 2
        await env.aclose()

    run(main())


def test_capped_by_server_max_concurrent_streams(env: Env) -> None:
    async def main() -> None:
        app = await env.app("hold")
        server = await env.server(settings=HboneSettings(max_concurrent_streams=5))
        pool = env.pool()
        key = env.key(server)
        await asyncio.gather(*(pool.connect(key, f"127.0.0.1:{app}") for _ in range(12)))
        assert sorted(len(c.streams) for c in pool.connections(key)) == [2, 5, 5]
        await env.aclose()

    run(main())


def test_server_identity_mismatch_refused(env: Env) -> None:
    async def main() -> None:
        app = await env.app("echo")
        server = await env.server()
        pool = env.pool()
        want = SpiffeId.istio("cluster.local", "default", "reviews")
        with pytest.raises(HboneConnectError) as info:
            await pool.connect(env.key(server, expect=want), f"127.0.0.1:{app}")
        assert info.value.message == (
            "identity verification error: peer did not present the expected SAN "
            f"({want}), got spiffe://cluster.local/ns/default/sa/server"
        )
        assert info.value.response_flag == "IDENTITY_ERROR"
        assert 'reason="unexpected-identity"' in pool.metrics.render().decode()
        await env.aclose()

    run(main())


def test_status_error_and_connect_timeout_texts(env: Env) -> None:
    async def main() -> None:
        server = await env.server()
        pool = env.pool(connect_timeout=0.3)
        with pytest.raises(HboneConnectError) as info:
            await pool.connect(env.key(server), "127.0.0.1:15001")
        assert info.value.message == "http status: 503"
        # a black-holed next hop (TEST-NET-1 is not routed) gives Istio's NetworkPolicy hint
        key = PoolKey(env.client_creds.identity, frozenset({env.server_creds.identity}), ("192.0.2.1", 15008))
        with pytest.raises(HboneConnectError) as info:
            await pool.connect(key, "192.0.2.1:80")
        assert info.value.message.startswith(
            "connection timed out, maybe a NetworkPolicy is blocking HBONE port 15008: "
        ) or (info.value.message.startswith("connection failed: "))
        await env.aclose()

    run(main())


def test_idle_connection_released(env: Env) -> None:
    async def main() -> None:
        app = await env.app("echo")
        server = await env.server()
        pool = env.pool(idle_timeout=0.2)
        key = env.key(server)
        stream = await pool.connect(key, f"127.0.0.1:{app}")
        relay = TcpRelay()
        stream.abort()
        del relay
        assert len(pool.connections(key)) == 1
        await asyncio.sleep(0.5)
        assert pool.connections(key) == []
        await env.aclose()

    run(main())


def test_ping_keepalive_and_timeout(env: Env) -> None:
    async def main() -> None:
        # a healthy server answers PINGs: the connection survives several intervals
        app = await env.app("echo")
        server = await env.server()
        pool = env.pool(ping_interval=0.05, ping_timeout=0.2)
        key = env.key(server)
        await pool.connect(key, f"127.0.0.1:{app}")
        await asyncio.sleep(0.4)
        assert len(pool.connections(key)) == 1

        # a server that completes TLS and SETTINGS but then goes silent is dropped after the timeout
        silent: list[asyncio.StreamWriter] = []

        async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            silent.append(writer)
            # the HTTP/2 server preface: an empty SETTINGS frame, then nothing ever again
            writer.write(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            await reader.read(1 << 20)
            await asyncio.sleep(10)

        srv = await asyncio.start_server(mute, "127.0.0.1", 0, ssl=server_context(env.server_creds))
        addr = srv.sockets[0].getsockname()[:2]
        mkey = PoolKey(env.client_creds.identity, frozenset({env.server_creds.identity}), addr)
        task = asyncio.create_task(pool.connect(mkey, "127.0.0.1:1"))
        await asyncio.sleep(0.1)
        conns = pool.connections(mkey)
        assert len(conns) == 1
        await asyncio.sleep(0.5)
        assert conns[0].closed and conns[0].close_reason is not None
        assert "ping timeout" in conns[0].close_reason
        with pytest.raises(HboneConnectError):
            await task
        srv.close()
        for w in silent:
            w.close()
        await env.aclose()

    run(main())


def test_socket_mark_nodelay_and_source_ip(env: Env) -> None:
    """§1.5/§2.2: outbound sockets carry SO_MARK 0x539 (when allowed: root) and TCP_NODELAY, and
    leave from the pool key's source IP."""

    async def main() -> None:
        app = await env.app("hold")
        server = await env.server()
        made: list[int] = []

        def factory(family: socket.AddressFamily) -> socket.socket:
            made.append(family)
            return socket.socket(family, socket.SOCK_STREAM)

        pool = env.pool(sock_factory=factory)
        pool.mark = True
        key = PoolKey(
            env.client_creds.identity, frozenset({env.server_creds.identity}), server.address, "127.0.0.2"
        )
        await pool.connect(key, f"127.0.0.1:{app}")
        (conn,) = pool.connections(key)
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        expected_mark = 0x539 if os.geteuid() == 0 else 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == expected_mark
        (server_side,) = server.connections
        assert server_side.peer_addr[0] == "127.0.0.2"
        assert made == [socket.AF_INET]
        await env.aclose()

    run(main())


def test_failed_open_retires_connection_without_killing_its_tunnels(env: Env) -> None:
    async def main() -> None:
        app = await env.app("echo")
        server = await env.server()
        pool = env.pool()
        key = env.key(server)
        live = await pool.connect(key, f"127.0.0.1:{app}")
        (first,) = pool.connections(key)

        def exhausted(*_a: object, **_k: object) -> int:
            raise RuntimeError("no stream ids left")

        first.h2.open_connect = exhausted
        await pool.connect(key, f"127.0.0.1:{app}")
        conns = pool.connections(key)
        assert len(conns) == 2 and first.retired and not first.closed
        assert live.write(b"still here")
        live.abort()
        await env.aclose()

    run(main())


class _Collect:
    """A stream sink that keeps what arrives (and acknowledges it, as the relay does)."""

    def __init__(self) -> None:
        self.data = b""
        self.stream: Any = None

    def stream_data(self, data: bytes, length: int) -> None:
        self.data += data
        self.stream.consumed(length)

    def stream_eof(self) -> None: ...
    def stream_reset(self, reason: str) -> None: ...
    def stream_writable(self) -> None: ...


def test_writes_of_one_loop_iteration_leave_in_one_socket_write(env: Env) -> None:
    """Issue 8: every stream that queued bytes during one event-loop iteration shares one TLS
    record and one `send` (bench/RESULTS.md, lever a); the bytes still reach each stream intact."""

    async def main() -> None:
        app = await env.app("echo")
        server = await env.server()
        pool = env.pool()
        key = env.key(server)
        streams = [await pool.connect(key, f"127.0.0.1:{app}") for _ in range(10)]
        (conn,) = pool.connections(key)
        sinks = []
        for s in streams:
            sink = _Collect()
            sink.stream = s
            s.attach(sink)
            sinks.append(sink)
        await asyncio.sleep(0.05)
        writes: list[int] = []
        real_write = conn.transport.write

        def spy(data: bytes) -> None:
            writes.append(len(data))
            real_write(data)

        conn.transport.write = spy
        for i, s in enumerate(streams):
            s.write(b"ping %d" % i)
        assert writes == []  # nothing leaves before the iteration ends
        for _ in range(100):
            await asyncio.sleep(0.01)
            if all(sink.data for sink in sinks):
                break
        assert len(writes) == 1
        assert [sink.data for sink in sinks] == [b"ping %d" % i for i in range(10)]
        for s in streams:
            s.abort()
        await env.aclose()

    run(main())
