"""Bidirectional relay between a plaintext TCP connection and an HBONE stream.

performance.md §4: an asyncio `Protocol` (no streams API), big reads, TCP_NODELAY. Backpressure
both ways without extra buffers: TCP → HBONE stops reading the socket when the stream says so
(`HboneStream.write` → False) and resumes on `stream_writable`; HBONE → TCP acknowledges h2 data
only while the socket's write buffer is below its high-water mark, so a slow app closes the
HTTP/2 window (4 MiB per stream, §1.5) instead of making us buffer.

Half-close is exact: a FIN from the TCP side becomes END_STREAM, END_STREAM becomes a FIN
(`write_eof`), and the socket is closed once both directions ended. A reset on either side
resets the other (ztunnel: the app sees RST after a non-200 or an aborted tunnel, §1.4).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from zerotunnel.node.hbone_conn import HboneStream, sock_addr, tune_socket

HIGH_WATER = 1024 * 1024


class TcpRelay(asyncio.Protocol):
    """The plaintext side. Usable before a stream exists: bytes wait (reading paused) until
    `attach`, which is how the outbound listener holds the app while the pool connects."""

    def __init__(self, on_done: Callable[[TcpRelay], None] | None = None, *, mark: bool = False) -> None:
        self._on_done = on_done
        self._mark = mark
        self.transport: asyncio.Transport | None = None
        self.stream: HboneStream | None = None
        self._early: list[bytes] = []
        self._early_eof = False
        self.tcp_eof = False  # the TCP peer sent FIN
        self.stream_ended = False  # the HBONE peer sent END_STREAM
        self._reading_paused = False
        self._write_paused = False
        self._unacked = 0
        self.bytes_up = 0  # TCP → HBONE
        self.bytes_down = 0  # HBONE → TCP
        self.error: str | None = None
        self.finished = False
        self.local_addr: tuple[str, int] | None = None
        self.peer_addr: tuple[str, int] | None = None
        self.connected: asyncio.Future[None] = asyncio.get_event_loop().create_future()

    # -- TCP side -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only duck-typed alike
        tr = cast(asyncio.Transport, transport)
        self.transport = tr
        tune_socket(tr.get_extra_info("socket"), mark=self._mark)
        self.local_addr = sock_addr(tr.get_extra_info("sockname"))
        self.peer_addr = sock_addr(tr.get_extra_info("peername"))
        tr.set_write_buffer_limits(high=HIGH_WATER)
        if self.stream is None:
            self._pause_reading()
        if not self.connected.done():
            self.connected.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.stream is None:
            self._early.append(data)
            self._pause_reading()
            return
        self.bytes_up += len(data)
        if not self.stream.write(data):
            self._pause_reading()

    def eof_received(self) -> bool:
        self.tcp_eof = True
        if self.stream is None:
            self._early_eof = True
        else:
            self.stream.write_eof()
            self._maybe_finish()
        return True  # keep the socket open: the other direction may still flow (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("connection closed"))
        if self.stream is not None and not self.stream.done:
            if exc is None and self.tcp_eof:
                pass
            else:
                if self.error is None:
                    self.error = f"connection closed: {exc}" if exc else "connection closed"
                self.stream.abort(self.error)
        self._finish()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._unacked and self.stream is not None:
            n, self._unacked = self._unacked, 0
            self.stream.consumed(n)

    # -- joining --------------------------------------------------------------------------------

    def attach(self, stream: HboneStream) -> None:
        """Join the stream: forward what the app already sent, then relay both ways."""
        self.stream = stream
        early, self._early = self._early, []
        for data in early:
            self.bytes_up += len(data)
            stream.write(data)
        if self._early_eof:
            stream.write_eof()
        stream.attach(self)
        if self.transport is not None and not self.transport.is_closing():
            if stream.can_write():
                self._resume_reading()
        elif self.transport is not None:
            stream.abort(self.error or "connection closed")
        self._maybe_finish()

    def fail(self, error: str) -> None:
        """The tunnel could not be set up: record why and reset the app's connection (§1.4)."""
        self.error = self.error or error
        if self.transport is not None:
            self.transport.abort()
        else:
            self._finish()

    def close(self, error: str) -> None:
        """Tear down a live relay (policy change, drain): reset the stream and the socket."""
        self.error = self.error or error
        if self.stream is not None:
            self.stream.abort(error)
        if self.transport is not None:
            self.transport.abort()

    # -- StreamSink -----------------------------------------------------------------------------

    def stream_data(self, data: bytes, length: int) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            if self.stream is not None:
                self.stream.consumed(length)
            return
        transport.write(data)
        self.bytes_down += len(data)
        if self._write_paused:
            self._unacked += length
        elif self.stream is not None:
            self.stream.consumed(length)

    def stream_eof(self) -> None:
        self.stream_ended = True
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()
        self._maybe_finish()

    def stream_reset(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        if self.transport is not None:
            self.transport.abort()
        else:
            self._finish()

    def stream_writable(self) -> None:
        if self._reading_paused and self.stream is not None and self.stream.can_write():
            self._resume_reading()

    # -- internals ------------------------------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = False
            self.transport.resume_reading()

    def _maybe_finish(self) -> None:
        if self.tcp_eof and self.stream_ended and self.transport is not None:
            self.transport.close()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self._on_done is not None:
            self._on_done(self)
