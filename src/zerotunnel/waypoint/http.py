"""HTTP plumbing shared by the waypoint and the ingress gateway: byte channels, header hygiene, the
upstream HTTP/1.1 exchange over an HBONE stream.

security.md §1b: every header a client sends is attacker input. Before a request is forwarded, the
hop-by-hop headers (RFC 9110 §7.6.1) and every header that could claim an identity or steer a trusted
proxy (`x-forwarded-client-cert`, `x-envoy-*`, `x-istio-*`, `x-zerotunnel-*`) are removed, and the
proxy sets its own (`x-forwarded-proto`, `x-forwarded-for`, `x-request-id`, and at the gateway a fresh
XFCC) — sanitize, then set. Header sizes and bodies are bounded (security.md §1d, §3: 64 KiB of
headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import h11

from zerotunnel.errors import ZerotunnelError
from zerotunnel.node.hbone_conn import HboneStream

MAX_HEADER_BYTES = 64 * 1024
"""security.md §3: header list 64 KiB (ztunnel, Envoy's edge guide)."""
MAX_BODY_BYTES = 16 * 1024 * 1024
UPSTREAM_TIMEOUT = 30.0

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "http2-settings",
        "host",
        "content-length",
    }
)
"""RFC 9110 §7.6.1 hop-by-hop headers, plus the framing headers the proxy recomputes itself."""
IDENTITY_HEADERS = frozenset({"x-forwarded-client-cert", "x-spiffe-id", "x-client-cert", "ssl-client-cert"})
INTERNAL_PREFIXES = ("x-envoy-", "x-istio-", "x-zerotunnel-")
PROXY_SET = frozenset({"x-forwarded-proto", "x-forwarded-for", "x-request-id"})
"""Headers the proxy writes itself (`forwarding_headers`); the client's copies are dropped first."""

Headers = list[tuple[str, str]]


class HttpError(ZerotunnelError):
    """A request answered by the proxy itself; `status` and `message` become the response."""


@dataclass(slots=True)
class HttpRequest:
    """One request as a proxy received it: names lower-case, duplicates kept in order."""

    method: str
    target: str
    headers: Headers
    body: bytes = b""
    http_version: str = "1.1"
    scheme: str = "http"

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        return ",".join(values) if values else None

    @property
    def host(self) -> str:
        return self.header("host") or ""


@dataclass(slots=True)
class HttpResponse:
    status: int
    headers: Headers = field(default_factory=list)
    body: bytes = b""


def text_response(status: int, text: str, extra: Headers | None = None) -> HttpResponse:
    body = text.encode()
    return HttpResponse(status, [("content-type", "text/plain"), *(extra or [])], body)


# -- header hygiene ---------------------------------------------------------------------------------


def connection_tokens(headers: Iterable[tuple[str, str]]) -> set[str]:
    """Headers named in `Connection` are hop-by-hop too (RFC 9110 §7.6.1)."""
    out: set[str] = set()
    for name, value in headers:
        if name == "connection":
            out.update(t.strip().lower() for t in value.split(",") if t.strip())
    return out


def is_untrusted(name: str) -> bool:
    return name in IDENTITY_HEADERS or name.startswith(INTERNAL_PREFIXES)


def sanitize_request_headers(headers: Sequence[tuple[str, str]]) -> Headers:
    """Drop hop-by-hop, identity and internal headers (security.md §1b: strip, then set)."""
    named = connection_tokens(headers)
    return [
        (k, v)
        for k, v in headers
        if k not in HOP_BY_HOP
        and k not in named
        and not is_untrusted(k)
        and k not in PROXY_SET
        and not k.startswith(":")
    ]


def forwarding_headers(request: HttpRequest, peer_ip: str | None, *, proto: str) -> Headers:
    """What the proxy adds on top of the sanitized headers: Envoy's `x-forwarded-proto`, an appended
    `x-forwarded-for`, and an `x-request-id` (kept when the client sent one)."""
    out: Headers = [("x-forwarded-proto", proto)]
    xff = request.header("x-forwarded-for")
    if peer_ip:
        out.append(("x-forwarded-for", f"{xff}, {peer_ip}" if xff else peer_ip))
    elif xff:
        out.append(("x-forwarded-for", xff))
    out.append(("x-request-id", request.header("x-request-id") or str(uuid.uuid4())))
    return out


def sanitize_response_headers(headers: Sequence[tuple[str, str]]) -> Headers:
    named = connection_tokens(headers)
    return [(k, v) for k, v in headers if k not in HOP_BY_HOP and k not in named]


# -- byte channels ----------------------------------------------------------------------------------


class ByteChannel(Protocol):
    """A bidirectional byte stream: an HBONE stream, or a plain TCP connection."""

    async def recv(self) -> bytes: ...
    async def send(self, data: bytes) -> None: ...
    def send_eof(self) -> None: ...
    def abort(self, reason: str) -> None: ...


class StreamChannel:
    """An HBONE stream as an awaitable byte channel. Flow control stays end to end: received bytes
    are acknowledged to h2 only when `recv` hands them over, and `send` waits while the stream's send
    buffer is full (security.md §1d)."""

    def __init__(self, stream: HboneStream) -> None:
        self.stream = stream
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._eof = False
        self._reset: str | None = None
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.bytes_in = 0
        self.bytes_out = 0
        stream.attach(self)

    # StreamSink
    def stream_data(self, data: bytes, length: int) -> None:
        self._chunks.append((data, length))
        self._readable.set()

    def stream_eof(self) -> None:
        self._eof = True
        self._readable.set()

    def stream_reset(self, reason: str) -> None:
        self._reset = reason
        self._readable.set()
        self._writable.set()

    def stream_writable(self) -> None:
        self._writable.set()

    # ByteChannel
    async def recv(self) -> bytes:
        while not self._chunks:
            if self._reset is not None:
                raise ConnectionResetError(self._reset)
            if self._eof:
                return b""
            self._readable.clear()
            await self._readable.wait()
        data, length = self._chunks.popleft()
        self.stream.consumed(length)
        self.bytes_in += len(data)
        return data

    async def send(self, data: bytes) -> None:
        if self._reset is not None:
            raise ConnectionResetError(self._reset)
        self.bytes_out += len(data)
        if not self.stream.write(data):
            self._writable.clear()
            if self._reset is None and not self.stream.can_write():
                await self._writable.wait()
        if self._reset is not None:
            raise ConnectionResetError(self._reset)

    def send_eof(self) -> None:
        self.stream.write_eof()

    def abort(self, reason: str) -> None:
        self.stream.abort(reason)


class TcpChannel:
    """A plain TCP connection (an endpoint outside the mesh) as a byte channel."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int, timeout: float = 10.0) -> TcpChannel:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        return cls(reader, writer)

    async def recv(self) -> bytes:
        return await self.reader.read(256 * 1024)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def send_eof(self) -> None:
        """Half-close where the transport can (plain TCP); TLS cannot half-close, so it closes."""
        with contextlib.suppress(OSError, RuntimeError):
            if self.writer.can_write_eof():
                self.writer.write_eof()
            else:
                self.writer.close()

    def abort(self, reason: str) -> None:
        self.writer.transport.abort()


# -- the upstream exchange --------------------------------------------------------------------------


def _b(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


def _s(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in headers]


class StaleConnection(ConnectionResetError):
    """A reused upstream connection was closed before any byte of the response: safe to retry once on
    a fresh one (the request cannot have been processed, RFC 9112 §9.3.1)."""


class UpstreamHttp:
    """An HTTP/1.1 client connection over one byte channel, reusable for sequential requests."""

    def __init__(self, channel: ByteChannel) -> None:
        self.channel = channel
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.uses = 0

    def recycle(self) -> bool:
        """Ready for the next request (both sides finished cleanly, no `Connection: close`)."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return True
        return False

    @property
    def closed(self) -> bool:
        stream = getattr(self.channel, "stream", None)
        return bool(stream is not None and stream.done)


async def exchange(
    channel: ByteChannel | UpstreamHttp,
    method: str,
    target: str,
    host: str,
    headers: Headers,
    body: bytes,
    *,
    timeout: float = UPSTREAM_TIMEOUT,
) -> HttpResponse:
    """Send one HTTP/1.1 request and read the whole response (bounded). A bare channel is used for
    one request; an `UpstreamHttp` may be reused (keep-alive, never pipelined upstream)."""
    upstream = channel if isinstance(channel, UpstreamHttp) else UpstreamHttp(channel)
    return await asyncio.wait_for(_exchange(upstream, method, target, host, headers, body), timeout)


async def _exchange(
    upstream: UpstreamHttp, method: str, target: str, host: str, headers: Headers, body: bytes
) -> HttpResponse:
    conn, channel = upstream.conn, upstream.channel
    reused = upstream.uses > 0
    upstream.uses += 1
    out = [("host", host), *headers]
    if body or method in ("POST", "PUT", "PATCH"):
        out.append(("content-length", str(len(body))))
    wire = conn.send(h11.Request(method=method, target=target, headers=_b(out)))
    if body:
        wire += conn.send(h11.Data(data=body))
    wire += conn.send(h11.EndOfMessage())
    received = False
    try:
        await channel.send(wire)
    except ConnectionResetError as exc:
        if reused:
            raise StaleConnection(str(exc)) from None
        raise
    response: HttpResponse | None = None
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            if reused and not received:
                raise StaleConnection("reused upstream connection closed") from None
            raise
        if event is h11.NEED_DATA:
            try:
                data = await channel.recv()
            except ConnectionResetError as exc:
                if reused and not received:
                    raise StaleConnection(str(exc)) from None
                raise
            received = received or bool(data)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            response = HttpResponse(event.status_code, _s(event.headers))
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_BODY_BYTES:
                raise HttpError("upstream response body too large", status=502)
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            response.body = b"".join(chunks)
            return response
        elif isinstance(event, h11.ConnectionClosed):
            if reused and not received:
                raise StaleConnection("reused upstream connection closed")
            raise ConnectionResetError("upstream closed the connection before the response ended")
