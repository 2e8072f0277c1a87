"""The demo app: an HTTP/1.1 + HTTP/2 echo server that shows what the mesh delivered (issue 5, "A demo app").

Every answer is JSON describing the request as it arrived — method, path, query, every header, the peer
and local addresses, the HTTP version, the body size — so a user (or a test) behind the mesh can see the
`forwarded`/`x-forwarded-client-cert` headers a gateway or waypoint added and the source address inbound
capture preserved. `/healthz` answers `ok`; `/status/<code>` answers with that status.

It is also the server of the benchmarks, hence asyncio Protocols over h11/h2 state machines rather than
streams (DESIGN.md §5, "Hot paths"). A connection is HTTP/2 when it opens with the prior-knowledge preface
(RFC 9113 §3.3), HTTP/1.1 otherwise; a well-formed `Upgrade: h2c` request switches it to HTTP/2 (RFC 7540
§3.2), any other upgrade is declined by answering over HTTP/1.1 (RFC 9110 §7.8). A request the parsers
reject gets 400 (or 431 for oversized headers) on HTTP/1.1, GOAWAY on HTTP/2; that connection closes and
the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, TextIO, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h11

from zerotunnel.errors import ZerotunnelError

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_STATUS_PREFIX = "/status/"
_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"
_SERVER = b"zerotunnel-demo-app"
# Statuses whose responses carry no body (RFC 9110 §6.4.1, §15.3.5, §15.4.5).
_NO_BODY_STATUSES = frozenset({204, 304})
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


class DemoAppError(ZerotunnelError):
    """Raised only by `start_demo_app` when the listening socket cannot be opened."""


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """One request as it reached the app, independent of the HTTP version it came over."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    http_version: str
    body_bytes: int


@dataclass(frozen=True, slots=True)
class Reply:
    """The response decided for a request: the shells only encode it for their protocol."""

    status: int
    content_type: bytes
    body: bytes


def split_target(target: str) -> tuple[str, str]:
    """`/a/b?x=1` → (`/a/b`, `x=1`); the query is kept raw, exactly as the client (or the mesh) sent it."""
    path, _, query = target.partition("?")
    return path, query


def headers_json(headers: Iterable[tuple[str, str]]) -> dict[str, str | list[str]]:
    """Lower-cased names; a name seen more than once maps to the list of its values, in arrival order."""
    out: dict[str, str | list[str]] = {}
    for raw_name, value in headers:
        name = raw_name.lower()
        seen = out.get(name)
        if seen is None:
            out[name] = value
        elif isinstance(seen, list):
            seen.append(value)
        else:
            out[name] = [seen, value]
    return out


def decide(app_name: str, request: RequestInfo, peer: str, local: str) -> Reply:
    """The app's whole behaviour: health check, forced status, or the JSON echo."""
    path, query = split_target(request.target)
    if request.method == "CONNECT":
        # A 2xx to CONNECT would turn the connection into a tunnel; this app only echoes.
        return Reply(405, _TEXT, b"CONNECT is not supported by the demo app\n")
    if path == "/healthz":
        return Reply(200, _TEXT, b"ok\n")
    status = 200
    if path.startswith(_STATUS_PREFIX):
        code = path[len(_STATUS_PREFIX) :]
        if not (code.isascii() and code.isdigit() and len(code) == 3 and 200 <= int(code) <= 599):
            return Reply(400, _TEXT, b"/status/<code> needs a code between 200 and 599\n")
        status = int(code)
    document: dict[str, Any] = {
        "name": app_name,
        "method": request.method,
        "path": path,
        "query": query,
        "headers": headers_json(request.headers),
        "peer": peer,
        "local": local,
        "http_version": request.http_version,
        "body_bytes": request.body_bytes,
    }
    # Compact: the C encoder only serves `indent=None`, and this is a benchmark server (pipe it to `jq`).
    return Reply(status, _JSON, json.dumps(document).encode() + b"\n")


def format_address(address: Any) -> str:
    """`ip:port`, with IPv6 addresses bracketed so the port stays unambiguous; `?` when unknown."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "?" if not address else str(address)


def _header_tokens(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> set[str]:
    """The comma-separated, case-insensitive tokens of every `name` header (RFC 9110 §5.6.1)."""
    return {
        token.strip().lower()
        for key, value in headers
        if key == name
        for token in _text(bytes(value)).split(",")
        if token.strip()
    }


def _reason(status: int) -> bytes:
    return _REASONS.get(status, b"")


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


class DemoAppProtocol(asyncio.Protocol):
    """One client connection: sniffs the HTTP version from the first bytes, then drives h11 or h2."""

    def __init__(self, app_name: str, log: Callable[[str], None], registry: set[DemoAppProtocol]) -> None:
        self._app_name = app_name
        self._log = log
        self._registry = registry
        self._transport: asyncio.Transport | None = None
        self._peer = "?"
        self._local = "?"
        self._sniffed = b""
        self._h1: h11.Connection | None = None
        self._h1_request: h11.Request | None = None
        self._h1_body = 0
        self._h1_out: list[bytes] = []
        self._h2: h2.connection.H2Connection | None = None
        self._h2_streams: dict[int, _H2Stream] = {}
        self._h2_pending: dict[int, bytes] = {}
        self._closed = False

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._peer = format_address(transport.get_extra_info("peername"))
        self._local = format_address(transport.get_extra_info("sockname"))
        self._registry.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._registry.discard(self)

    def pause_writing(self) -> None:
        """A slow reader: stop reading its requests until it has taken our answers (no unbounded buffer)."""
        if self._transport is not None and not self._closed:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        try:
            if self._h1 is not None:
                self._h1_feed(data)
            elif self._h2 is not None:
                self._h2_feed(data)
            else:
                self._sniff(data)
        except Exception as exc:  # one broken connection must never take the server down
            self._abort(f"internal error: {type(exc).__name__}: {exc}")

    def eof_received(self) -> bool | None:
        with contextlib.suppress(Exception):
            if self._h1 is not None:
                self._h1_feed(b"")
            elif self._h2 is None and self._sniffed:
                self._start_h1(self._sniffed)
                self._h1_feed(b"")
        return False

    def close(self) -> None:
        """Graceful shutdown (SIGTERM): HTTP/2 peers get a GOAWAY, then every connection closes."""
        if self._closed or self._transport is None:
            return
        if self._h2 is not None:
            with contextlib.suppress(Exception):
                self._h2.close_connection()
                self._transport.write(self._h2.data_to_send())
        self._closed = True
        self._transport.close()

    # -- protocol selection -----------------------------------------------------------------------

    def _sniff(self, data: bytes) -> None:
        self._sniffed += data
        head = self._sniffed[: len(H2_PREFACE)]
        if not H2_PREFACE.startswith(head):
            buffered, self._sniffed = self._sniffed, b""
            self._start_h1(buffered)
        elif len(self._sniffed) >= len(H2_PREFACE):
            buffered, self._sniffed = self._sniffed, b""
            self._start_h2(buffered)

    def _abort(self, reason: str) -> None:
        print(f"demo-app: {self._peer}: {reason}", file=sys.stderr, flush=True)
        self._closed = True
        if self._transport is not None:
            self._transport.abort()

    # -- HTTP/1.1 ---------------------------------------------------------------------------------

    def _start_h1(self, data: bytes) -> None:
        self._h1 = h11.Connection(h11.SERVER)
        self._h1_feed(data)

    def _h1_feed(self, data: bytes) -> None:
        conn = self._h1
        assert conn is not None
        try:
            conn.receive_data(data)
        except h11.RemoteProtocolError as exc:
            self._h1_reject(exc)
            return
        self._h1_process(conn)
        self._h1_flush()

    def _h1_process(self, conn: h11.Connection) -> None:
        while not self._closed:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._h1_reject(exc)
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                # A client that asked to switch protocols (`Upgrade: h2c`) is paused until we answer;
                # once the answer is out, the next pipelined request may follow.
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                    continue
                return
            if isinstance(event, h11.Request):
                self._h1_request = event
                self._h1_body = 0
                if conn.they_are_waiting_for_100_continue:
                    self._h1_send(conn, h11.InformationalResponse(status_code=100, headers=[]))
            elif isinstance(event, h11.Data):
                self._h1_body += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                if self._h1_upgrade_to_h2(conn):
                    return
                self._h1_respond(conn)
                if conn.our_state is h11.MUST_CLOSE:
                    self._close_transport()
                    return
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                self._close_transport()
                return

    def _h1_respond(self, conn: h11.Connection) -> None:
        request = self._h1_request
        assert request is not None
        info = self._h1_info(request)
        reply = decide(self._app_name, info, self._peer, self._local)
        body = b"" if reply.status in _NO_BODY_STATUSES else reply.body
        headers = [(b"content-type", reply.content_type), (b"server", _SERVER)]
        if reply.status not in _NO_BODY_STATUSES:
            headers.append((b"content-length", str(len(body)).encode()))
        response = h11.Response(status_code=reply.status, headers=headers, reason=_reason(reply.status))
        self._h1_send(conn, response)
        if body and info.method != "HEAD":
            self._h1_send(conn, h11.Data(data=body))
        self._h1_send(conn, h11.EndOfMessage())
        self._log_request(info.method, info.target, reply.status)

    def _h1_info(self, request: h11.Request) -> RequestInfo:
        return RequestInfo(
            method=_text(request.method),
            target=_text(request.target),
            headers=tuple((_text(name), _text(value)) for name, value in request.headers),
            http_version=_text(request.http_version),
            body_bytes=self._h1_body,
        )

    def _h1_upgrade_to_h2(self, conn: h11.Connection) -> bool:
        """RFC 7540 §3.2 `Upgrade: h2c`: answer 101, then the request's response on HTTP/2 stream 1.

        Returns False (and the request is answered over HTTP/1.1, declining the upgrade) unless the request
        is a well-formed h2c upgrade: `Upgrade: h2c`, `Connection: Upgrade, HTTP2-Settings` and exactly one
        valid `HTTP2-Settings`. The echo reports the request as it arrived: HTTP/1.1.
        """
        request = self._h1_request
        if request is None or conn.their_state is h11.DONE:  # DONE: the request proposed no upgrade
            return False
        upgrade = _header_tokens(request.headers, b"upgrade")
        connection = _header_tokens(request.headers, b"connection")
        settings = [value for name, value in request.headers if name == b"http2-settings"]
        if "h2c" not in upgrade or not {"upgrade", "http2-settings"} <= connection or len(settings) != 1:
            return False
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        h2conn = h2.connection.H2Connection(config=config)
        try:
            h2conn.initiate_upgrade_connection(settings_header=bytes(settings[0]))
        except Exception:  # bad base64 or settings: decline instead of switching to a broken connection
            return False
        info = self._h1_info(request)
        switch = h11.InformationalResponse(
            status_code=101, headers=[(b"connection", b"Upgrade"), (b"upgrade", b"h2c")], reason=_reason(101)
        )
        try:
            self._h1_send(conn, switch)
        except h11.LocalProtocolError:  # h11 saw no switch proposal: answer over HTTP/1.1
            return False
        self._h1_flush()
        trailing, _ = conn.trailing_data
        self._h1 = None
        self._h2 = h2conn
        self._h2_answer(h2conn, 1, info)
        self._h2_feed(bytes(trailing))
        return True

    def _h1_reject(self, exc: h11.RemoteProtocolError) -> None:
        """RFC 9112 §2.2: a message that cannot be parsed gets 400 (431 for huge headers) and the close."""
        conn = self._h1
        assert conn is not None
        status = exc.error_status_hint if 400 <= exc.error_status_hint <= 499 else 400
        self._h1_flush()  # answers to earlier pipelined requests go first
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and self._transport is not None:
            # Written by hand: h11 refuses to frame a response once the peer's side is in ERROR.
            body = f"bad request: {exc}\n".encode()
            reason = _reason(status)
            self._transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n"
                b"server: %s\r\n\r\n%s" % (status, reason, _TEXT, len(body), _SERVER, body)
            )
        self._log_request("-", "-", status)
        self._close_transport()

    def _h1_send(self, conn: h11.Connection, event: h11.Event) -> None:
        """Queues the bytes: one write (one syscall) per batch of received data, however many answers."""
        data = conn.send(event)
        if data:
            self._h1_out.append(data)

    def _h1_flush(self) -> None:
        if self._h1_out and self._transport is not None and not self._closed:
            self._transport.write(b"".join(self._h1_out))
        self._h1_out.clear()

    def _close_transport(self) -> None:
        self._h1_flush()
        self._closed = True
        if self._transport is not None:
            self._transport.close()

    # -- HTTP/2 -----------------------------------------------------------------------------------

    def _start_h2(self, data: bytes) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config=config)
        self._h2.initiate_connection()
        self._h2_feed(data)

    def _h2_feed(self, data: bytes) -> None:
        conn = self._h2
        assert conn is not None
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued the GOAWAY with the right error code; send it, then hang up.
            self._h2_flush(conn)
            self._log_request("-", "-", 400)
            print(f"demo-app: {self._peer}: HTTP/2 protocol error: {exc}", file=sys.stderr, flush=True)
            self._close_transport()
            return
        for event in events:
            self._h2_event(conn, event)
        self._h2_flush(conn)

    def _h2_event(self, conn: h2.connection.H2Connection, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived) and event.stream_id is not None:
            self._h2_streams[event.stream_id] = _H2Stream(headers=list(event.headers or ()))
        elif isinstance(event, h2.events.DataReceived) and event.stream_id is not None:
            stream = self._h2_streams.get(event.stream_id)
            if stream is not None:
                stream.body_bytes += len(event.data or b"")
            # Give the window back at once: the body is counted, not kept, so a large upload never stalls.
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and event.stream_id is not None:
            self._h2_respond(conn, event.stream_id)
        elif isinstance(event, h2.events.StreamReset) and event.stream_id is not None:
            self._h2_streams.pop(event.stream_id, None)
            self._h2_pending.pop(event.stream_id, None)
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            for stream_id in list(self._h2_pending):
                self._h2_send_body(conn, stream_id, self._h2_pending.pop(stream_id))
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._h2_flush(conn)
            self._close_transport()

    def _h2_respond(self, conn: h2.connection.H2Connection, stream_id: int) -> None:
        stream = self._h2_streams.pop(stream_id, None)
        if stream is None:
            return
        pseudo = {bytes(name): bytes(value) for name, value in stream.headers if bytes(name).startswith(b":")}
        info = RequestInfo(
            method=_text(pseudo.get(b":method", b"")),
            target=_text(pseudo.get(b":path", b"")),
            headers=tuple((_text(bytes(name)), _text(bytes(value))) for name, value in stream.headers),
            http_version="2",
            body_bytes=stream.body_bytes,
        )
        self._h2_answer(conn, stream_id, info)

    def _h2_answer(self, conn: h2.connection.H2Connection, stream_id: int, info: RequestInfo) -> None:
        reply = decide(self._app_name, info, self._peer, self._local)
        body = b"" if reply.status in _NO_BODY_STATUSES or info.method == "HEAD" else reply.body
        headers = [
            (b":status", str(reply.status).encode()),
            (b"content-type", reply.content_type),
            (b"server", _SERVER),
        ]
        if reply.status not in _NO_BODY_STATUSES:
            headers.append((b"content-length", str(len(reply.body)).encode()))
        try:
            conn.send_headers(stream_id, headers, end_stream=not body)
            if body:
                self._h2_send_body(conn, stream_id, body)
        except h2.exceptions.StreamClosedError:
            return
        self._log_request(info.method, info.target, reply.status)

    def _h2_send_body(self, conn: h2.connection.H2Connection, stream_id: int, data: bytes) -> None:
        """Sends what the peer's flow-control window allows; the rest waits for a WINDOW_UPDATE."""
        try:
            while data:
                size = min(len(data), conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
                if size <= 0:
                    self._h2_pending[stream_id] = data
                    return
                conn.send_data(stream_id, data[:size], end_stream=size == len(data))
                data = data[size:]
        except h2.exceptions.StreamClosedError:
            self._h2_pending.pop(stream_id, None)

    def _h2_flush(self, conn: h2.connection.H2Connection) -> None:
        data = conn.data_to_send()
        if data and self._transport is not None and not self._closed:
            self._transport.write(data)

    # -- access log -------------------------------------------------------------------------------

    def _log_request(self, method: str, target: str, status: int) -> None:
        self._log(f"{method} {target} {status} {self._peer}")


@dataclass(slots=True)
class _H2Stream:
    headers: list[tuple[bytes, bytes]]
    body_bytes: int = 0


def stdout_logger(out: TextIO) -> Callable[[str], None]:
    """One line per request, flushed at once so a pod's log (or a test) sees it while the app runs."""

    def log(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    return log


class DemoAppServer:
    """A listening demo app and its open connections (asyncio.Server forgets those on close in 3.11)."""

    def __init__(self, server: asyncio.Server, connections: set[DemoAppProtocol]) -> None:
        self.server = server
        self._connections = connections

    @property
    def addresses(self) -> list[str]:
        return [format_address(sock.getsockname()) for sock in self.server.sockets]

    @property
    def port(self) -> int:
        """The port actually bound (useful after asking for port 0)."""
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self, timeout: float = 2.0) -> None:
        """Stops listening, sends HTTP/2 peers a GOAWAY, closes every connection."""
        self.server.close()
        for connection in list(self._connections):
            connection.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), timeout=timeout)


async def start_demo_app(
    host: str, port: int, name: str, *, log: Callable[[str], None] | None = None
) -> DemoAppServer:
    """Listens on host:port (port 0 picks a free one: see `DemoAppServer.port`).

    `log` receives each request line; None discards them (benchmarks, in-process tests).
    """
    loop = asyncio.get_running_loop()
    sink = log if log is not None else _discard
    connections: set[DemoAppProtocol] = set()
    try:
        server = await loop.create_server(
            lambda: DemoAppProtocol(name, sink, connections), host, port, reuse_address=True, backlog=1024
        )
    except OSError as exc:
        raise DemoAppError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return DemoAppServer(server, connections)


def _discard(_line: str) -> None:
    return None


async def run_demo_app(
    host: str,
    port: int,
    name: str,
    *,
    log: Callable[[str], None] | None,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serves until SIGTERM or SIGINT, then stops listening, closes every connection and returns."""
    app = await start_demo_app(host, port, name, log=log)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if announce is not None:
        announce(f"demo-app {name} listening on {', '.join(app.addresses)}")
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await app.close()
