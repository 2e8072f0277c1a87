"""HBONE client and server connections over `h2`: bytes in → events, calls → bytes out.

spec/istio-ambient.md §1: HBONE is plain RFC 9113 CONNECT over mTLS. This module owns everything
that is HTTP/2: the settings of §1.5, the request checks of §1.4 steps 2-3, flow control with
application acknowledgement (so a slow reader backs the sender off instead of buffering without
bound, security.md §1d CVE-2020-12604), and the abuse limits Python's `h2` lacks (security.md
rules 12-13: rapid reset, CONTINUATION floods, SETTINGS/PING floods → GOAWAY).

No I/O and no clock: the shell feeds bytes with `receive_data(data, now)` (a monotonic time used
only by the abuse token buckets) and writes `data_to_send()` to its transport.
"""

from __future__ import annotations

import contextlib
import struct
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.frame_buffer import FrameBuffer
from h2.stream import StreamState
from hpack.exceptions import HPACKError
from hpack.struct import HeaderTuple, NeverIndexedHeaderTuple
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    ExtensionFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from zerotunnel.hbone.authority import AuthorityError, HboneAuthority, parse_authority
from zerotunnel.hbone.events import (
    ConnectionClosed,
    ConnectRequest,
    ConnectResponse,
    Event,
    Header,
    PeerSettingsChanged,
    PingAcknowledged,
    RequestRejected,
    StreamData,
    StreamDrained,
    StreamEnd,
    StreamReset,
)
from zerotunnel.hbone.headers import connect_request_headers


def _data_frame_body_repr(self: DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


# h2 logs `repr(frame)` for every received frame, eagerly, even with logging off; for DATA that
# re-serializes and hex-encodes the whole payload (up to 1 MiB): ~15% of the server's CPU in
# bench/bench_hbone.py's profile. A length is all a log line needs.
DataFrame._body_repr = _data_frame_body_repr  # type: ignore[method-assign,assignment]

KiB = 1024
MiB = 1024 * KiB
_DEFAULT_WINDOW = 65_535


@dataclass(frozen=True, slots=True)
class HboneSettings:
    """HTTP/2 settings of §1.5 (ztunnel `config.rs`); both sides share windows and frame size."""

    stream_window: int = 4 * MiB
    connection_window: int = 16 * MiB
    max_frame_size: int = 1 * MiB
    max_concurrent_streams: int = 200
    max_header_list_size: int = 64 * KiB
    # Per-stream bytes the protocol holds for a peer that has not opened its window; the shell
    # pauses its source above this (ztunnel's server `max_send_buffer_size`, 400 KiB).
    max_send_buffer: int = 400 * KiB
    # DATA frames we send: ≤ the peer's max frame size (1 MiB). Smaller frames fit in one socket
    # read on the other side, so h2's frame buffer never re-copies a frame being reassembled;
    # performance.md §4.2 measured 64 KiB frames fastest for pure-Python h2.
    send_frame_size: int = 256 * KiB
    # Carry DATA frames past h2's per-frame machinery (see `_HboneConnection._receive_lean`);
    # False runs every frame through h2, which the differential tests compare against.
    lean_data: bool = True


SERVER_SETTINGS = HboneSettings()
CLIENT_SETTINGS = HboneSettings(max_concurrent_streams=100, max_header_list_size=16 * KiB)


@dataclass(frozen=True, slots=True)
class AbuseLimits:
    """Token buckets per connection (security.md §1d): burst, then a sustained rate per second.

    Resets: nghttp2 ≥ 1.57's rapid-reset budget (1000 burst, 33/s); it also counts streams we had to
    refuse (400s), which is the h2 crate's "limit error resets". Control frames (SETTINGS, PING,
    PRIORITY, unknown frames): a keepalive is one PING per 10 s, so 200 burst / 20 per second is
    far above any honest peer.
    """

    reset_burst: int = 1000
    reset_rate: float = 33.0
    control_burst: int = 200
    control_rate: float = 20.0
    # WINDOW_UPDATE is only ever needed because we sent DATA: Envoy's
    # `max_inbound_window_update_frames_per_data_frame_sent` (10), plus a burst for the connection
    # and stream windows a peer may open up front. A flood of 1-byte increments otherwise costs a
    # pass over every stream's send queue per frame (tests/reliability/test_h2_abuse.py).
    window_update_burst: int = 1000
    window_updates_per_data_frame: int = 10


@dataclass(slots=True)
class TokenBucket:
    """`burst` tokens, refilled at `rate` per second of the caller's clock; `take` spends one, or
    says False when none is left (the abuse budgets here and in the waypoint's HTTP/2 server)."""

    burst: float
    rate: float
    tokens: float
    last: float | None = None

    def take(self, now: float) -> bool:
        if self.last is not None and now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now if self.last is None else max(self.last, now)
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class _BoundedFrameBuffer(FrameBuffer):
    """h2's frame buffer keeps up to 64 CONTINUATION frames of up to max-frame-size each (64 MiB at
    1 MiB frames) before complaining; cap the encoded header block at the header-list limit instead
    (Envoy CVE-2024-27919)."""

    def __init__(self, *, server: bool, max_header_block: int) -> None:
        super().__init__(server=server)
        self._max_header_block = max_header_block

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        if isinstance(f, HeadersFrame | PushPromiseFrame | ContinuationFrame):
            size = sum(len(x.data) for x in self._headers_buffer) + len(f.data)
            if size > self._max_header_block:
                raise h2.exceptions.DenialOfServiceError(f"header block larger than {self._max_header_block}")
        return super()._update_header_buffer(f)


_FRESH_PER_TUNNEL = frozenset({b"traceparent", b"forwarded"})


class _TunnelHeaderEncoder(hpack.Encoder):
    """HPACK tuned for CONNECT header blocks (RFC 7541 leaves both choices to the encoder):

    - no Huffman coding: pure-Python Huffman was ~60 % of encoding ztunnel's five CONNECT headers
      (61 → 24 µs; about 4 % of a node proxy's CPU per new tunnel), for ~30 bytes more per block;
    - `traceparent` and `forwarded` never indexed: they are fresh on every tunnel, so indexing them
      only evicted the entries that do repeat (:authority, baggage) and grew the dynamic table
      that every header is looked up in linearly (`HeaderTable.search`, 7.7 % of the client proxy
      under churn)."""

    def encode(
        self,
        headers: Iterable[HeaderTuple | tuple[bytes | str, bytes | str]
                          | tuple[bytes | str, bytes | str, bool | None]] | dict[bytes | str, bytes | str],
        huffman: bool = True,
    ) -> bytes:
        del huffman
        if not isinstance(headers, dict):
            headers = [NeverIndexedHeaderTuple(h[0], h[1])
                       if h[0] in _FRESH_PER_TUNNEL and not isinstance(h, HeaderTuple) else h
                       for h in headers]
        return super().encode(headers, huffman=False)


class _OverBudget(Exception):
    """Internal: a budget ran out mid-read; `receive_data` turns it into a GOAWAY."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _GuardedH2Connection(h2.connection.H2Connection):
    """Runs `guard(frame)` before h2 handles each received frame, so an abuse budget stops a flood
    at the frame that exhausts it. Counting h2's *events* instead let h2 parse a whole read first:
    10,000 HEADERS+RST_STREAM pairs fit in one 256 KiB read, 1.3 s of CPU on the event loop before
    the first budget check (tests/reliability/test_h2_abuse.py, rapid reset)."""

    # h2 remembers how each closed stream closed (to answer late frames: RST_STREAM vs ignore) for
    # the last 65,536 streams, ~107 B each: ~7 MiB per pooled connection, which is the slow RSS climb
    # the seed soak showed (tests/reliability/test_load.py). Late frames arrive within milliseconds;
    # 1,024 streams is seconds of history even under churn. A frame for a forgotten stream is still
    # handled: WINDOW_UPDATE and RST_STREAM ignored, DATA refused with STREAM_CLOSED.
    MAX_CLOSED_STREAMS = 1024

    def __init__(self, config: h2.config.H2Configuration, guard: Callable[[Frame], None],
                 refused: Callable[[], None]) -> None:
        super().__init__(config=config)
        self._guard = guard
        self._refused = refused

    def _receive_frame(self, frame: Frame) -> list[h2.events.Event]:
        self._guard(frame)
        return super()._receive_frame(frame)

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[h2.events.Event]]:
        """RFC 9113 §5.1.2: a stream beyond SETTINGS_MAX_CONCURRENT_STREAMS is a *stream* error;
        h2 makes it a connection error (TooManyStreamsError), so the 201st CONNECT took down the 200
        tunnels beside it. Like ztunnel (the h2 crate), refuse that stream alone with
        RST_STREAM(REFUSED_STREAM) — after decoding its header block, which keeps HPACK in step —
        and let `refused` charge the abuse budget, since a refusal costs the peer nothing."""
        if (frame.stream_id in self.streams
                or self.open_inbound_streams < self.local_settings.max_concurrent_streams):
            return super()._receive_headers_frame(frame)
        self._refused()
        headers = h2.connection._decode_headers(self.decoder, frame.data)
        self.state_machine.process_input(h2.connection.ConnectionInputs.RECV_HEADERS)
        stream = self._get_or_create_stream(
            frame.stream_id, h2.connection.AllowedStreamIDs(not self.config.client_side))
        stream.receive_headers(headers, "END_STREAM" in frame.flags, self.config.header_encoding)
        self.reset_stream(frame.stream_id, ErrorCodes.REFUSED_STREAM)
        return [], []


@dataclass(slots=True)
class _Outbound:
    chunks: deque[memoryview] = field(default_factory=deque)
    size: int = 0
    end_pending: bool = False
    was_blocked: bool = False


_PROTOCOL_ERRORS = (h2.exceptions.ProtocolError, HyperframeError, HPACKError)

# RFC 9113 §4.1 frame header: 24-bit length, type, flags, 31-bit stream id.
_FRAME_HEADER = struct.Struct(">BHBBL")
_FRAME_HEADER_LEN = 9
_DATA_FRAME_TYPE = 0x0
_WINDOW_UPDATE_FRAME_TYPE = 0x8
_WINDOW_INCREMENT = struct.Struct(">L")
# h2's state tables (stream.py): RECV_DATA is legal in these states, SEND_DATA in the others below.
_RECV_DATA_STATES = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL})
_SEND_DATA_STATES = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE})
_OPEN_CONNECTION_STATES = frozenset({ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN})


class _HboneConnection:
    """What client and server share: settings, flow-controlled sending, abuse limits, GOAWAY."""

    def __init__(self, *, client_side: bool, settings: HboneSettings, limits: AbuseLimits) -> None:
        self.settings = settings
        config = h2.config.H2Configuration(client_side=client_side, header_encoding=None)
        conn = _GuardedH2Connection(config, self._guard, self._refused_stream)
        conn.local_settings = h2.settings.Settings(
            client=client_side,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: settings.stream_window,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: settings.max_frame_size,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        conn.max_inbound_frame_size = settings.max_frame_size
        conn.decoder.max_header_list_size = settings.max_header_list_size
        conn.encoder = _TunnelHeaderEncoder()
        conn.incoming_buffer = _BoundedFrameBuffer(
            server=not client_side, max_header_block=settings.max_header_list_size
        )
        conn.initiate_connection()
        if settings.connection_window > _DEFAULT_WINDOW:
            conn.increment_flow_control_window(settings.connection_window - _DEFAULT_WINDOW)
        self._h2 = conn
        self._out: dict[int, _Outbound] = {}
        self._remote_ended: set[int] = set()
        self._resets = TokenBucket(limits.reset_burst, limits.reset_rate, limits.reset_burst)
        self._control = TokenBucket(limits.control_burst, limits.control_rate, limits.control_burst)
        self._limits = limits
        self._data_frames_sent = 0
        self._window_updates = 0
        self._now = 0.0
        self._lean = settings.lean_data
        # Received bytes not yet a whole frame (lean mode gives h2 whole frames only).
        self._partial = bytearray()
        self.closed: ConnectionClosed | None = None

    # -- bytes in / out ---------------------------------------------------------------------------

    def data_to_send(self) -> bytes | bytearray:
        """Everything queued for the wire. h2's buffer itself is handed over (h2 starts a new one),
        saving the copy `H2Connection.data_to_send` makes — up to 1 MiB per flush in bulk."""
        out = self._h2._data_to_send
        if not out:
            return b""
        self._h2._data_to_send = bytearray()
        return out

    def receive_data(self, data: bytes | bytearray | memoryview, now: float = 0.0) -> list[Event]:
        """Feed bytes from the wire. Never raises on bad input: a protocol error or abuse becomes a
        GOAWAY (queued in `data_to_send`) and a final `ConnectionClosed` event. `data` may be a
        view of the caller's buffer: it is copied before this returns, and no event refers to it."""
        if self.closed is not None:
            return []
        self._now = now
        events: list[Event] = []
        try:
            if self._lean:
                self._receive_lean(data, events)
            else:
                self._receive_h2(data, events)
        except _OverBudget as exc:
            events.append(self._goaway(ErrorCodes.ENHANCE_YOUR_CALM, exc.reason))
        except _PROTOCOL_ERRORS as exc:
            code = getattr(exc, "error_code", None) or ErrorCodes.PROTOCOL_ERROR
            events.append(self._goaway(int(code), f"protocol error: {exc}"))
        if self.closed is not None:
            self._partial = bytearray()
        if self.closed is not None and (not events or not isinstance(events[-1], ConnectionClosed)):
            events.append(self.closed)
        return events

    def _receive_h2(self, data: bytes | bytearray | memoryview, events: list[Event]) -> None:
        """Bytes through h2 and its events through `_dispatch`, stopping once the connection closed."""
        for ev in self._h2.receive_data(data):
            self._dispatch(ev, self._now, events)
            if self.closed is not None:
                return

    def _receive_lean(self, data: bytes | bytearray | memoryview, events: list[Event]) -> None:
        """performance.md §4 ("a lean DATA path beside h2"): h2 spends ~22 µs of pure Python per
        received DATA frame (frame object, two state machines, events) — a third of a node proxy's
        CPU per keep-alive request. Here the wire is cut into frames and a DATA frame that needs no
        decision — flags 0 (no END_STREAM, no padding), a non-empty payload, a stream we relay that
        h2 holds OPEN or HALF_CLOSED_LOCAL, no content-length to track, no header block in
        progress — is accounted against both receive windows exactly as h2 would
        (`window_consumed`, FLOW_CONTROL_ERROR when one goes negative) and delivered as
        `StreamData`. Every other frame, in order and whole, goes through h2 (and the abuse guard),
        which keeps every state, limit and error decision h2's; the eligibility test runs after the
        frames before it were processed, so a RST_STREAM or GOAWAY earlier in the same read counts.
        tests/hbone/test_protocol.py checks lean and h2-only connections produce the same events and
        bytes for arbitrary frame sequences."""
        h2conn = self._h2
        preamble = h2conn.incoming_buffer._preamble_len
        if preamble:
            # The server's first bytes are the client preface; h2 validates it.
            head, data = data[:preamble], data[preamble:]
            self._receive_h2(head, events)
            if self.closed is not None or not data:
                return
        buf = self._partial
        buf += data
        view = memoryview(buf)
        pos = 0
        try:
            size = len(buf)
            max_frame = h2conn.max_inbound_frame_size
            plain = 0  # start of the frames not yet handed to h2
            while size - pos >= _FRAME_HEADER_LEN:
                high, low, ftype, flags, sid = _FRAME_HEADER.unpack_from(buf, pos)
                length = (high << 16) | low
                if length > max_frame:
                    # RFC 9113 §4.2 on the header alone. h2's frame buffer checks only once the
                    # whole announced frame (up to 16 MiB) has been buffered.
                    self._check_header(view, plain, pos, events)
                    self._receive_h2(view[plain:pos], events)
                    plain = pos = size
                    if self.closed is None:
                        h2conn._terminate_connection(ErrorCodes.FRAME_SIZE_ERROR)
                        raise h2.exceptions.FrameTooLargeError(
                            f"frame of {length} bytes, max {max_frame}")
                    break
                end = pos + _FRAME_HEADER_LEN + length
                if end > size:
                    self._check_header(view, plain, pos, events)
                    break
                if ftype == _DATA_FRAME_TYPE and flags == 0 and length:
                    if plain < pos:
                        self._receive_h2(view[plain:pos], events)
                        if self.closed is not None:
                            return
                        plain = pos
                    sid &= 0x7FFFFFFF
                    if self._lean_data_frame(sid, length, view, pos + _FRAME_HEADER_LEN, end, events):
                        plain = end
                pos = end
            if plain < pos and self.closed is None:
                self._receive_h2(view[plain:pos], events)
        finally:
            # A new buffer rather than `del buf[:pos]`: an exception's traceback may still hold
            # slices of this one, and a bytearray with live exports cannot be resized.
            rest = view[pos:].tobytes() if self.closed is None else b""
            view.release()
            self._partial = bytearray(rest)

    def _check_header(self, view: memoryview, plain: int, pos: int, events: list[Event]) -> None:
        """h2 rejects a malformed frame header (a stream id where none may be, a bad SETTINGS
        length...) as soon as the header arrives, before the body; do the same for the frame
        the lean path is holding back, after the whole frames before it."""
        try:
            Frame.parse_frame_header(memoryview(view[pos:pos + _FRAME_HEADER_LEN].tobytes()))
        except (HyperframeError, ValueError) as exc:
            self._receive_h2(view[plain:pos], events)
            if self.closed is None:
                self._h2._terminate_connection(ErrorCodes.PROTOCOL_ERROR)
                raise h2.exceptions.ProtocolError(f"Received frame with invalid header: {exc}") from exc

    def _lean_data_frame(
        self, sid: int, length: int, view: memoryview, start: int, end: int, events: list[Event]
    ) -> bool:
        """Deliver one DATA frame without h2 if nothing about it needs h2; False leaves it to h2."""
        h2conn = self._h2
        if sid not in self._out or h2conn.incoming_buffer._headers_buffer:
            return False
        if h2conn.state_machine.state not in _OPEN_CONNECTION_STATES:
            return False
        stream = h2conn.streams.get(sid)
        if (stream is None or stream.state_machine.state not in _RECV_DATA_STATES
                or stream._expected_content_length is not None):
            return False
        try:
            h2conn._inbound_flow_control_window_manager.window_consumed(length)
            stream._inbound_window_manager.window_consumed(length)
        except h2.exceptions.FlowControlError as exc:
            # What h2's `receive_data` does with it: its own GOAWAY, then the error.
            h2conn._terminate_connection(exc.error_code)
            raise
        events.append(StreamData(sid, view[start:end].tobytes(), length))
        return True

    # -- sending ----------------------------------------------------------------------------------

    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> None:
        """Queue tunnelled bytes; they leave as the peer's flow-control window allows."""
        out = self._out.get(stream_id)
        if out is None or self.closed is not None:
            return
        if data:
            out.chunks.append(memoryview(data))
            out.size += len(data)
        if end_stream:
            out.end_pending = True
        self._flush(stream_id, out)

    def end_stream(self, stream_id: int) -> None:
        """Half-close after everything queued has gone (the TCP side sent FIN)."""
        self.send_data(stream_id, b"", end_stream=True)

    def buffered(self, stream_id: int) -> int:
        """Bytes queued for the stream; above `settings.max_send_buffer` the shell stops reading."""
        out = self._out.get(stream_id)
        return out.size if out is not None else 0

    def acknowledge(self, stream_id: int, length: int) -> None:
        """The app consumed `length` flow-controlled bytes: reopen the window (backpressure)."""
        if self.closed is not None or length <= 0:
            return
        conn = self._h2
        stream = conn.streams.get(stream_id) if self._lean else None
        if stream is not None and stream.open:
            # h2's `acknowledge_received_data` without its frame objects (once per relayed
            # message, §4 lean path): the same window managers decide, WINDOW_UPDATE bytes direct.
            for sid, manager in ((0, conn._inbound_flow_control_window_manager),
                                 (stream_id, stream._inbound_window_manager)):
                increment = manager.process_bytes(length)
                if increment:
                    conn._data_to_send += _FRAME_HEADER.pack(0, 4, _WINDOW_UPDATE_FRAME_TYPE, 0, sid)
                    conn._data_to_send += _WINDOW_INCREMENT.pack(increment)
            return
        with contextlib.suppress(*_PROTOCOL_ERRORS):
            conn.acknowledge_received_data(length, stream_id)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        """Abort one tunnel (the TCP side was reset or failed)."""
        self._out.pop(stream_id, None)
        if self.closed is None:
            with contextlib.suppress(*_PROTOCOL_ERRORS):
                self._h2.reset_stream(stream_id, error_code)

    def ping(self, payload: bytes) -> None:
        """Keepalive (§1.5); payload is 8 bytes chosen by the shell."""
        if self.closed is None:
            self._h2.ping(payload)

    def close(self, error_code: int = ErrorCodes.NO_ERROR, reason: str = "") -> None:
        """Send GOAWAY; streams already open may finish (graceful drain, security.md rule 19)."""
        if self.closed is None:
            self._goaway(error_code, reason, remote=False)

    @property
    def open_streams(self) -> int:
        return len(self._out)

    # -- internals --------------------------------------------------------------------------------

    def _goaway(
        self, error_code: int, reason: str, remote: bool = False, last_stream_id: int | None = None
    ) -> ConnectionClosed:
        if not remote:
            with contextlib.suppress(*_PROTOCOL_ERRORS):
                self._h2.close_connection(error_code=error_code, additional_data=reason.encode()[:256])
        self.closed = ConnectionClosed(error_code, reason, remote=remote, last_stream_id=last_stream_id)
        self._out.clear()
        return self.closed

    def _flush(self, stream_id: int, out: _Outbound) -> bool:
        """Send as much of the stream's queue as the windows allow; True if it emptied."""
        conn = self._h2
        try:
            while out.chunks:
                window = conn.local_flow_control_window(stream_id)
                if window <= 0:
                    out.was_blocked = True
                    return False
                limit = min(window, conn.max_outbound_frame_size, self.settings.send_frame_size)
                chunk = out.chunks[0]
                if len(chunk) <= limit:
                    out.chunks.popleft()
                else:
                    out.chunks[0] = chunk[limit:]
                    chunk = chunk[:limit]
                out.size -= len(chunk)
                last = out.end_pending and not out.chunks
                if last or not self._lean or not self._send_lean(stream_id, chunk):
                    conn.send_data(stream_id, chunk, end_stream=last)
                self._data_frames_sent += 1
                if last:
                    self._sent_end(stream_id)
                    return True
            if out.end_pending:
                conn.end_stream(stream_id)
                self._sent_end(stream_id)
        except _PROTOCOL_ERRORS:
            self._out.pop(stream_id, None)
        return True

    def _send_lean(self, stream_id: int, chunk: memoryview) -> bool:
        """Serialize one DATA frame (no flags) straight into h2's send buffer, with the window
        accounting of h2's `send_data` (§4 lean path; ~16 µs of h2 per frame otherwise). The caller
        already sized `chunk` to both send windows and the peer's frame size. False when the stream
        or connection is not in a state h2 would send DATA in: h2 then raises as it always did."""
        conn = self._h2
        stream = conn.streams.get(stream_id)
        if (stream is None or stream.state_machine.state not in _SEND_DATA_STATES
                or conn.state_machine.state not in _OPEN_CONNECTION_STATES or not chunk):
            return False
        n = len(chunk)
        out = conn._data_to_send
        out += _FRAME_HEADER.pack(n >> 16, n & 0xFFFF, _DATA_FRAME_TYPE, 0, stream_id)
        out += chunk
        stream.outbound_flow_control_window -= n
        conn.outbound_flow_control_window -= n
        return True

    def _sent_end(self, stream_id: int) -> None:
        out = self._out.get(stream_id)
        if out is not None:
            out.end_pending = False
            if stream_id in self._remote_ended:
                self._forget(stream_id)

    def _forget(self, stream_id: int) -> None:
        self._out.pop(stream_id, None)
        self._remote_ended.discard(stream_id)

    def _flush_all(self, events: list[Event]) -> None:
        for sid, out in list(self._out.items()):
            if out.chunks or out.end_pending:
                was_blocked = out.was_blocked
                if self._flush(sid, out) and was_blocked:
                    out.was_blocked = False
                    events.append(StreamDrained(sid))

    def _guard(self, frame: Frame) -> None:
        """Security.md §1d budgets, per received frame (see `_GuardedH2Connection`): RST_STREAM
        (rapid reset); SETTINGS, PING, PRIORITY and unknown frames (control floods); DATA frames
        carrying nothing (Envoy's `max_consecutive_inbound_frames_with_empty_payload`); and
        WINDOW_UPDATE beyond what the DATA we sent can justify (Envoy's
        `max_inbound_window_update_frames_per_data_frame_sent`)."""
        if isinstance(frame, RstStreamFrame):
            bucket, what = self._resets, "stream resets"
        elif isinstance(frame, SettingsFrame | PingFrame):
            if "ACK" in frame.flags:
                return
            bucket = self._control
            what = "SETTINGS frames" if isinstance(frame, SettingsFrame) else "PING frames"
        elif isinstance(frame, PriorityFrame | ExtensionFrame):
            bucket, what = self._control, "control frames"
        elif isinstance(frame, DataFrame):
            if frame.data or "END_STREAM" in frame.flags:
                return
            bucket, what = self._control, "empty DATA frames"
        elif isinstance(frame, WindowUpdateFrame):
            self._window_updates += 1
            lim = self._limits
            allowed = lim.window_update_burst + lim.window_updates_per_data_frame * self._data_frames_sent
            if self._window_updates > allowed:
                raise _OverBudget("too many WINDOW_UPDATE frames")
            return
        else:
            return
        if not bucket.take(self._now):
            raise _OverBudget(f"too many {what}")

    def _refused_stream(self) -> None:
        """A stream over the concurrency limit is refused; refusals share the reset budget (the
        h2 crate's "limit error resets")."""
        if not self._resets.take(self._now):
            raise _OverBudget("too many refused streams")

    def _over_budget(self, bucket: TokenBucket, now: float, what: str) -> bool:
        if bucket.take(now):
            return False
        self._goaway(ErrorCodes.ENHANCE_YOUR_CALM, f"too many {what}")
        return True

    def _dispatch(self, ev: h2.events.Event, now: float, events: list[Event]) -> None:
        if isinstance(ev, h2.events.DataReceived):
            sid = ev.stream_id
            length = ev.flow_controlled_length or 0
            if sid in self._out:
                events.append(StreamData(sid, ev.data or b"", length))
            elif length:
                self._h2.acknowledge_received_data(length, sid)
        elif isinstance(ev, h2.events.StreamEnded):
            if ev.stream_id in self._out:
                events.append(StreamEnd(ev.stream_id))
                out = self._out[ev.stream_id]
                self._remote_ended.add(ev.stream_id)
                if not out.chunks and not out.end_pending and self._h2_local_closed(ev.stream_id):
                    self._forget(ev.stream_id)
        elif isinstance(ev, h2.events.StreamReset):
            known = self._out.pop(ev.stream_id, None) is not None
            self._remote_ended.discard(ev.stream_id)
            if known:
                events.append(StreamReset(ev.stream_id, int(ev.error_code or 0), bool(ev.remote_reset)))
        elif isinstance(ev, h2.events.WindowUpdated):
            self._flush_all(events)
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            max_streams = self._h2.remote_settings.max_concurrent_streams
            events.append(PeerSettingsChanged(int(max_streams)))
            self._flush_all(events)
        elif isinstance(ev, h2.events.PingAckReceived):
            events.append(PingAcknowledged(bytes(ev.ping_data or b"")))
        elif isinstance(ev, h2.events.ConnectionTerminated):
            reason = (ev.additional_data or b"").decode("utf-8", "replace")
            events.append(
                self._goaway(
                    int(ev.error_code or 0), reason or "peer sent GOAWAY", True, ev.last_stream_id
                )
            )
        else:
            self._dispatch_role(ev, now, events)

    def _h2_local_closed(self, stream_id: int) -> bool:
        stream = self._h2.streams.get(stream_id)
        return stream is None or stream.closed

    def _dispatch_role(self, ev: h2.events.Event, now: float, events: list[Event]) -> None:
        """Role-specific events (request on the server, response on the client)."""


def _header_map(headers: list[Header]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in headers:
        out.setdefault(bytes(key), bytes(value))
    return out


class HboneServerConnection(_HboneConnection):
    """Server side of an HBONE connection (port 15008, §1.4)."""

    def __init__(
        self, settings: HboneSettings = SERVER_SETTINGS, limits: AbuseLimits | None = None
    ) -> None:
        super().__init__(client_side=False, settings=settings, limits=limits or AbuseLimits())

    def respond(self, stream_id: int, status: int = 200, headers: list[Header] | None = None) -> None:
        """Answer a `ConnectRequest`. §1.4 step 9: the 200 goes out only after the upstream connect
        succeeded; any other status ends the stream."""
        if stream_id not in self._out or self.closed is not None:
            return
        response = [(b":status", str(status).encode()), *(headers or [])]
        ok = status == 200
        try:
            self._h2.send_headers(stream_id, response, end_stream=not ok)
        except _PROTOCOL_ERRORS:
            self._forget(stream_id)
            return
        if not ok:
            self._forget(stream_id)
            # RFC 9113 §8.1: a complete early response may be followed by RST_STREAM(NO_ERROR) so
            # the peer stops sending; it also frees the concurrency slot, which a peer that never
            # half-closes refused streams would otherwise fill (200 refusals → PROTOCOL_ERROR).
            if not self._h2_local_closed(stream_id):
                with contextlib.suppress(*_PROTOCOL_ERRORS):
                    self._h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)

    def reject(self, stream_id: int, status: int, reason: str) -> None:
        """Refuse a stream with `status`; `reason` is for the shell's log (ztunnel sends no body)."""
        del reason
        self.respond(stream_id, status)

    def _refuse(self, stream_id: int, status: int, reason: str, now: float, events: list[Event]) -> None:
        self._out[stream_id] = _Outbound()
        self.respond(stream_id, status)
        events.append(RequestRejected(stream_id, status, reason))
        self._over_budget(self._resets, now, "refused streams")

    def _dispatch_role(self, ev: h2.events.Event, now: float, events: list[Event]) -> None:
        if isinstance(ev, h2.events.RequestReceived) and ev.stream_id is not None:
            sid = ev.stream_id
            headers = [(bytes(k), bytes(v)) for k, v in (ev.headers or [])]
            hmap = _header_map(headers)
            method = hmap.get(b":method", b"")
            if method != b"CONNECT":
                name = method.decode("ascii", "backslashreplace")
                self._refuse(sid, 400, f"expected method CONNECT, got {name}", now, events)
                return
            try:
                authority = parse_authority(hmap.get(b":authority", b""))
            except AuthorityError as exc:
                self._refuse(sid, 400, exc.message, now, events)
                return
            self._out[sid] = _Outbound()
            extra = tuple(h for h in headers if not h[0].startswith(b":"))
            events.append(ConnectRequest(sid, authority, extra))


class HboneClientConnection(_HboneConnection):
    """Client side of an HBONE connection (the pool's unit, §1.5)."""

    def __init__(
        self,
        settings: HboneSettings = CLIENT_SETTINGS,
        limits: AbuseLimits | None = None,
        max_streams: int = 100,
    ) -> None:
        self._max_streams = max_streams
        self._opened = 0
        super().__init__(client_side=True, settings=settings, limits=limits or AbuseLimits())

    def open_connect(self, authority: HboneAuthority | str, headers: list[Header] | None = None) -> int:
        """Send a CONNECT for `authority` (`ip:port`, §1.2); returns the new stream id."""
        if self.closed is not None:
            raise h2.exceptions.ProtocolError("connection is closed")
        sid = self._h2.get_next_available_stream_id()
        self._h2.send_headers(sid, connect_request_headers(authority, headers))
        self._out[sid] = _Outbound()
        self._opened += 1
        return sid

    @property
    def capacity(self) -> int:
        """Streams this connection may still open: ≤ our cap, ≤ the server's SETTINGS (§1.5)."""
        if self.closed is not None:
            return 0
        peer_max = int(self._h2.remote_settings.max_concurrent_streams)
        # `len(self._out)`, not h2's `open_outbound_streams`, which walks every stream of the
        # connection: the pool asks each connection per new tunnel, so with 10,000 tunnels held a
        # connect visited all 10,000 (tests/reliability/test_load.py). A stream leaves `_out` when
        # it is reset or both sides ended it, which is when h2 closes it too.
        return max(0, min(self._max_streams, peer_max) - len(self._out))

    def _dispatch_role(self, ev: h2.events.Event, now: float, events: list[Event]) -> None:
        if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id is not None:
            sid = ev.stream_id
            headers = [(bytes(k), bytes(v)) for k, v in (ev.headers or [])]
            try:
                status = int(_header_map(headers).get(b":status", b"0"))
            except ValueError:
                status = 0
            if sid not in self._out:
                return
            extra = tuple(h for h in headers if not h[0].startswith(b":"))
            events.append(ConnectResponse(sid, status, extra))
            if status != 200:
                self.reset_stream(sid, ErrorCodes.NO_ERROR)
