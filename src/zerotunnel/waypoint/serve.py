"""The downstream side of an L7 proxy: HTTP/1.1 (h11) or HTTP/2 with prior knowledge (h2) over one
byte channel, each request handed to a handler and its response written back.

istio-ambient.md §6 and issue 7: keep-alive and pipelining (h11 holds the next request until the
current response is written), chunked bodies, `Expect: 100-continue`; an `Upgrade: h2c` request is
served as plain HTTP/1.1 (Envoy drops that upgrade too), any other upgrade and `CONNECT` are refused
with 501 and a clear reason. Bounds (security.md §1d, §3): 64 KiB of headers (431 on HTTP/1.1, stream
reset on HTTP/2), bodies up to 16 MiB (413), at most 100 concurrent HTTP/2 streams, a request head (or
the HTTP/2 preface) complete within HEADER_TIMEOUT of its first byte (408 and close: slowloris,
security.md §4 item 15), and a budget of SETTINGS/PING frames per HTTP/2 connection (GOAWAY
ENHANCE_YOUR_CALM; `h2` answers every PING and SETTINGS by itself, unbounded).

Slow clients (security.md §1d, §3 "idle/lifetime"; issue 9): on HTTP/2 a header block (HEADERS and
its CONTINUATIONs) — or any other incomplete frame but DATA — must also complete within
HEADER_TIMEOUT, else GOAWAY and close (no other frame may interleave a header block, so the whole
connection is held); a request body must keep coming (no gap over STREAM_IDLE_TIMEOUT) and at
MIN_BODY_RATE on average once BODY_RATE_GRACE has passed (Kestrel's MinRequestBodyDataRate, 240 B/s
after 5 s: a body at 1 B/s is not "idle" but never ends), else 408 and close (HTTP/1.1) or 408 and
RST_STREAM (HTTP/2); a response that cannot make progress (the client keeps a zero window, or does
not read) for STREAM_IDLE_TIMEOUT is reset (Envoy's `stream_idle_timeout`, CVE-2020-12604). With at
most 100 streams per connection (a 101st is a connection error), one connection's cost is bounded
in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h11

from zerotunnel.hbone.protocol import AbuseLimits, TokenBucket
from zerotunnel.waypoint.http import (
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    ByteChannel,
    HttpError,
    HttpRequest,
    HttpResponse,
    text_response,
)

log = logging.getLogger("zerotunnel.waypoint")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_CONCURRENT_STREAMS = 100
ABUSE_LIMITS = AbuseLimits()
"""The node proxy's 15008 budgets (rapid reset as nghttp2; SETTINGS/PING: a keepalive is one PING per
10 s), applied to HTTP/2 clients of the waypoint and the gateway too."""
CONTROL_BURST = ABUSE_LIMITS.control_burst
HEADER_TIMEOUT = 10.0
"""Envoy's `request_headers_timeout` (off by default; its edge guide sets it): the head of a request must
arrive within this many seconds of its first byte. Idle keep-alive between requests is not counted."""
STREAM_IDLE_TIMEOUT = 60.0
"""A request body with no byte, or a response that cannot be written, for this long is cut (Envoy's
`stream_idle_timeout`, 5 min by default; the mesh's clients are near)."""
MIN_BODY_RATE = 240.0
BODY_RATE_GRACE = 5.0
"""Kestrel's MinRequestBodyDataRate: after the grace period a body must average this many bytes/s."""
Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]
_NO_BODY = frozenset({204, 304})


def _s(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in headers]


def _upgrade_refusal(request: HttpRequest) -> HttpResponse | None:
    """None when the request may proceed (no upgrade, or h2c which is simply ignored)."""
    if request.method == "CONNECT":
        return text_response(501, "CONNECT is not supported by this proxy\n")
    upgrade = request.header("upgrade")
    if upgrade is None:
        return None
    protocols = [p.strip().lower() for p in upgrade.split(",") if p.strip()]
    if all(p == "h2c" for p in protocols):
        return None
    return text_response(501, f"upgrade not supported by this proxy: {upgrade}\n")


class _HeaderTimeout(Exception):
    pass


class _BodyTimeout(Exception):
    pass


def body_deadline(started: float, last: float, received: int) -> float:
    """When a request body that began at `started`, last progressed at `last` and has `received`
    bytes is too slow if nothing more comes: idle for STREAM_IDLE_TIMEOUT, or an average below
    MIN_BODY_RATE once BODY_RATE_GRACE has passed."""
    return min(last + STREAM_IDLE_TIMEOUT, started + max(BODY_RATE_GRACE, received / MIN_BODY_RATE))


async def _recv_by(channel: ByteChannel, deadline: float) -> bytes:
    remaining = deadline - asyncio.get_running_loop().time()
    if remaining <= 0:
        raise _HeaderTimeout
    try:
        return await asyncio.wait_for(channel.recv(), remaining)
    except TimeoutError:
        raise _HeaderTimeout from None


async def serve_http(channel: ByteChannel, handler: Handler, *, scheme: str = "http") -> None:
    """Serve every request on `channel` until the client closes; returns when done."""
    first = await channel.recv()
    if not first:
        return
    if H2_PREFACE.startswith(first[: len(H2_PREFACE)]):
        deadline = asyncio.get_running_loop().time() + HEADER_TIMEOUT
        while len(first) < len(H2_PREFACE) and H2_PREFACE.startswith(first):
            try:
                more = await _recv_by(channel, deadline)
            except _HeaderTimeout:
                log.info("HTTP/2 preface not complete within %.0f s; closing", HEADER_TIMEOUT)
                channel.abort("request header timeout")
                return
            if not more:
                return
            first += more
    if first.startswith(H2_PREFACE):
        await _H2Session(channel, handler, scheme).run(first)
    else:
        await _serve_h1(channel, handler, first, scheme)


_ABSOLUTE = re.compile(r"(?i)(https?)://([^/?#]*)(.*)", re.DOTALL)


def _to_origin_form(request: HttpRequest) -> None:
    """RFC 9112 §3.2.2: a server must accept the absolute-form target and then take the host from it,
    not from `Host` (Envoy's `allow_absolute_url`). Policy and backend must see one path (security.md
    §1a): `GET http://svc/admin` was matched as the path `http:/svc/admin` (no `/admin*` DENY hit)
    and forwarded as is, for a backend to read as `/admin` (tests/reliability/test_bypass_e2e.py).
    Any other target that is not origin-form (`OPTIONS *` aside) is a 400."""
    target = request.target
    if target.startswith("/") or (target == "*" and request.method == "OPTIONS"):
        return
    match = _ABSOLUTE.fullmatch(target)
    if match is None or not match.group(2) or "@" in match.group(2):
        raise HttpError(f"bad request: request target {target[:100]!r} is not origin-form", status=400)
    rest = match.group(3)
    request.target = rest if rest.startswith("/") else "/" + rest
    request.headers = [("host", match.group(2)), *((k, v) for k, v in request.headers if k != "host")]


# -- HTTP/1.1 -------------------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


async def _h1_next(conn: h11.Connection, channel: ByteChannel, scheme: str) -> HttpRequest | None:
    request: HttpRequest | None = None
    body: list[bytes] = []
    size = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HEADER_TIMEOUT if conn.trailing_data[0] else None
    body_started = body_last = 0.0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if request is not None and conn.they_are_waiting_for_100_continue:
                await channel.send(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
                body_started = body_last = loop.time()
            if request is None and deadline is not None:
                conn.receive_data(await _recv_by(channel, deadline))
            elif request is not None:
                try:
                    data = await _recv_by(channel, body_deadline(body_started, body_last, size))
                except _HeaderTimeout:
                    raise _BodyTimeout from None
                body_last = loop.time()
                conn.receive_data(data)
            else:
                data = await channel.recv()
                if request is None and data:
                    deadline = loop.time() + HEADER_TIMEOUT
                conn.receive_data(data)
            continue
        if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            return None
        if isinstance(event, h11.Request):
            request = HttpRequest(
                event.method.decode("ascii", "replace"),
                event.target.decode("latin-1"),
                _s(list(event.headers)),
                http_version=event.http_version.decode(),
                scheme=scheme,
            )
            if sum(len(k) + len(v) + 4 for k, v in request.headers) > MAX_HEADER_BYTES:
                raise HttpError("request header fields too large", status=431)
            if {"transfer-encoding", "content-length"} <= {k for k, _ in request.headers}:
                # RFC 9112 §6.1: the request-smuggling shape; Envoy (`allow_chunked_length: false`)
                # refuses it, and either way the connection must close after the answer.
                raise HttpError("bad request: both Content-Length and Transfer-Encoding", status=400)
            refusal = _upgrade_refusal(request)
            if refusal is not None:
                raise HttpError(refusal.body.decode().strip(), status=refusal.status)
            _to_origin_form(request)
            body_started = body_last = loop.time()
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_BODY_BYTES:
                raise _TooLarge
            body.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            request.body = b"".join(body)
            return request


def _h1_response_events(
    request: HttpRequest | None, response: HttpResponse, close: bool
) -> list[h11.Response | h11.Data | h11.EndOfMessage]:
    headers = list(response.headers)
    no_body = (request is not None and request.method == "HEAD") or response.status in _NO_BODY
    if not no_body:
        headers = [(k, v) for k, v in headers if k != "content-length"]
        headers.append(("content-length", str(len(response.body))))
    if close:
        headers.append(("connection", "close"))
    events: list[h11.Response | h11.Data | h11.EndOfMessage] = [
        h11.Response(
            status_code=response.status,
            headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        )
    ]
    if response.body and not no_body:
        events.append(h11.Data(data=response.body))
    events.append(h11.EndOfMessage())
    return events


async def _send_h1(
    conn: h11.Connection,
    channel: ByteChannel,
    request: HttpRequest | None,
    response: HttpResponse,
    *,
    close: bool = False,
) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    wire = b"".join(conn.send(ev) or b"" for ev in _h1_response_events(request, response, close))
    await channel.send(wire)


async def _serve_h1(channel: ByteChannel, handler: Handler, first: bytes, scheme: str) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    conn.receive_data(first)
    try:
        while True:
            try:
                request = await _h1_next(conn, channel, scheme)
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                text = "request header fields too large" if status == 431 else f"bad request: {exc}"
                await _send_h1(conn, channel, None, text_response(status, text + "\n"), close=True)
                return
            except HttpError as exc:
                await _send_h1(
                    conn, channel, None, text_response(exc.status or 400, exc.message + "\n"), close=True
                )
                return
            except _TooLarge:
                await _send_h1(conn, channel, None, text_response(413, "payload too large\n"), close=True)
                return
            except _HeaderTimeout:
                log.info("request head not complete within %.0f s; closing", HEADER_TIMEOUT)
                with contextlib.suppress(h11.LocalProtocolError):
                    timeout = text_response(408, "request header timeout\n")
                    await _send_h1(conn, channel, None, timeout, close=True)
                return
            except _BodyTimeout:
                log.info("request body too slow (idle %.0f s or under %.0f B/s); closing",
                         STREAM_IDLE_TIMEOUT, MIN_BODY_RATE)
                with contextlib.suppress(h11.LocalProtocolError):
                    timeout = text_response(408, "request body timeout\n")
                    await _send_h1(conn, channel, None, timeout, close=True)
                return
            if request is None:
                return
            response = await handler(request)
            try:
                await asyncio.wait_for(_send_h1(conn, channel, request, response), STREAM_IDLE_TIMEOUT)
            except TimeoutError:
                log.info("response not taken by the client within %.0f s; closing", STREAM_IDLE_TIMEOUT)
                channel.abort("response write timeout")
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state in (h11.MUST_CLOSE, h11.CLOSED):
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
    finally:
        channel.send_eof()


# -- HTTP/2 (prior knowledge) ---------------------------------------------------------------------


class _H2Session:
    """One HTTP/2 connection; every stream's request is handled concurrently (up to 100)."""

    def __init__(self, channel: ByteChannel, handler: Handler, scheme: str) -> None:
        self.channel = channel
        self.handler = handler
        self.scheme = scheme
        self.conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_BYTES,
            },
        )
        self.requests: dict[int, HttpRequest] = {}
        self.handling: dict[int, asyncio.Task[None]] = {}
        lim = ABUSE_LIMITS
        self.resets = TokenBucket(lim.reset_burst, lim.reset_rate, lim.reset_burst)
        self.control = TokenBucket(lim.control_burst, lim.control_rate, lim.control_burst)
        self.abusive = False
        self.sizes: dict[int, int] = {}
        self.bodies: dict[int, list[bytes]] = {}
        """Request body chunks, joined once at END_STREAM (`bytes +=` per DATA frame copied a 16 MiB
        body ~1,000 times)."""
        self.body_clock: dict[int, tuple[float, float]] = {}
        """stream → (body started, last body byte), loop time, for the streams still receiving."""
        self.frame_pending_since: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timed_out = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.window = asyncio.Event()
        self.lock = asyncio.Lock()
        self.loop = asyncio.get_running_loop()

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            async with self.lock:
                await self.channel.send(data)

    async def run(self, first: bytes) -> None:
        self.conn.initiate_connection()
        await self.flush()
        data = first
        try:
            while data:
                try:
                    events = self.conn.receive_data(data)
                except (h2.exceptions.ProtocolError, ValueError) as exc:
                    log.info("HTTP/2 protocol error from client: %s", exc)
                    with contextlib.suppress(h2.exceptions.ProtocolError):
                        self.conn.close_connection(error_code=h2.errors.ErrorCodes.PROTOCOL_ERROR)
                    await self.flush()
                    return
                for event in events:
                    self._event(event)
                await self.flush()
                if self.abusive:
                    return
                self._arm()
                data = await self.channel.recv()
        finally:
            if self.timer is not None:
                self.timer.cancel()
            for task in list(self.tasks):
                task.cancel()
            self.channel.send_eof()

    def _frame_pending(self) -> bool:
        """A header block, or a frame other than DATA, is partly received (h2 buffers both and says
        nothing until they complete: the HTTP/2 slowloris shape). h2 4.x has no public view of its
        frame buffer; its two fields are read here (tests/reliability/test_waypoint_abuse.py fails
        if they change)."""
        buffer = self.conn.incoming_buffer
        tail = buffer._data
        return bool(buffer._headers_buffer) or (
            bool(tail) and (len(tail) < 4 or tail[3] != 0)
        )

    def _arm(self) -> None:
        """One timer per connection, at the earliest deadline of what is incomplete."""
        now = self.loop.time()
        if self._frame_pending():
            if self.frame_pending_since is None:
                self.frame_pending_since = now
        else:
            self.frame_pending_since = None
        deadlines = [body_deadline(start, last, self.sizes.get(sid, 0))
                     for sid, (start, last) in self.body_clock.items()]
        if self.frame_pending_since is not None:
            deadlines.append(self.frame_pending_since + HEADER_TIMEOUT)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if deadlines:
            self.timer = self.loop.call_at(min(deadlines) + 0.001, self._expire)

    def _expire(self) -> None:
        self.timer = None
        now = self.loop.time()
        if self.frame_pending_since is not None and now >= self.frame_pending_since + HEADER_TIMEOUT:
            log.info("HTTP/2 header block or frame not complete within %.0f s; closing", HEADER_TIMEOUT)
            self.timed_out += 1
            self.abusive = True
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            self._spawn(self._close("request header timeout"))
            return
        for sid, (start, last) in list(self.body_clock.items()):
            if now >= body_deadline(start, last, self.sizes.get(sid, 0)):
                log.info("HTTP/2 request body too slow on stream %d; 408 and reset", sid)
                self.timed_out += 1
                self._forget(sid)
                self._spawn(self._respond(sid, None, text_response(408, "request body timeout\n"),
                                          reset=h2.errors.ErrorCodes.NO_ERROR))
        self._arm()

    async def _close(self, reason: str) -> None:
        """Send what is queued (the GOAWAY), then end the tunnel: the read loop is waiting on a
        client that is not going to finish."""
        with contextlib.suppress(ConnectionError, OSError):
            await self.flush()
        self.channel.abort(reason)

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            assert event.stream_id is not None and event.headers is not None
            headers = _s(list(event.headers))
            pseudo = {k: v for k, v in headers if k.startswith(":")}
            regular = [(k, v) for k, v in headers if not k.startswith(":")]
            if ":authority" in pseudo and not any(k == "host" for k, _ in regular):
                regular.insert(0, ("host", pseudo[":authority"]))
            self.requests[event.stream_id] = HttpRequest(
                pseudo.get(":method", ""),
                pseudo.get(":path", ""),
                regular,
                http_version="2",
                scheme=self.scheme,
            )
            self.sizes[event.stream_id] = 0
            self.bodies[event.stream_id] = []
            if event.stream_ended is None:
                now = self.loop.time()
                self.body_clock[event.stream_id] = (now, now)
        elif isinstance(event, h2.events.DataReceived):
            sid = event.stream_id
            assert sid is not None and event.data is not None
            request = self.requests.get(sid)
            self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
            if request is None:
                return
            self.sizes[sid] += len(event.data)
            if sid in self.body_clock:
                self.body_clock[sid] = (self.body_clock[sid][0], self.loop.time())
            if self.sizes[sid] > MAX_BODY_BYTES:
                self._forget(sid)
                self._spawn(self._respond(sid, None, text_response(413, "payload too large\n")))
                return
            self.bodies[sid].append(event.data)
        elif isinstance(event, h2.events.StreamEnded):
            assert event.stream_id is not None
            request = self.requests.get(event.stream_id)
            if request is not None:
                request.body = b"".join(self.bodies.get(event.stream_id, ()))
            self._forget(event.stream_id)
            if request is not None:
                self.handling[event.stream_id] = self._spawn(self._handle(event.stream_id, request))
        elif isinstance(event, h2.events.StreamReset):
            assert event.stream_id is not None
            self._forget(event.stream_id)
            task = self.handling.pop(event.stream_id, None)
            if task is not None:
                task.cancel()
            self._count_reset()
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.window.set()
            if isinstance(event, h2.events.RemoteSettingsChanged):
                self._count_control()
        elif isinstance(event, h2.events.PingReceived):
            self._count_control()

    def _forget(self, sid: int) -> None:
        """The stream receives no more request bytes (ended, reset, refused)."""
        self.requests.pop(sid, None)
        self.body_clock.pop(sid, None)
        self.sizes.pop(sid, None)
        self.bodies.pop(sid, None)

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def _count_reset(self) -> None:
        """security.md §1d (CVE-2023-44487 rapid reset): a token bucket of client resets per
        connection, nghttp2's budget; over it the connection gets GOAWAY ENHANCE_YOUR_CALM."""
        if not self.resets.take(time.monotonic()) and not self.abusive:
            self.abusive = True
            log.warning("HTTP/2 client exceeded the stream reset budget; closing the connection")
            self.conn.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)

    def _count_control(self) -> None:
        """security.md §1d (SETTINGS/PING floods, CVE-2019-9512/9515): each costs us an ACK."""
        if not self.control.take(time.monotonic()) and not self.abusive:
            self.abusive = True
            log.warning("HTTP/2 client exceeded the SETTINGS/PING budget; closing the connection")
            # `h2` has already queued an ACK for every frame of this read: they are not sent.
            self.conn.clear_outbound_data_buffer()
            self.conn.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)

    async def _handle(self, sid: int, request: HttpRequest) -> None:
        try:
            refusal = _upgrade_refusal(request)
            if refusal is None and not request.target.startswith("/") and request.target != "*":
                # RFC 9113 §8.3.1: `:path` is origin-form (or `*`); anything else is malformed.
                refusal = text_response(400, f"bad request: :path {request.target[:100]!r}\n")
            response = refusal if refusal is not None else await self.handler(request)
            await self._respond(sid, request, response)
        finally:
            self.handling.pop(sid, None)

    async def _respond(
        self,
        sid: int,
        request: HttpRequest | None,
        response: HttpResponse,
        *,
        reset: h2.errors.ErrorCodes | None = None,
    ) -> None:
        """Write the response; a body the client does not let us send (zero window) for
        STREAM_IDLE_TIMEOUT gets the stream reset. `reset`: reset the stream after the response
        (a response before the request ended, RFC 9113 §8.1: NO_ERROR asks the client to stop)."""
        headers = [(":status", str(response.status))]
        headers += [(k, v) for k, v in response.headers if k not in ("content-length",)]
        no_body = (request is not None and request.method == "HEAD") or response.status in _NO_BODY
        if not no_body:
            headers.append(("content-length", str(len(response.body))))
        body = b"" if no_body else response.body
        try:
            self.conn.send_headers(
                sid, [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers], end_stream=not body
            )
            await self.flush()
            view = memoryview(body)
            stall_deadline = self.loop.time() + STREAM_IDLE_TIMEOUT
            while view:
                window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
                if window <= 0:
                    self.window.clear()
                    remaining = stall_deadline - self.loop.time()
                    try:
                        if remaining <= 0:
                            raise TimeoutError
                        await asyncio.wait_for(self.window.wait(), remaining)
                    except TimeoutError:
                        log.info("HTTP/2 response on stream %d stalled %.0f s (flow control); reset",
                                 sid, STREAM_IDLE_TIMEOUT)
                        self.timed_out += 1
                        reset = h2.errors.ErrorCodes.CANCEL
                        break
                    continue
                chunk, view = view[:window], view[window:]
                self.conn.send_data(sid, bytes(chunk), end_stream=not view)
                stall_deadline = self.loop.time() + STREAM_IDLE_TIMEOUT
                await self.flush()
            if reset is not None:
                self.conn.reset_stream(sid, error_code=reset)
                await self.flush()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            return
