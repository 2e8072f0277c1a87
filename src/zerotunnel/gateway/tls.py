"""TLS for the ingress gateway's outside clients, driven on a memory BIO of the gateway's own.

Why not asyncio's `start_tls`: when a handshake fails it closes the transport without writing what
OpenSSL queued, so the alert that says *why* (TLS 1.3 `certificate_required`, 116, for a client
without a certificate; `unknown_ca`, `certificate_expired`, ...) never left, and a client saw a bare
close ("unexpected eof" in curl, a connectivity error in sslyze: docs/RELIABILITY.md open finding 6).
Envoy and OpenSSL servers send the alert; so does this module, then closes the way HTTP servers do a
"lingering close" (RFC 9112 §9.6): half-close, read and discard until the client closes or `LINGER`
passes, so a request the client already sent cannot turn the close into a reset that destroys the
alert before the client reads it.

The node proxy's 15008 does the same (node/hbone_conn.py) as an asyncio Protocol; the gateway keeps
streams because its HTTP layer (waypoint/serve.py) reads a `ByteChannel`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable

from zerotunnel.errors import ZerotunnelError

READ_SIZE = 256 * 1024
PLAIN_READ = 64 * 1024
"""Decrypted bytes per `recv`: `SSLObject.read(n)` allocates n bytes first; 64 KiB stays under
malloc's mmap threshold, and the HTTP layer's own buffers take it from there."""
LINGER = 1.0
"""Seconds a refused client gets to read the alert and close before the socket is dropped."""


class HandshakeFailed(ZerotunnelError):
    """The TLS handshake failed. `reason` is OpenSSL's (e.g. PEER_DID_NOT_RETURN_A_CERTIFICATE),
    `verify_message` the certificate verification error when there was one, `alert` whether an alert
    was written to the client."""

    def __init__(self, message: str, *, reason: str, verify_message: str | None = None,
                 alert: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.verify_message = verify_message
        self.alert = alert


class TlsChannel:
    """A server-side TLS connection over an asyncio stream pair, as a `ByteChannel`."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, context: ssl.SSLContext
    ) -> None:
        self.reader = reader
        self.writer = writer
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._eof = False

    def _flush(self) -> bool:
        out = self._outgoing.read()
        if out and not self.writer.transport.is_closing():
            self.writer.write(out)
        return bool(out)

    async def handshake(self, timeout: float, on_hello: Callable[[], None] | None = None) -> None:
        """Complete the handshake within `timeout` seconds (the whole handshake, not idle time:
        a ClientHello dripped a byte at a time is cut at `timeout`, security.md §4 item 15).
        `on_hello` is called once the client's whole ClientHello was read (the server answered)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        self.ssl_object.do_handshake()
                    except ssl.SSLWantReadError:
                        if self._flush() and on_hello is not None:
                            on_hello()
                            on_hello = None
                        try:
                            data = await self.reader.read(READ_SIZE)
                        except OSError as exc:
                            raise HandshakeFailed(f"connection lost during the handshake: {exc}",
                                                  reason="closed") from None
                        if not data:
                            raise HandshakeFailed(
                                "connection closed during the handshake", reason="closed"
                            ) from None
                        self._incoming.write(data)
                        continue
                    except ssl.SSLError as exc:
                        alert = self._flush()
                        reason = str(exc.reason or type(exc).__name__)
                        verify = exc.verify_message if isinstance(exc, ssl.SSLCertVerificationError) else None
                        raise HandshakeFailed(str(exc), reason=reason, verify_message=verify,
                                              alert=alert) from None
                    self._flush()
                    return
        except TimeoutError:
            raise HandshakeFailed("handshake timed out", reason="timeout") from None

    async def refuse(self) -> None:
        """After a failed handshake whose alert was written: half-close, let the client read the
        alert and close (at most `LINGER` seconds), then drop the socket."""
        transport = self.writer.transport
        try:
            if self.writer.can_write_eof():
                self.writer.write_eof()
            async with asyncio.timeout(LINGER):
                while await self.reader.read(READ_SIZE):
                    pass
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            transport.abort()

    # -- ByteChannel ------------------------------------------------------------------------------

    async def recv(self) -> bytes:
        """Decrypted bytes; b"" once the client sent close_notify or closed the socket."""
        while not self._eof:
            try:
                data = self.ssl_object.read(PLAIN_READ)
            except ssl.SSLWantReadError:
                self._flush()
                raw = await self.reader.read(READ_SIZE)
                if not raw:
                    self._eof = True
                    break
                self._incoming.write(raw)
                continue
            except ssl.SSLZeroReturnError:
                self._eof = True
                break
            except ssl.SSLError as exc:
                raise ConnectionResetError(f"tls error: {exc}") from None
            if not data:  # close_notify: CPython returns b"" instead of raising
                self._eof = True
                break
            self._flush()
            return data
        return b""

    async def send(self, data: bytes) -> None:
        if self.writer.transport.is_closing():
            raise ConnectionResetError("connection closed")
        try:
            self.ssl_object.write(data)
        except ssl.SSLError as exc:
            raise ConnectionResetError(f"tls error: {exc}") from None
        self._flush()
        await self.writer.drain()

    def send_eof(self) -> None:
        """TLS close_notify, then close (TLS cannot be half-closed towards every client)."""
        with contextlib.suppress(ssl.SSLError, OSError, ValueError):
            self.ssl_object.unwrap()
        with contextlib.suppress(OSError, RuntimeError):
            self._flush()
            self.writer.close()

    def abort(self, reason: str) -> None:
        self.writer.transport.abort()
