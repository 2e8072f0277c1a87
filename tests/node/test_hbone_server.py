from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.node.hbone_client import HboneConnectError
from zerotunnel.node.hbone_server import InboundRequest, LocalWorkload
from zerotunnel.node.tls import WorkloadCredentials, client_context
from zerotunnel.policy.decision import Decision
from zerotunnel.testing.certs import BAD_KINDS, EXPECTED_REASON, make_bad_svid

Env = Any  # conftest.Env


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    data = await reader.read()
    writer.close()
    return data


def test_one_byte_through_the_tunnel(env: Env) -> None:
    async def main() -> None:
        app = await env.app("echo")
        server = await env.server()
        pool = env.pool()
        out = await env.outbound(pool, env.key(server), f"127.0.0.1:{app}")
        assert await _roundtrip(out, b"x") == b"x"
        await asyncio.sleep(0.1)
        await env.aclose()

    run(main())
    logs = env.logs
    inbound = [entry for entry in logs if entry["direction"] == "inbound"]
    assert inbound and inbound[0]["message"] == "connection complete" and "error" not in inbound[0]
    assert inbound[0]["src.identity"] == "spiffe://cluster.local/ns/default/sa/client"
    assert inbound[0]["dst.identity"] == "spiffe://cluster.local/ns/default/sa/server"
    assert inbound[0]["bytes_recv"] == 1 and inbound[0]["bytes_sent"] == 1
    assert inbound[0]["dst.hbone_addr"].startswith("127.0.0.1:")


def _status_case(env: Env, authority: str | None = None, **server_kw: Any) -> tuple[str, dict[str, Any]]:
    errors: list[str] = []

    async def main() -> None:
        app = await env.app("echo")
        server = await env.server(**server_kw)
        pool = env.pool()
        out = await env.outbound(pool, env.key(server), authority or f"127.0.0.1:{app}", errors)
        reader, writer = await asyncio.open_connection("127.0.0.1", out)
        writer.write(b"hello")
        try:
            data = await reader.read()
        except ConnectionError:  # reset (RST), as ztunnel's clients see it
            data = b""
        assert data == b""  # the app sees its connection closed/reset, never data
        writer.close()
        await asyncio.sleep(0.05)
        await env.aclose()

    run(main())
    inbound = [entry for entry in env.logs if entry["direction"] == "inbound"]
    assert len(inbound) == 1
    return errors[0], inbound[0]


def test_ip_mismatch_is_400(env: Env) -> None:
    client_err, log = _status_case(env, authority="127.0.0.2:80")
    assert client_err == "http status: 400"
    assert log["error"] == "ip mismatch: 127.0.0.1 != 127.0.0.2"


def test_bad_authority_is_400(env: Env) -> None:
    client_err, log = _status_case(env, authority="not-an-authority")
    assert client_err == "http status: 400"
    assert log["error"] == "no valid authority pseudo header: 'not-an-authority'"


@pytest.mark.parametrize("port", [15001, 15006, 15008])
def test_recursive_call_is_503(env: Env, port: int) -> None:
    client_err, log = _status_case(env, authority=f"127.0.0.1:{port}")
    assert client_err == "http status: 503"
    assert log["error"] == "attempted recursive call to ourselves"


def test_policy_denial_is_401(env: Env) -> None:
    seen: list[InboundRequest] = []

    def deny(req: InboundRequest) -> Decision:
        seen.append(req)
        return Decision(False, "default/deny-all", 0, "explicitly denied by: default/deny-all", 401)

    client_err, log = _status_case(env, authorize=deny)
    assert client_err == "http status: 401"
    assert log["error"] == "connection closed due to policy rejection: explicitly denied by: default/deny-all"
    assert seen[0].source_identity == SpiffeId.parse("spiffe://cluster.local/ns/default/sa/client")
    assert seen[0].l4_request().src_identity == "spiffe://cluster.local/ns/default/sa/client"
    text = env.metrics.render().decode()
    assert 'response_flags="DENY"' in text and "istio_tcp_connections_failed_total" in text


def test_upstream_connect_failure_is_503(env: Env) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    client_err, log = _status_case(env, authority=f"127.0.0.1:{dead}")
    assert client_err == "http status: 503"
    assert log["error"].startswith("connection failed: ")


def test_unknown_local_workload_is_503(env: Env) -> None:
    client_err, log = _status_case(env, local_workload=lambda ip: None)
    assert client_err == "http status: 503"
    assert log["error"] == "failed to fetch information about local workload: 127.0.0.1"


async def _raw_h2_request(env: Env, server_addr: tuple[str, int], headers: list[tuple[str, str]]) -> int:
    ctx = client_context(env.client_creds)
    reader, writer = await asyncio.open_connection(*server_addr, ssl=ctx, server_hostname="")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=False)
    writer.write(conn.data_to_send())
    status = 0
    while not status:
        data = await reader.read(65536)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                status = int(dict(ev.headers)[b":status"])
        writer.write(conn.data_to_send())
    writer.close()
    return status


def test_non_connect_is_400(env: Env) -> None:
    async def main() -> int:
        server = await env.server()
        status = await _raw_h2_request(
            env,
            server.address,
            [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "x:1")],
        )
        await env.aclose()
        return int(status)

    assert run(main()) == 400
    assert env.logs[0]["error"] == "expected method CONNECT, got GET"


def test_recheck_closes_denied_live_tunnel(env: Env) -> None:
    async def main() -> None:
        app = await env.app("echo")
        server = await env.server()
        pool = env.pool()
        out = await env.outbound(pool, env.key(server), f"127.0.0.1:{app}")
        reader, writer = await asyncio.open_connection("127.0.0.1", out)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        assert len(server.live) == 1
        closed = server.recheck(
            lambda req: Decision(False, "default/deny", 0, "explicitly denied by: x", 401)
        )
        assert closed == 1
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await asyncio.sleep(0.05)
        assert not server.live
        await env.aclose()

    run(main())
    inbound = [entry for entry in env.logs if entry["direction"] == "inbound"]
    assert inbound[0]["error"] == "connection closed due to policy change"
    assert inbound[0]["bytes_recv"] == 4


def test_recheck_keeps_allowed_tunnel(env: Env) -> None:
    async def main() -> None:
        app = await env.app("echo")
        server = await env.server()
        out = await env.outbound(env.pool(), env.key(server), f"127.0.0.1:{app}")
        reader, writer = await asyncio.open_connection("127.0.0.1", out)
        writer.write(b"a")
        assert await reader.readexactly(1) == b"a"
        assert server.recheck() == 0
        writer.write(b"b")
        assert await reader.readexactly(1) == b"b"
        writer.close()
        await env.aclose()

    run(main())


@pytest.mark.parametrize("bad", ["other_root_creds", "ca_as_leaf_creds", "other_td_creds"])
def test_forged_clients_refused(env: Env, bad: str, request: pytest.FixtureRequest) -> None:
    creds = request.getfixturevalue(bad)
    errors: list[str] = []

    async def main() -> None:
        app = await env.app("echo")
        # trust the foreign trust domain's root so only our trust-domain check can refuse it
        server = await env.server(
            credentials=env.pki.creds("default", "server", bundle=creds.bundle.merge(env.pki.bundle))
            if bad == "other_td_creds"
            else env.server_creds
        )
        pool = env.pool(creds)
        with pytest.raises(HboneConnectError) as info:
            await pool.connect(env.key(server, creds), f"127.0.0.1:{app}")
        errors.append(info.value.message)
        await asyncio.sleep(0.1)
        await env.aclose()

    run(main())
    failed = [entry for entry in env.logs if entry["message"] == "connection failed"]
    assert failed and failed[0]["direction"] == "inbound" and failed[0]["error"].startswith("tls error")
    assert "istio_tls_handshake_failures_total" in env.metrics.render().decode()
    if bad == "other_td_creds":
        assert "expected trustdomain" in failed[0]["error"]


def test_tls12_client_refused(env: Env) -> None:
    async def main() -> None:
        server = await env.server()
        ctx = client_context(env.client_creds)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.open_connection(*server.address, ssl=ctx, server_hostname="")
        await asyncio.sleep(0.05)
        await env.aclose()

    run(main())
    assert env.logs[0]["message"] == "connection failed"
    assert 'istio_tls_handshake_failures_total{direction="inbound"' in env.metrics.render().decode()


def test_handshake_gate_refuses_before_any_certificate(env: Env) -> None:
    """While the gate says no (the pod's certificate expired, security.md §4 item 25) a client gets a
    handshake_failure alert and no server certificate; once it says yes, handshakes succeed again."""
    allowed = [False]

    async def main() -> list[bool]:
        server = await env.server()
        server.set_handshake_gate(lambda: allowed[0])
        outcomes = []
        for _ in range(2):
            try:
                ctx = client_context(env.client_creds)
                _, writer = await asyncio.open_connection(*server.address, ssl=ctx, server_hostname="")
            except ssl.SSLError as exc:
                assert "HANDSHAKE_FAILURE" in str(exc).upper(), exc
                outcomes.append(False)
            else:
                writer.close()
                outcomes.append(True)
            allowed[0] = True
        await asyncio.sleep(0.05)
        await env.aclose()
        return outcomes

    assert run(main()) == [False, True]


def test_garbage_instead_of_tls_is_contained(env: Env) -> None:
    async def main() -> None:
        server = await env.server()
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"GET / HTTP/1.1\r\n\r\n" * 10)
        assert await asyncio.wait_for(reader.read(), 5) in (b"",) or True
        writer.close()
        # the server still serves real clients
        app = await env.app("echo")
        out = await env.outbound(env.pool(), env.key(server), f"127.0.0.1:{app}")
        assert await _roundtrip(out, b"ok") == b"ok"
        await env.aclose()

    run(main())


def test_metrics_after_traffic(env: Env) -> None:
    async def main() -> None:
        app = await env.app("echo")
        server = await env.server()
        out = await env.outbound(env.pool(), env.key(server), f"127.0.0.1:{app}")
        assert await _roundtrip(out, b"x" * 1000) == b"x" * 1000
        await asyncio.sleep(0.1)
        await env.aclose()

    run(main())
    text = env.metrics.render().decode()
    opened = [line for line in text.splitlines() if line.startswith("istio_tcp_connections_opened_total{")]
    assert len(opened) == 1 and opened[0].endswith(" 1.0")
    assert 'reporter="destination"' in opened[0]
    assert 'source_principal="spiffe://cluster.local/ns/default/sa/client"' in opened[0]
    assert 'destination_principal="spiffe://cluster.local/ns/default/sa/server"' in opened[0]
    assert 'connection_security_policy="mutual_tls"' in opened[0] and 'response_flags="-"' in opened[0]
    received = [line for line in text.splitlines() if line.startswith("istio_tcp_received_bytes_total{")]
    sent = [line for line in text.splitlines() if line.startswith("istio_tcp_sent_bytes_total{")]
    assert received[0].endswith(" 1000.0") and sent[0].endswith(" 1000.0")
    assert "istio_tcp_connections_closed_total{" in text
    assert (
        'istio_cert_expiry_timestamp_seconds{identity="spiffe://cluster.local/ns/default/sa/server"}' in text
    )


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_every_bad_svid_kind_is_refused(env: Env, kind: str) -> None:
    """security.md rules 2-4 end to end: each broken client SVID (testing.certs) is refused by the
    15008 server, by OpenSSL at the handshake or by our re-verification with the verifier's reason."""
    leaf, key, inters = make_bad_svid(env.pki.ca, kind)  # type: ignore[arg-type]
    creds = WorkloadCredentials.from_pem(
        SpiffeId.parse("spiffe://cluster.local/ns/default/sa/bad"),
        leaf + b"".join(inters),
        key,
        env.pki.bundle,
    )

    async def main() -> None:
        app = await env.app("echo")
        server = await env.server()
        with pytest.raises(HboneConnectError):
            await env.pool(creds).connect(env.key(server, creds), f"127.0.0.1:{app}")
        await asyncio.sleep(0.05)
        assert not server.live
        await env.aclose()

    run(main())
    (failed,) = [e for e in env.logs if e["message"] == "connection failed"]
    assert failed["error"].startswith("tls error")
    labels = [
        line.split('reason="', 1)[1].split('"', 1)[0]
        for line in env.metrics.render().decode().splitlines()
        if line.startswith("istio_tls_handshake_failures_total{")
    ]
    assert len(labels) == 1, labels
    openssl_refused = labels[0].isupper() or labels[0] in ("closed", "SSLError")
    assert openssl_refused or labels[0] == EXPECTED_REASON[kind]  # type: ignore[index]


def test_drain_closes_live_tunnels(env: Env) -> None:
    async def main() -> None:
        app = await env.app("echo")
        server = await env.server()
        pool = env.pool()
        key = env.key(server)
        out = await env.outbound(pool, key, f"127.0.0.1:{app}")
        reader, writer = await asyncio.open_connection("127.0.0.1", out)
        writer.write(b"a")
        assert await reader.readexactly(1) == b"a"
        drain = asyncio.create_task(server.close(grace=0.3))
        await asyncio.sleep(0.05)
        # during the grace period the live tunnel still works; new tunnels are refused
        writer.write(b"b")
        assert await reader.readexactly(1) == b"b"
        with pytest.raises(HboneConnectError) as info:
            await pool.connect(key, f"127.0.0.1:{app}")
        assert info.value.message == "http status: 503"
        await drain
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await env.aclose()

    run(main())
    inbound = [e for e in env.logs if e["direction"] == "inbound"]
    assert [e["error"] for e in inbound] == ["connection closed due to connection drain"] * 2


def test_ipv6_authority(env: Env) -> None:
    async def main() -> None:
        app = await env.app("echo", host="::1")
        server = await env.server(host="::1", local_workload=lambda ip: LocalWorkload("s", "default"))
        stream = await env.pool().connect(env.key(server), f"[::1]:{app}")
        assert stream.stream_id == 1
        stream.abort()
        with pytest.raises(HboneConnectError) as info:
            await env.pool().connect(env.key(server), f"[::2]:{app}")
        assert info.value.message == "http status: 400"
        await env.aclose()

    run(main())
    assert any(e.get("error") == "ip mismatch: ::1 != ::2" for e in env.logs)


def test_waypoint_accepts_authority_for_another_ip(env: Env) -> None:
    """§1.4 step 5's exception: a waypoint receives tunnels addressed to what is behind it."""

    async def main() -> None:
        app = await env.app("echo", host="127.0.0.2")
        server = await env.server(waypoint=True)
        stream = await env.pool().connect(env.key(server), f"127.0.0.2:{app}")
        stream.abort()
        await env.aclose()

    run(main())
    assert not any("ip mismatch" in str(e.get("error")) for e in env.logs)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(min_size=1, max_size=2048), preface=st.booleans())
def test_bytes_after_tls_never_break_the_server(env: Env, junk: bytes, preface: bool) -> None:
    """Authenticated but hostile bytes after the handshake: the connection is closed (GOAWAY) and
    the server keeps serving everyone else (issue 4: "bad bytes never crash it")."""

    async def main() -> None:
        app = await env.app("echo")
        server = await env.server()
        reader, writer = await asyncio.open_connection(
            *server.address, ssl=client_context(env.client_creds), server_hostname=""
        )
        writer.write((b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" if preface else b"") + junk)
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(reader.read(1 << 16), 0.5)
        writer.close()
        stream = await env.pool().connect(env.key(server), f"127.0.0.1:{app}")
        stream.abort()
        await env.aclose()

    run(main())
