"""The asyncio shell around `zerotunnel.hbone`: TLS over memory BIOs, h2 events → streams.

DESIGN.md §5 / performance.md §4: a `Protocol` (callbacks, no streams API), 256 KiB reads,
TCP_NODELAY. TLS is driven through `ssl.SSLObject` + `MemoryBIO` here rather than asyncio's
`ssl=` transports because the proxy must see what those hide: a failed handshake (counted per
reason in the metrics, logged as `connection failed`), and the moment the handshake completes, so
the peer is re-verified with `cryptography` before one HBONE byte is read (spec/istio-ambient.md
§1.6-1.7, DESIGN.md §6). It also saves asyncio's extra SSL buffer copy.

Flow control end to end (security.md §1d): tunnelled bytes are acknowledged to h2 only when the
plaintext side accepted them (`HboneStream.consumed`), so a slow app closes the HTTP/2 window
instead of growing buffers; the other way, `HboneStream.write` returns False once the stream's
queue passes `max_send_buffer` or the TLS socket is paused, and the relay stops reading its TCP side.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Protocol, TypeVar, cast

from h2.errors import ErrorCodes

from zerotunnel.hbone.events import (
    ConnectionClosed,
    Event,
    StreamData,
    StreamDrained,
    StreamEnd,
    StreamReset,
)
from zerotunnel.hbone.protocol import HboneClientConnection, HboneServerConnection
from zerotunnel.identity.verify import VerifiedPeer
from zerotunnel.node.tls import TlsIdentityError

log = logging.getLogger(__name__)
P = TypeVar("P", bound=asyncio.BaseProtocol)

READ_SIZE = 256 * 1024
PACKET_MARK = 0x539  # spec/istio-ambient.md §2.2: the proxy's own sockets skip in-pod capture
HANDSHAKE_TIMEOUT = 10.0


class _ReadBuffer(threading.local):
    """One 256 KiB decrypt buffer per thread, shared by every connection of that thread's loop.

    `receive_data` copies what it is given before it returns (into h2's or the lean path's frame
    buffer), and events are dispatched after, so no connection ever holds it across a callback. A
    buffer per connection made each accepted socket cost 260 KiB of resident memory before its TLS
    handshake even started: 1,000 silent sockets took 260 MiB (tests/reliability/test_floods.py,
    security.md §4 item 15).
    """

    def __init__(self) -> None:
        self.buf = bytearray(READ_SIZE)
        self.view = memoryview(self.buf)


_READ_BUFFER = _ReadBuffer()


def tune_socket(sock: socket.socket | None, *, mark: bool = False) -> None:
    """TCP_NODELAY (performance.md §4.4) and, for sockets we originate, SO_MARK 0x539 so the pod's
    nftables do not capture them again (§2.2). EPERM outside root/netns is ignored."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mark:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, PACKET_MARK)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EACCES):
                raise


async def open_tcp(
    protocol_factory: Callable[[], P],
    host: str,
    port: int,
    *,
    bind_ip: str | None = None,
    mark: bool = True,
    timeout: float = 10.0,
    sock_factory: Callable[[socket.AddressFamily], socket.socket] | None = None,
) -> P:
    """Dial with the socket options set *before* connect (SO_MARK must be on the SYN), optionally
    from a given source IP (the pool key's source, §1.5). Connect timeout 10 s (§1.5)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # In-pod mode the socket must be born in the source pod's netns (`sock_factory`, DESIGN.md §4).
    sock = sock_factory(family) if sock_factory is not None else socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        tune_socket(sock, mark=mark)
        if bind_ip:
            sock.bind((bind_ip, 0))
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
        _, protocol = await loop.create_connection(protocol_factory, sock=sock)
    except BaseException:
        sock.close()
        raise
    return protocol


def sock_addr(value: object) -> tuple[str, int] | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return str(value[0]), int(value[1])
    return None


class StreamSink(Protocol):
    """What consumes an HBONE stream (the relay's TCP side)."""

    def stream_data(self, data: bytes, length: int) -> None: ...
    def stream_eof(self) -> None: ...
    def stream_reset(self, reason: str) -> None: ...
    def stream_writable(self) -> None: ...


class HboneStream:
    """One tunnelled TCP connection: write bytes/EOF into it, receive through an attached sink."""

    __slots__ = ("_conn", "_pending", "_sink", "bytes_recv", "bytes_sent", "local_ended", "remote_ended",
                 "reset_reason", "stream_id")

    def __init__(self, conn: HboneConnectionProtocol, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._sink: StreamSink | None = None
        self._pending: list[tuple[str, bytes, int]] = []
        self.local_ended = False
        self.remote_ended = False
        self.reset_reason: str | None = None
        self.bytes_sent = 0
        self.bytes_recv = 0

    @property
    def connection(self) -> HboneConnectionProtocol:
        return self._conn

    @property
    def done(self) -> bool:
        return self.reset_reason is not None or (self.local_ended and self.remote_ended)

    def attach(self, sink: StreamSink) -> None:
        """Start delivering to `sink`; anything that arrived before is replayed in order."""
        self._sink = sink
        pending, self._pending = self._pending, []
        for kind, data, length in pending:
            if kind == "data":
                sink.stream_data(data, length)
            elif kind == "eof":
                sink.stream_eof()
            else:
                sink.stream_reset(data.decode())

    def write(self, data: bytes | memoryview) -> bool:
        """Queue bytes for the peer; False means "stop reading your source until stream_writable"."""
        if self.local_ended or self.reset_reason is not None:
            return False
        self.bytes_sent += len(data)
        self._conn.send_stream_data(self.stream_id, data)
        return self.can_write()

    def can_write(self) -> bool:
        return self._conn.can_write(self.stream_id)

    def write_eof(self) -> None:
        if not self.local_ended and self.reset_reason is None:
            self.local_ended = True
            self._conn.send_stream_eof(self)

    def consumed(self, length: int) -> None:
        """The sink passed `length` flow-controlled bytes on: let the peer send more."""
        self._conn.acknowledge(self.stream_id, length)

    def abort(self, reason: str = "aborted") -> None:
        if self.reset_reason is None:
            self.reset_reason = reason
            self._conn.reset_stream(self)

    # called by the connection
    def _data(self, data: bytes, length: int) -> None:
        self.bytes_recv += len(data)
        if self._sink is not None:
            self._sink.stream_data(data, length)
        else:
            self._pending.append(("data", data, length))

    def _eof(self) -> None:
        self.remote_ended = True
        if self._sink is not None:
            self._sink.stream_eof()
        else:
            self._pending.append(("eof", b"", 0))

    def _reset(self, reason: str) -> None:
        if self.reset_reason is not None:
            return
        self.reset_reason = reason
        if self._sink is not None:
            self._sink.stream_reset(reason)
        else:
            self._pending.append(("reset", reason.encode(), 0))

    def _writable(self) -> None:
        if self._sink is not None:
            self._sink.stream_writable()


class HboneConnectionProtocol(asyncio.Protocol):
    """One mTLS + HTTP/2 connection; subclasses add the server or client role."""

    h2: HboneServerConnection | HboneClientConnection

    def __init__(self, ssl_context: ssl.SSLContext, *, server_side: bool,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = ssl_context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                         server_hostname=None)
        self._handshake_timeout = handshake_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.handshaken = False
        self.closed = False
        self.peer: VerifiedPeer | None = None
        self.streams: dict[int, HboneStream] = {}
        self.local_addr: tuple[str, int] | None = None
        self.peer_addr: tuple[str, int] | None = None
        self._write_paused = False
        self._flush_pending = False
        self.close_reason: str | None = None

    # -- hooks for subclasses -------------------------------------------------------------------

    def verify(self, ssl_object: ssl.SSLObject) -> VerifiedPeer:
        raise NotImplementedError

    def established(self) -> None:
        """TLS is up and the peer verified."""

    def handshake_failed(self, reason: str, label: str, flag: str) -> None:
        """The TLS handshake or the peer verification failed; the socket is being closed. `reason`
        is the log text, `label` a bounded metric label, `flag` the response flag (§8.1)."""

    def role_event(self, event: Event) -> None:
        """Events only one role sees (ConnectRequest, ConnectResponse, ...)."""

    def closed_hook(self, reason: str) -> None:
        """The connection is gone (all its streams were reset first)."""

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only duck-typed alike
        tr = cast(asyncio.Transport, transport)
        self.transport = tr
        tune_socket(tr.get_extra_info("socket"))
        self.local_addr = sock_addr(tr.get_extra_info("sockname"))
        self.peer_addr = sock_addr(tr.get_extra_info("peername"))
        tr.set_write_buffer_limits(high=1024 * 1024)
        self._timer = self._loop.call_later(self._handshake_timeout, self._handshake_timed_out)
        self._handshake()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self._incoming.write(data)
        if not self.handshaken:
            self._handshake()
            if not self.handshaken:
                return
        self._read_tls()

    def eof_received(self) -> bool | None:
        self._shutdown("peer closed the connection")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self.handshaken and not self.closed:
            self.closed = True
            self.handshake_failed(f"tls error: connection closed during handshake: {exc or 'eof'}",
                                  "closed", "TLS_FAILURE")
            return
        self._shutdown(f"connection lost: {exc}" if exc else "connection closed")

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for stream in list(self.streams.values()):
            stream._writable()

    # -- TLS ------------------------------------------------------------------------------------

    def _write_tls(self) -> None:
        out = self._outgoing.read()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def _handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._write_tls()
            return
        except (ssl.SSLError, OSError) as exc:
            self._write_tls()
            label = str(getattr(exc, "reason", None) or type(exc).__name__)
            self._fail_handshake(f"tls error: {exc}", label)
            return
        self._write_tls()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            self.peer = self.verify(self._ssl)
        except TlsIdentityError as exc:
            self._fail_handshake(exc.message, exc.reason, exc.response_flag)
            return
        self.handshaken = True
        self.established()
        self.flush()

    def _fail_handshake(self, reason: str, label: str, flag: str = "TLS_FAILURE") -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self.handshake_failed(reason, label, flag)
        if self.transport is not None:
            self.transport.abort()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if not self.handshaken:
            self._fail_handshake("tls error: handshake timed out", "timeout")

    def _read_tls(self) -> None:
        """Decrypt everything buffered and hand it to h2 in one piece. `SSLObject.read` returns at
        most one 16 KiB record per call; feeding h2 per record made its frame buffer re-copy a
        1 MiB DATA frame 64 times (the top hot spot of the first profile)."""
        view = _READ_BUFFER.view
        filled = 0
        eof: str | None = None
        while filled < READ_SIZE:
            try:
                got = self._ssl.read(READ_SIZE - filled, view[filled:])
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                eof = "peer closed the TLS session"
                break
            except ssl.SSLError as exc:
                self._shutdown(f"tls error: {exc}")
                return
            n = got if isinstance(got, int) else len(got)
            if not n:
                # CPython returns 0 rather than raising SSLZeroReturnError once the peer's
                # close_notify arrived; missing it left the socket open until the peer's own
                # shutdown timeout (30 s for asyncio clients; tests/reliability/test_floods.py).
                eof = "peer closed the TLS session"
                break
            filled += n
        if filled:
            # Whatever the events queue (acknowledgements, relayed replies) leaves in the one
            # `flush` below instead of scheduling its own.
            pending, self._flush_pending = self._flush_pending, True
            try:
                for event in self.h2.receive_data(view[:filled], self._loop.time()):
                    self._event(event)
                    if self.closed:
                        break
            finally:
                self._flush_pending = pending
        if eof is not None:
            self._shutdown(eof)
            return
        self.flush()
        if filled == READ_SIZE and not self.closed and (self._incoming.pending or self._ssl.pending()):
            self._read_tls()

    def schedule_flush(self) -> None:
        """Flush once, after every callback of this event-loop iteration ran.

        The profile (bench/RESULTS.md) put ~45 % of a node proxy's time in `transport.write`: one
        TLS record and one `send` per relayed message, and on a veth each send runs the receiver's
        stack too. Deferring to `call_soon` lets every stream that got bytes in the same poll (64
        keep-alive connections share one pooled HBONE connection, §1.5) leave in one record and
        one syscall. Ordering is unchanged: h2 serialises frames as they are queued."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._deferred_flush)

    def _deferred_flush(self) -> None:
        self._flush_pending = False
        self.flush()

    def flush(self) -> None:
        """Encrypt and write whatever h2 has queued."""
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            try:
                self._ssl.write(data)
            except ssl.SSLError as exc:
                self._shutdown(f"tls error: {exc}")
                return
            self._write_tls()

    # -- events ---------------------------------------------------------------------------------

    def _event(self, event: Event) -> None:
        if isinstance(event, StreamData):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._data(event.data, event.flow_controlled_length)
            else:
                self.h2.acknowledge(event.stream_id, event.flow_controlled_length)
        elif isinstance(event, StreamEnd):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._eof()
                self._maybe_forget(stream)
        elif isinstance(event, StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                stream._reset(f"stream reset by peer (code {event.error_code})")
                self.stream_forgotten(stream)
        elif isinstance(event, StreamDrained):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._writable()
        elif isinstance(event, ConnectionClosed):
            self.flush()
            self._shutdown(f"connection closed by {'peer' if event.remote else 'us'}: {event.reason}")
        else:
            self.role_event(event)

    # -- stream operations (called by HboneStream) -----------------------------------------------

    def send_stream_data(self, stream_id: int, data: bytes | memoryview) -> None:
        self.h2.send_data(stream_id, data)
        self.schedule_flush()

    def send_stream_eof(self, stream: HboneStream) -> None:
        self.h2.end_stream(stream.stream_id)
        self.schedule_flush()
        self._maybe_forget(stream)

    def can_write(self, stream_id: int) -> bool:
        return not self._write_paused and not self.closed and (
            self.h2.buffered(stream_id) < self.h2.settings.max_send_buffer
        )

    def acknowledge(self, stream_id: int, length: int) -> None:
        if not self.closed:
            self.h2.acknowledge(stream_id, length)
            self.schedule_flush()

    def register(self, stream_id: int) -> HboneStream:
        stream = HboneStream(self, stream_id)
        self.streams[stream_id] = stream
        return stream

    def drop(self, stream: HboneStream, reason: str) -> None:
        """The protocol already ended this stream (a non-200 answer): forget it without a reset."""
        stream.reset_reason = stream.reset_reason or reason
        if self.streams.pop(stream.stream_id, None) is not None:
            self.stream_forgotten(stream)

    def reset_stream(self, stream: HboneStream) -> None:
        if self.streams.pop(stream.stream_id, None) is not None:
            self.h2.reset_stream(stream.stream_id, ErrorCodes.CANCEL)
            self.schedule_flush()
            self.stream_forgotten(stream)

    def _maybe_forget(self, stream: HboneStream) -> None:
        if stream.done and self.streams.pop(stream.stream_id, None) is not None:
            self.stream_forgotten(stream)

    def stream_forgotten(self, stream: HboneStream) -> None:
        """A stream finished (both ends closed or reset); pools and drains watch this."""

    # -- closing --------------------------------------------------------------------------------

    def close(self, reason: str = "closed") -> None:
        """GOAWAY, reset what is left, close the socket."""
        if self.closed:
            return
        self.h2.close(reason=reason)
        self.flush()
        self._shutdown(reason)

    def _shutdown(self, reason: str) -> None:
        if self.closed and not self.streams:
            return
        first = not self.closed
        self.closed = True
        if first:
            self.close_reason = reason
        streams, self.streams = list(self.streams.values()), {}
        for stream in streams:
            stream._reset(reason)
            self.stream_forgotten(stream)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if first:
            self.closed_hook(reason)
