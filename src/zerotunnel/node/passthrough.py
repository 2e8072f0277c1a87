"""A plain TCP connection dressed as an HBONE stream, so one relay serves every leg.

The relay (`relay.TcpRelay`) joins an app's TCP connection to a *stream*. Plaintext legs — outbound
passthrough to an out-of-mesh destination, inbound 15006 to the app — have a TCP socket on the other
side instead of an HTTP/2 stream; `TcpStream` gives that socket the stream's interface (write /
write_eof / can_write / consumed / abort / attach), with the same backpressure: bytes delivered to the
sink but not yet `consumed` pause reading at the high-water mark, as the h2 window would.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import cast

from zerotunnel.node.capture import Netns, socket_in_netns
from zerotunnel.node.hbone_conn import StreamSink, tune_socket

HIGH_WATER = 1024 * 1024


class TcpStream(asyncio.Protocol):
    """The upstream side of a plaintext relay."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._sink: StreamSink | None = None
        self._early: list[tuple[str, bytes]] = []
        self._unconsumed = 0
        self._reading_paused = False
        self._write_paused = False
        self.local_ended = False
        self.remote_ended = False
        self.reset_reason: str | None = None
        self.bytes_sent = 0
        self.bytes_recv = 0

    # -- the stream interface TcpRelay uses ------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.reset_reason is not None or (self.local_ended and self.remote_ended)

    def attach(self, sink: StreamSink) -> None:
        self._sink = sink
        early, self._early = self._early, []
        for kind, data in early:
            if kind == "data":
                self._deliver(data)
            elif kind == "eof":
                sink.stream_eof()
            else:
                sink.stream_reset(data.decode())

    def write(self, data: bytes | memoryview) -> bool:
        if self.transport is None or self.transport.is_closing() or self.local_ended:
            return False
        self.bytes_sent += len(data)
        self.transport.write(data)
        return not self._write_paused

    def can_write(self) -> bool:
        return not self._write_paused and self.transport is not None and not self.transport.is_closing()

    def write_eof(self) -> None:
        if self.local_ended or self.transport is None or self.transport.is_closing():
            return
        self.local_ended = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._maybe_close()

    def consumed(self, length: int) -> None:
        self._unconsumed = max(0, self._unconsumed - length)
        if self._reading_paused and self._unconsumed < HIGH_WATER and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def abort(self, reason: str = "aborted") -> None:
        if self.reset_reason is None:
            self.reset_reason = reason
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only duck-typed alike
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self.bytes_recv += len(data)
        if self._sink is None:
            self._early.append(("data", data))
            return
        self._deliver(data)

    def eof_received(self) -> bool:
        self.remote_ended = True
        if self._sink is None:
            self._early.append(("eof", b""))
        else:
            self._sink.stream_eof()
        self._maybe_close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not (self.local_ended and self.remote_ended) and self.reset_reason is None:
            self.reset_reason = f"upstream closed: {exc}" if exc else "upstream closed"
            if self._sink is not None:
                self._sink.stream_reset(self.reset_reason)
            else:
                self._early.append(("reset", self.reset_reason.encode()))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._sink is not None:
            self._sink.stream_writable()

    # -- internals ---------------------------------------------------------------------------------

    def _deliver(self, data: bytes) -> None:
        assert self._sink is not None
        self._unconsumed += len(data)
        self._sink.stream_data(data, len(data))
        if self._unconsumed >= HIGH_WATER and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _maybe_close(self) -> None:
        if self.local_ended and self.remote_ended and self.transport is not None:
            self.transport.close()


async def connect_from_netns(
    factory: Callable[[], asyncio.Protocol],
    netns: Netns | None,
    host: str,
    port: int,
    *,
    mark: bool = True,
    timeout: float = 10.0,
) -> asyncio.BaseProtocol:
    """A TCP connection that originates in `netns` (the proxy speaking as the pod), SO_MARK 0x539 set
    before the SYN so the pod's capture rules let it through (§2.2); 10 s connect timeout (§1.5)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket_in_netns(netns, family) if netns is not None else socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        tune_socket(sock, mark=mark)
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
        _, protocol = await loop.create_connection(factory, sock=sock)
    except BaseException:
        sock.close()
        raise
    return protocol
