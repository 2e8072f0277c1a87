"""What an HBONE connection object reports after it is fed bytes (sans-IO, like h2 and h11)."""

from __future__ import annotations

from dataclasses import dataclass

from zerotunnel.hbone.authority import HboneAuthority

Header = tuple[bytes, bytes]


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """Server: a well-formed CONNECT (§1.4 steps 2-3 passed); the shell runs steps 4-9."""

    stream_id: int
    authority: HboneAuthority
    headers: tuple[Header, ...]

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """Server: the protocol already answered this stream (§1.4 steps 2-3); for logs and metrics."""

    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectResponse:
    """Client: the server's answer to a CONNECT. Anything but 200 is `http status: <code>` (§1.4)."""

    stream_id: int
    status: int
    headers: tuple[Header, ...]


@dataclass(frozen=True, slots=True)
class StreamData:
    """Tunnelled bytes. Call `acknowledge(stream_id, flow_controlled_length)` once they are consumed."""

    stream_id: int
    data: bytes
    flow_controlled_length: int


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """The peer half-closed the stream (the tunnelled TCP connection sent FIN)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone (RST_STREAM from the peer, or by us on a protocol error)."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(frozen=True, slots=True)
class StreamDrained:
    """Everything buffered for this stream went out under flow control: resume reading its source."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PeerSettingsChanged:
    """The peer's SETTINGS arrived; the pool caps streams per connection with this (§1.5)."""

    max_concurrent_streams: int


@dataclass(frozen=True, slots=True)
class PingAcknowledged:
    """Keepalive answer (§1.5: PING every 10 s, 20 s timeout)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection is over: GOAWAY received, or sent by us for a protocol error or abuse."""

    error_code: int
    reason: str
    remote: bool
    last_stream_id: int | None = None


Event = (
    ConnectRequest
    | RequestRejected
    | ConnectResponse
    | StreamData
    | StreamEnd
    | StreamReset
    | StreamDrained
    | PeerSettingsChanged
    | PingAcknowledged
    | ConnectionClosed
)
