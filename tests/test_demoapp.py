"""The demo app (issue 5) over real sockets: curl and Python clients, HTTP/1.1 and HTTP/2.

Most tests talk to one `zerotunnel demo-app` subprocess (uvloop when installed, as users run it); the
HTTP/2 flow-control and shutdown tests run the server in-process on the stdlib event loop, so both loops
are exercised.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zerotunnel.demoapp import (
    H2_PREFACE,
    RequestInfo,
    decide,
    format_address,
    headers_json,
    split_target,
    start_demo_app,
)

HOST = "127.0.0.1"


@dataclass
class App:
    proc: subprocess.Popen[bytes]
    port: int
    stdout: Path
    stderr: Path

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"


def _launch(tmp: Path, *args: str) -> App:
    stdout, stderr = tmp / "stdout.log", tmp / "stderr.log"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zerotunnel", "demo-app", *args], stdout=out, stderr=err
        )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        match = re.search(r"listening on [\d.]+:(\d+)", stderr.read_text())
        if match:
            return App(proc, int(match.group(1)), stdout, stderr)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"demo-app did not start: {stderr.read_text()}")


def _stop(app: App) -> int:
    if app.proc.poll() is None:
        app.proc.send_signal(signal.SIGTERM)
    try:
        return app.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        app.proc.kill()
        raise


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    running = _launch(tmp_path_factory.mktemp("demoapp"), "--port", "0", "--host", HOST, "--name", "echo-1")
    yield running
    assert running.proc.poll() is None, f"demo-app died: {running.stderr.read_text()}"
    assert _stop(running) == 0


def _curl(*args: str) -> tuple[int, dict[str, Any] | str, str]:
    """(status, parsed JSON or text body, negotiated HTTP version) of one curl request."""
    marker = "\n--curl--"
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "-w", marker + "%{http_code} %{http_version}", *args],
        capture_output=True,
        check=True,
        text=True,
    )
    body, _, trailer = result.stdout.rpartition(marker)
    status, version = trailer.split()
    parsed: dict[str, Any] | str = json.loads(body) if body.startswith("{") else body
    return int(status), parsed, version


def _exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, half-close, and read everything the server answers until it closes."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _parse_responses(raw: bytes, methods: tuple[str, ...] = ()) -> list[tuple[int, bytes]]:
    """Every HTTP/1.1 response in a byte stream, in order, parsed by h11 as a client would.

    h11 needs to know each request's method to frame its response (HEAD has no body); default GET.
    """
    client = h11.Connection(h11.CLIENT)
    client.receive_data(raw)
    client.receive_data(b"")
    responses: list[tuple[int, bytes]] = []
    status, body = 0, b""
    while True:
        if client.our_state is h11.IDLE:
            method = methods[len(responses)] if len(responses) < len(methods) else "GET"
            client.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
            client.send(h11.EndOfMessage())
        event = client.next_event()
        if isinstance(event, h11.Response):
            status, body = event.status_code, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            responses.append((status, body))
            if client.our_state is h11.MUST_CLOSE or client.their_state is h11.MUST_CLOSE:
                return responses
            client.start_next_cycle()
        else:
            return responses


# -- pure helpers -----------------------------------------------------------------------------------


def test_headers_json_lowercases_and_keeps_repeats_as_lists() -> None:
    got = headers_json([("Host", "a"), ("X-A", "1"), ("x-a", "2"), ("X-A", "3"), ("b", "")])
    assert got == {"host": "a", "x-a": ["1", "2", "3"], "b": ""}


def test_split_target_keeps_the_raw_query() -> None:
    assert split_target("/a/b?x=1&y=%20?z") == ("/a/b", "x=1&y=%20?z")
    assert split_target("/") == ("/", "")
    assert split_target("*") == ("*", "")


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/status/418", 418),
        ("/status/200", 200),
        ("/status/599", 599),
        ("/status/199", 400),
        ("/status/600", 400),
        ("/status/abc", 400),
        ("/status/", 400),
        ("/status/4180", 400),
        ("/status/٤١٨", 400),
        ("/healthz", 200),
    ],
)
def test_decide_status_paths(path: str, status: int) -> None:
    reply = decide("n", RequestInfo("GET", path, (), "1.1", 0), "1.2.3.4:5", "6.7.8.9:10")
    assert reply.status == status


def test_format_address_brackets_ipv6() -> None:
    assert format_address(("10.0.0.1", 80)) == "10.0.0.1:80"
    assert format_address(("fd00::1", 8080, 0, 0)) == "[fd00::1]:8080"
    assert format_address(None) == "?"


def test_ipv6_listener_reports_bracketed_addresses_in_process() -> None:
    async def scenario() -> dict[str, Any]:
        app = await start_demo_app("::1", 0, "v6")
        try:
            reader, writer = await asyncio.open_connection("::1", app.port)
            writer.write(b"GET /v6 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(), timeout=5)
            writer.close()
        finally:
            await app.close()
        [(status, body)] = _parse_responses(raw)
        assert status == 200
        doc: dict[str, Any] = json.loads(body)
        return doc

    doc = asyncio.run(scenario())
    assert re.fullmatch(r"\[::1\]:\d+", doc["peer"])
    assert doc["local"].startswith("[::1]:")


def test_decide_refuses_connect() -> None:
    assert decide("n", RequestInfo("CONNECT", "a:1", (), "1.1", 0), "p", "l").status == 405


# -- HTTP/1.1 ---------------------------------------------------------------------------------------


def test_curl_http11_echo_reports_the_request(app: App) -> None:
    status, doc, version = _curl(
        f"{app.base}/a/b?x=1&y=two", "-H", "X-Test: 1", "-H", "x-test: 2", "-H", "Forwarded: for=10.0.0.1"
    )
    assert (status, version) == (200, "1.1")
    assert isinstance(doc, dict)
    assert doc["name"] == "echo-1"
    assert (doc["method"], doc["path"], doc["query"]) == ("GET", "/a/b", "x=1&y=two")
    assert doc["headers"]["x-test"] == ["1", "2"]
    assert doc["headers"]["forwarded"] == "for=10.0.0.1"
    assert doc["headers"]["host"] == f"{HOST}:{app.port}"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", doc["peer"])
    assert doc["local"] == f"{HOST}:{app.port}"
    assert (doc["http_version"], doc["body_bytes"]) == ("1.1", 0)
    assert set(doc) == {
        "name",
        "method",
        "path",
        "query",
        "headers",
        "peer",
        "local",
        "http_version",
        "body_bytes",
    }


def test_curl_chunked_and_content_length_bodies_are_counted(app: App, tmp_path: Path) -> None:
    payload = tmp_path / "body"
    payload.write_bytes(b"z" * 300_000)
    status, doc, _ = _curl(
        f"{app.base}/upload", "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{payload}"
    )
    assert status == 200 and isinstance(doc, dict)
    assert doc["headers"]["transfer-encoding"] == "chunked"
    assert (doc["method"], doc["body_bytes"]) == ("POST", 300_000)
    # curl sends `Expect: 100-continue` for a body this large: the app must answer 100 and read on.
    big = tmp_path / "big"
    big.write_bytes(b"y" * 2_000_000)
    status, doc, _ = _curl(f"{app.base}/big", "-X", "PUT", "--data-binary", f"@{big}")
    assert status == 200 and isinstance(doc, dict)
    assert (doc["method"], doc["body_bytes"]) == ("PUT", 2_000_000)


def test_hand_made_chunked_body_with_extensions_and_trailers(app: App) -> None:
    request = (
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    [(status, body)] = _parse_responses(_exchange(app.port, request))
    assert status == 200
    assert json.loads(body)["body_bytes"] == 21


def test_pipelined_requests_are_answered_in_order_on_one_connection(app: App) -> None:
    request = (
        b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /status/404 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"HEAD /four HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /five?q HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    responses = _parse_responses(_exchange(app.port, request), ("GET", "POST", "GET", "HEAD", "GET"))
    assert [status for status, _ in responses] == [200, 200, 404, 200, 200]
    docs = [json.loads(body) for _, body in responses if body]
    assert [(d["method"], d["path"], d["body_bytes"]) for d in docs] == [
        ("GET", "/one", 0),
        ("POST", "/two", 3),
        ("GET", "/status/404", 0),
        ("GET", "/five", 0),
    ]
    assert len({d["peer"] for d in docs}) == 1, "all on one connection"
    assert responses[3][1] == b"", "HEAD has no body"


def test_python_client_keep_alive_reuses_the_connection(app: App) -> None:
    conn = http.client.HTTPConnection(HOST, app.port, timeout=10)
    peers = set()
    try:
        for i in range(5):
            conn.request("GET", f"/k/{i}", headers={"X-N": str(i)})
            response = conn.getresponse()
            doc = json.loads(response.read())
            assert (response.status, doc["path"], doc["headers"]["x-n"]) == (200, f"/k/{i}", str(i))
            assert response.getheader("content-type") == "application/json"
            peers.add(doc["peer"])
    finally:
        conn.close()
    assert len(peers) == 1


def test_healthz_and_status_endpoints(app: App) -> None:
    assert _curl(f"{app.base}/healthz")[:2] == (200, "ok\n")
    status, doc, _ = _curl(f"{app.base}/status/503")
    assert status == 503 and isinstance(doc, dict) and doc["path"] == "/status/503"
    assert _curl(f"{app.base}/status/204")[:2] == (204, "")
    assert _curl(f"{app.base}/status/nope")[0] == 400


def test_malformed_request_gets_400_and_the_server_keeps_serving(app: App) -> None:
    for garbage in (
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n",
    ):
        raw = _exchange(app.port, garbage)
        assert re.match(rb"HTTP/1\.1 4(00|31) ", raw), raw[:80]
    assert _curl(f"{app.base}/still-alive")[0] == 200
    assert app.proc.poll() is None


def test_one_line_per_request_on_stdout(app: App) -> None:
    conn = http.client.HTTPConnection(HOST, app.port, timeout=10)
    conn.request("DELETE", "/log-me?x=1")
    response = conn.getresponse()
    peer = json.loads(response.read())["peer"]
    conn.close()
    expected = f"DELETE /log-me?x=1 200 {peer}"
    deadline = time.monotonic() + 5
    while expected not in app.stdout.read_text().splitlines() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert expected in app.stdout.read_text().splitlines()


# -- HTTP/2 -----------------------------------------------------------------------------------------


def test_curl_http2_prior_knowledge(app: App, tmp_path: Path) -> None:
    payload = tmp_path / "body"
    payload.write_bytes(b"q" * 1_000_000)  # far beyond the 64 KiB initial window: the app must ack data
    status, doc, version = _curl(
        "--http2-prior-knowledge",
        f"{app.base}/h2/path?z=9",
        "-H",
        "X-A: 1",
        "-H",
        "X-A: 2",
        "--data-binary",
        f"@{payload}",
    )
    assert (status, version) == (200, "2")
    assert isinstance(doc, dict)
    assert (doc["method"], doc["path"], doc["query"], doc["http_version"]) == ("POST", "/h2/path", "z=9", "2")
    assert doc["body_bytes"] == 1_000_000
    assert doc["headers"]["x-a"] == ["1", "2"]
    assert doc["headers"][":authority"] == f"{HOST}:{app.port}"
    assert _curl("--http2-prior-knowledge", f"{app.base}/status/418")[0] == 418
    status, head, _ = _curl("--http2-prior-knowledge", "-I", f"{app.base}/head")
    assert status == 200 and isinstance(head, str)
    assert head.startswith("HTTP/2 200") and "content-length:" in head and "{" not in head, "HEAD: no body"


def test_h2c_upgrade_switches_to_http2(app: App) -> None:
    status, doc, version = _curl("--http2", f"{app.base}/upgrade?u=1", "--data-binary", "abcd")
    assert (status, version) == (200, "2")
    assert isinstance(doc, dict)
    assert doc["headers"]["upgrade"] == "h2c"
    assert (doc["method"], doc["path"], doc["body_bytes"]) == ("POST", "/upgrade", 4)
    assert doc["http_version"] == "1.1", "the upgraded request arrived as HTTP/1.1"
    # later requests on the upgraded connection are ordinary HTTP/2 streams
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--http2",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code} %{num_connects}\n",
            f"{app.base}/u1",
            f"{app.base}/u2",
        ],
        capture_output=True,
        check=True,
        text=True,
    ).stdout.split("\n")
    assert out[:2] == ["2 200 1", "2 200 0"], out


@pytest.mark.parametrize(
    "upgrade_headers",
    [
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: !!!not-base64\r\n",
        b"Connection: Upgrade\r\nUpgrade: websocket\r\n",
        b"Connection: Upgrade\r\nUpgrade: h2c\r\n",
    ],
    ids=["bad-settings", "websocket", "no-settings"],
)
def test_other_upgrades_are_declined_and_the_connection_stays_http11(
    app: App, upgrade_headers: bytes
) -> None:
    request = (
        b"GET /u1 HTTP/1.1\r\nHost: x\r\n" + upgrade_headers + b"\r\n"
        b"GET /u2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    responses = _parse_responses(_exchange(app.port, request))
    assert [status for status, _ in responses] == [200, 200]
    assert [json.loads(body)["path"] for _, body in responses] == ["/u1", "/u2"]


def test_h2_protocol_error_gets_goaway_and_the_server_keeps_serving(app: App) -> None:
    # A DATA frame on stream 0 is a connection error (RFC 9113 §6.1).
    bad_frame = b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x"
    raw = _exchange(app.port, H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + bad_frame)
    frames = _frame_types(raw)
    assert 0x7 in frames, f"no GOAWAY in {frames}"
    assert _curl("--http2-prior-knowledge", f"{app.base}/after")[0] == 200


def _frame_types(raw: bytes) -> list[int]:
    types, offset = [], 0
    while offset + 9 <= len(raw):
        length = int.from_bytes(raw[offset : offset + 3], "big")
        types.append(raw[offset + 3])
        offset += 9 + length
    return types


async def _h2_client(
    port: int, window: int, requests: list[tuple[str, bytes]]
) -> dict[str, tuple[int, bytes]]:
    """Concurrent streams on one connection, with a tiny receive window to force the server to wait."""
    reader, writer = await asyncio.open_connection(HOST, port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
    paths: dict[int, str] = {}
    for path, body in requests:
        stream_id = conn.get_next_available_stream_id()
        paths[stream_id] = path
        conn.send_headers(
            stream_id,
            [
                (":method", "POST" if body else "GET"),
                (":path", path),
                (":scheme", "http"),
                (":authority", f"{HOST}:{port}"),
            ],
            end_stream=not body,
        )
        for offset in range(0, len(body), 16384):
            conn.send_data(stream_id, body[offset : offset + 16384], end_stream=offset + 16384 >= len(body))
    writer.write(conn.data_to_send())
    results: dict[str, tuple[int, bytes]] = {}
    statuses: dict[int, int] = {}
    bodies: dict[int, bytes] = {}
    while len(results) < len(requests):
        data = await asyncio.wait_for(reader.read(65536), timeout=10)
        assert data, "server closed early"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id:
                headers = {bytes(k): bytes(v) for k, v in event.headers or []}
                statuses[event.stream_id] = int(headers[b":status"])
            elif isinstance(event, h2.events.DataReceived) and event.stream_id:
                bodies[event.stream_id] = bodies.get(event.stream_id, b"") + (event.data or b"")
                conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id:
                results[paths[event.stream_id]] = (
                    statuses[event.stream_id],
                    bodies.get(event.stream_id, b""),
                )
        writer.write(conn.data_to_send())
    writer.close()
    return results


def test_h2_concurrent_streams_and_flow_control_in_process() -> None:
    async def scenario() -> dict[str, tuple[int, bytes]]:
        app = await start_demo_app(HOST, 0, "inproc")
        try:
            return await _h2_client(
                app.port, 64, [("/s1", b""), ("/s2", b"x" * 60_000), ("/status/202", b""), ("/healthz", b"")]
            )
        finally:
            await app.close()

    results = asyncio.run(scenario())
    assert results["/s1"][0] == 200 and json.loads(results["/s1"][1])["name"] == "inproc"
    assert json.loads(results["/s2"][1])["body_bytes"] == 60_000
    assert results["/status/202"][0] == 202
    assert results["/healthz"] == (200, b"ok\n")


def test_close_sends_goaway_to_http2_peers_and_closes_http11_in_process() -> None:
    async def scenario() -> tuple[bytes, list[h2.events.Event]]:
        app = await start_demo_app(HOST, 0, "inproc")
        r1, w1 = await asyncio.open_connection(HOST, app.port)
        r2, w2 = await asyncio.open_connection(HOST, app.port)
        w1.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await r1.readuntil(b"}\n")
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        w2.write(client.data_to_send())
        events = client.receive_data(await asyncio.wait_for(r2.read(65536), timeout=5))  # server SETTINGS
        await app.close()
        rest1 = await asyncio.wait_for(r1.read(), timeout=5)
        events += client.receive_data(await asyncio.wait_for(r2.read(), timeout=5))
        w1.close()
        w2.close()
        return rest1, events

    rest1, events = asyncio.run(scenario())
    assert rest1 == b""
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in events)


# -- robustness -------------------------------------------------------------------------------------


_VALID = b"GET /fuzz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.tuples(st.integers(0, len(_VALID)), st.binary(min_size=1, max_size=20)).map(
            lambda cut: _VALID[: cut[0]] + cut[1] + _VALID[cut[0] :]
        ),
        st.binary(max_size=200).map(lambda tail: H2_PREFACE + tail),
    )
)
def test_arbitrary_bytes_never_crash_the_server(app: App, data: bytes) -> None:
    raw = _exchange(app.port, data)
    if raw and not data.startswith(H2_PREFACE):
        assert re.match(rb"HTTP/1\.1 [1-5]\d\d ", raw), raw[:80]
    assert app.proc.poll() is None


def test_after_fuzzing_the_server_still_answers(app: App) -> None:
    assert _curl(f"{app.base}/healthz")[:2] == (200, "ok\n")


# -- the command ------------------------------------------------------------------------------------


def test_sigterm_stops_the_command_cleanly(tmp_path: Path) -> None:
    running = _launch(tmp_path, "--port", "0", "--host", HOST, "--quiet")
    idle = socket.create_connection((HOST, running.port), timeout=10)
    idle.sendall(b"GET /q HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while not answer.endswith(b"}\n"):
        answer += idle.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 OK")
    started = time.monotonic()
    assert _stop(running) == 0
    assert time.monotonic() - started < 5
    assert idle.recv(10) == b"", "open keep-alive connections are closed"
    idle.close()
    assert running.stdout.read_text() == "", "--quiet prints no request lines"


def test_port_in_use_is_a_one_line_error_with_status_2(app: App) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "zerotunnel", "demo-app", "--port", str(app.port), "--host", HOST],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot listen on 127.0.0.1:")
