"""The waypoint's HTTP serving inside a tunnel: keep-alive, pipelining, chunked bodies, upgrades,
h2c prior knowledge, header bounds, header hygiene, backend failures — over real HBONE tunnels."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest_asyncio

from tests.waypoint.conftest import SEED_POLICY, VIP, Mesh, Pki, seed_with_waypoint, start_mesh
from zerotunnel.node.hbone_client import HboneConnectError
from zerotunnel.policy.decision import Decision
from zerotunnel.waypoint.http import StreamChannel

ALLOW_ALL = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-b, namespace: namespace-a}
spec:
  targetRefs: [{kind: Service, group: "", name: app-a}]
  action: ALLOW
  rules: [{from: [{source: {namespaces: [namespace-b]}}]}]
"""
HOST = b"app-a.namespace-a.svc.cluster.local"


@pytest_asyncio.fixture
async def open_mesh(pki: Pki) -> AsyncIterator[Mesh]:
    m = await start_mesh(pki, seed_with_waypoint(ALLOW_ALL))
    yield m
    await m.close()


async def _read_all(channel: StreamChannel) -> bytes:
    out = b""
    while chunk := await channel.recv():
        out += chunk
    return out


def _responses(raw: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each HTTP/1.1 response in a byte string (Content-Length framing)."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        m = re.search(rb"(?i)content-length: (\d+)", head)
        n = int(m.group(1)) if m else 0
        out.append((status, rest[:n]))
        raw = rest[n:]
    return out


async def test_keepalive_and_pipelining(open_mesh: Mesh) -> None:
    channel = await open_mesh.open()
    requests = (
        b"".join(b"GET /p%d HTTP/1.1\r\nHost: " % i + HOST + b"\r\n\r\n" for i in range(3))
        + b"GET /last HTTP/1.1\r\nHost: "
        + HOST
        + b"\r\nConnection: close\r\n\r\n"
    )
    await channel.send(requests)  # all four at once: pipelined
    responses = _responses(await _read_all(channel))
    assert [s for s, _ in responses] == [200, 200, 200, 200]
    assert [json.loads(b)["path"] for _, b in responses] == ["/p0", "/p1", "/p2", "/last"]


async def test_chunked_request_body(open_mesh: Mesh) -> None:
    channel = await open_mesh.open()
    await channel.send(
        b"POST /upload HTTP/1.1\r\nHost: " + HOST + b"\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    [(status, body)] = _responses(await _read_all(channel))
    assert status == 200
    echo = json.loads(body)
    assert echo["body_bytes"] == 11
    assert "transfer-encoding" not in echo["headers"]


async def test_unsupported_upgrade_refused_h2c_ignored(open_mesh: Mesh) -> None:
    channel = await open_mesh.open()
    await channel.send(
        b"GET /ws HTTP/1.1\r\nHost: " + HOST + b"\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Key: x\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    [(status, body)] = _responses(await _read_all(channel))
    assert status == 501
    assert b"upgrade not supported by this proxy: websocket" in body
    assert open_mesh.seen == []
    channel = await open_mesh.open()
    await channel.send(
        b"GET /h2c HTTP/1.1\r\nHost: " + HOST + b"\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    await channel.send(b"GET /after HTTP/1.1\r\nHost: " + HOST + b"\r\nConnection: close\r\n\r\n")
    responses = _responses(await _read_all(channel))
    assert [s for s, _ in responses] == [200, 200]
    echo = json.loads(responses[0][1])
    assert echo["http_version"] == "1.1"
    assert "upgrade" not in echo["headers"] and "http2-settings" not in echo["headers"]


async def test_connect_method_refused(open_mesh: Mesh) -> None:
    channel = await open_mesh.open()
    await channel.send(b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 10.0.0.1:443\r\n\r\n")
    [(status, _)] = _responses(await _read_all(channel))
    assert status == 501


async def test_header_size_bounded(open_mesh: Mesh) -> None:
    channel = await open_mesh.open()
    big = b"x-big: " + b"a" * (70 * 1024) + b"\r\n"
    await channel.send(b"GET / HTTP/1.1\r\nHost: " + HOST + b"\r\n" + big + b"\r\n")
    [(status, _)] = _responses(await _read_all(channel))
    assert status == 431
    assert open_mesh.seen == []


async def test_identity_headers_stripped_and_forwarding_headers_set(open_mesh: Mesh) -> None:
    response = await open_mesh.request(
        "GET",
        "/h",
        headers=[
            ("x-forwarded-client-cert", "By=spiffe://cluster.local/ns/x/sa/admin;URI=spiffe://evil"),
            ("x-envoy-original-path", "/admin"),
            ("x-istio-attributes", "forged"),
            ("x-spiffe-id", "spiffe://evil"),
            ("x-forwarded-proto", "https"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("x-request-id", "rid-1"),
            ("x-keep", "yes"),
        ],
    )
    assert response.status == 200
    headers = json.loads(response.body)["headers"]
    for name in (
        "x-forwarded-client-cert",
        "x-envoy-original-path",
        "x-istio-attributes",
        "x-spiffe-id",
        "x-hop",
    ):
        assert name not in headers, name
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-request-id"] == "rid-1"
    assert headers["x-keep"] == "yes"
    assert headers["x-forwarded-for"]


async def test_h2c_prior_knowledge_concurrent_streams(open_mesh: Mesh) -> None:
    channel = await open_mesh.open()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    sids = []
    for i in range(5):
        sid = conn.get_next_available_stream_id()
        sids.append(sid)
        conn.send_headers(
            sid,
            [(":method", "GET"), (":path", f"/s{i}"), (":scheme", "http"), (":authority", HOST.decode())],
            end_stream=True,
        )
    deny = conn.get_next_available_stream_id()
    conn.send_headers(
        deny,
        [(":method", "GET"), (":path", "/x"), (":scheme", "http"), (":authority", HOST.decode())],
        end_stream=False,
    )
    conn.send_data(deny, b"body", end_stream=True)
    await channel.send(conn.data_to_send())
    status: dict[int, int] = {}
    bodies: dict[int, bytes] = {}
    ended: set[int] = set()
    while len(ended) < 6:
        data = await channel.recv()
        assert data, "connection closed early"
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                assert ev.stream_id is not None and ev.headers is not None
                status[ev.stream_id] = int(dict(ev.headers)[b":status"])
            elif isinstance(ev, h2.events.DataReceived):
                assert ev.stream_id is not None and ev.data is not None
                bodies[ev.stream_id] = bodies.get(ev.stream_id, b"") + ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                assert ev.stream_id is not None
                ended.add(ev.stream_id)
        await channel.send(conn.data_to_send())
    assert [status[s] for s in sids] == [200] * 5
    assert [json.loads(bodies[s])["path"] for s in sids] == [f"/s{i}" for i in range(5)]
    assert status[deny] == 200 and json.loads(bodies[deny])["body_bytes"] == 4
    channel.send_eof()


async def test_backend_failure_is_503_with_reason(open_mesh: Mesh) -> None:
    await open_mesh.destination.close(0)
    response = await open_mesh.request("GET", "/down")
    assert response.status == 503
    assert response.body.startswith(b"upstream connect error or disconnect/reset before headers")
    [line] = [x for x in open_mesh.logs if x["path"] == "/down"]
    assert line["response_flags"] == "UF"


async def test_destination_not_bound_to_waypoint_refused(open_mesh: Mesh) -> None:
    try:
        await open_mesh.open(authority="10.96.99.99:80")
    except HboneConnectError as exc:
        assert exc.status == 401  # refused: "... is not served by waypoint namespace-a/waypoint"
    else:
        raise AssertionError("tunnel to an unbound destination was accepted")


async def test_metrics_and_access_log(pki: Pki) -> None:
    m = await start_mesh(pki, seed_with_waypoint(SEED_POLICY))
    try:
        assert (await m.request("GET", "/data")).status == 200
        assert (await m.request("POST", "/data")).status == 403
        text = m.waypoint.telemetry.render().decode()
        assert "istio_requests_total{" in text
        assert re.search(r'istio_requests_total\{[^}]*response_code="403"[^}]*\} 1\.0', text)
        assert re.search(
            r'istio_request_duration_milliseconds_count\{[^}]*response_code="200"'
            r"[^}]*\} 1\.0",
            text,
        )
        allowed, denied = m.logs
        assert allowed["method"] == "GET" and allowed["response_code"] == 200
        assert allowed["src_identity"] == "spiffe://cluster.local/ns/namespace-b/sa/service-account-b"
        assert allowed["dst_identity"] == "spiffe://cluster.local/ns/namespace-a/sa/service-account-a"
        assert allowed["dst_service"] == "app-a.namespace-a.svc.cluster.local"
        assert denied["response_code"] == 403 and denied["reason"] == "allow policies exist, but none allowed"
        assert VIP in m.waypoint.binding(VIP).service.vip  # type: ignore[union-attr,operator]
    finally:
        await m.close()


async def test_upstream_keepalive_reused_and_recovered(open_mesh: Mesh) -> None:
    """Upstream HTTP connections are kept alive (one CONNECT for many requests); when the destination
    closes them (here: a policy change re-check), the next request opens a fresh one."""
    for _ in range(3):
        assert (await open_mesh.request("GET", "/k")).status == 200
    assert len(open_mesh.seen) == 1
    assert len(open_mesh.app_requests) == 3
    allow = open_mesh.destination.authorize
    closed = open_mesh.destination.recheck(lambda _r: Decision(False, None, None, "test", 401))
    assert closed == 1
    open_mesh.destination.authorize = allow
    assert (await open_mesh.request("GET", "/after")).status == 200
    assert len(open_mesh.seen) == 2


async def test_h2_rapid_reset_gets_goaway(open_mesh: Mesh) -> None:
    """security.md §1d: HEADERS + RST_STREAM floods (CVE-2023-44487) are cut off with GOAWAY
    ENHANCE_YOUR_CALM; the cancelled requests do not pile up upstream."""
    channel = await open_mesh.open()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    await channel.send(conn.data_to_send())
    for _ in range(1200):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(
            sid,
            [(":method", "GET"), (":path", "/flood"), (":scheme", "http"), (":authority", HOST.decode())],
            end_stream=True,
        )
        conn.reset_stream(sid)
        if sid % 101 == 0:
            await channel.send(conn.data_to_send())
    await channel.send(conn.data_to_send())
    goaway = None
    while goaway is None:
        data = await channel.recv()
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ConnectionTerminated):
                goaway = ev
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert len(open_mesh.app_requests) < 1200


SMUGGLE_POLICY = (
    ALLOW_ALL
    + """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: namespace-a}
spec:
  targetRefs: [{kind: Service, group: "", name: app-a}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"""
)


async def test_request_smuggling_attempts_never_reach_the_app(pki: Pki) -> None:
    """CL+TE, duplicate Content-Length, obs-fold: refused (400) or re-framed by the waypoint — a
    hidden `GET /admin` never reaches the app without its own policy check (security.md §1a/§1b)."""
    m = await start_mesh(pki, seed_with_waypoint(SMUGGLE_POLICY))
    hidden = b"GET /admin HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n"
    attacks = [
        b"POST /x HTTP/1.1\r\nHost: " + HOST + b"\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n" + hidden,
        b"POST /x HTTP/1.1\r\nHost: "
        + HOST
        + b"\r\nContent-Length: 0\r\nContent-Length: "
        + str(len(hidden)).encode()
        + b"\r\n\r\n"
        + hidden,
        b"POST /x HTTP/1.1\r\nHost: "
        + HOST
        + b"\r\nTransfer-Encoding: chunked\r\n folded\r\n\r\n0\r\n\r\n"
        + hidden,
        b"POST /x HTTP/1.1\r\nHost: " + HOST + b"\r\nTransfer-Encoding: xchunked\r\n\r\n" + hidden,
    ]
    try:
        for attack in attacks:
            channel = await m.open()
            await channel.send(attack)
            channel.send_eof()
            for status, _ in _responses(await _read_all(channel)):
                assert status in (200, 400, 403, 501), status
        assert not any("/admin" in line for line in m.app_requests), m.app_requests
    finally:
        await m.close()


TCP_SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: app-a-raw, namespace: namespace-a}
spec:
  selector: {app: app-a}
  ports: [{name: tcp-raw, port: 9000, targetPort: 8080}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: raw-from-b, namespace: namespace-a}
spec:
  targetRefs: [{kind: Service, group: "", name: app-a-raw}]
  action: ALLOW
  rules: [{from: [{source: {namespaces: [namespace-b]}}]}]
"""
RAW_VIP = "10.96.0.20"


async def test_tcp_port_relayed_with_tcp_chain_policy(pki: Pki) -> None:
    """A `tcp-` port is relayed as bytes (§4.6): no HTTP parsing (a header the HTTP path would strip
    arrives untouched), source-only rules decide, a denial closes the connection."""
    m = await start_mesh(pki, seed_with_waypoint(TCP_SERVICE), vips={"namespace-a/app-a-raw": RAW_VIP})
    try:
        channel = await m.open(authority=f"{RAW_VIP}:9000")
        await channel.send(
            b"GET /raw HTTP/1.1\r\nHost: x\r\nx-forwarded-client-cert: raw\r\nConnection: close\r\n\r\n"
        )
        [(status, body)] = _responses(await _read_all(channel))
        assert status == 200
        assert json.loads(body)["headers"]["x-forwarded-client-cert"] == "raw"
        channel.send_eof()
        denied = await m.open("namespace-c", "service-account-c", authority=f"{RAW_VIP}:9000")
        try:  # closed without an HTTP answer: EOF or reset, depending on timing
            await denied.send(b"GET /raw HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await _read_all(denied) == b""
        except ConnectionResetError:
            pass
        for _ in range(100):  # both relays log when they end
            lines = [x for x in m.logs if x["protocol"] == "TCP"]
            if len(lines) == 2:
                break
            await asyncio.sleep(0.02)
        assert [x["response_flags"] for x in lines] == ["-", "UAEX"]
        assert lines[1]["reason"] == "allow policies exist, but none allowed"
        assert "istio_requests_total{" not in m.waypoint.telemetry.render().decode()
    finally:
        await m.close()
