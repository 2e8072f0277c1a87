"""The lean DATA path (`HboneSettings.lean_data`) against h2 itself: for any sequence of frames —
valid, out of state, over the window, padded, interleaved with header blocks, cut at any byte —
a lean connection must produce the same events and the same bytes on the wire as one that runs
every frame through h2 (performance.md §4: a lean path is acceptable only if it stays
spec-correct and fuzzed)."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import hpack
from hyperframe.frame import Frame, PingFrame, SettingsFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zerotunnel.hbone.events import ConnectRequest, Event, StreamData
from zerotunnel.hbone.protocol import SERVER_SETTINGS, HboneClientConnection, HboneServerConnection

Op = tuple[Any, ...]
FRAME_SIZE_ERROR = 6
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Small receive windows so a sequence of a few frames can overrun a stream or the connection.
LEAN = dataclasses.replace(SERVER_SETTINGS, stream_window=100_000, connection_window=150_000)
H2_ONLY = dataclasses.replace(LEAN, lean_data=False)
# The client's SETTINGS: small send windows for the server, so its sends block and resume.
SMALL_WINDOWS = {SettingsFrame.INITIAL_WINDOW_SIZE: 65_535}


class _Counting(HboneServerConnection):
    """Counts DATA frames delivered past h2, so the tests know the lean path really ran."""

    def __init__(self, lean: bool) -> None:
        super().__init__(settings=LEAN if lean else H2_ONLY)
        self.lean_frames = 0

    def _lean_data_frame(self, *args: Any, **kwargs: Any) -> bool:
        took = super()._lean_data_frame(*args, **kwargs)
        self.lean_frames += took
        return took


def _frame(f: Frame) -> bytes:
    return bytes(f.serialize())


def _raw(ftype: int, flags: int, sid: int, body: bytes) -> bytes:
    """Any frame, also on stream 0 where hyperframe refuses to build one."""
    n = len(body)
    return struct.pack(">BHBBL", n >> 16, n & 0xFFFF, ftype, flags, sid) + body


def _headers(
    encoder: hpack.Encoder, sid: int, *, end_headers: bool = True, extra: bool = False
) -> list[bytes]:
    fields = [(":method", "CONNECT"), (":authority", "10.0.0.2:8080")]
    if extra:
        fields.append(("content-length", "5"))
    block = encoder.encode(fields)
    if end_headers:
        return [_raw(0x1, 0x4, sid, block)]
    half = len(block) // 2
    return [_raw(0x1, 0x0, sid, block[:half]), _raw(0x9, 0x4, sid, block[half:])]


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("open"), st.booleans(), st.booleans()),
        st.tuples(st.just("data"), st.integers(0, 7), st.integers(0, 70_000),
                  st.sampled_from([0, 0, 0, 0x1, 0x8, 0x9, 0x20])),
        st.tuples(st.just("rst"), st.integers(0, 7)),
        st.tuples(st.just("wu"), st.integers(0, 7), st.integers(1, 100_000)),
        st.tuples(st.just("ping"),),
        st.tuples(st.just("settings"), st.integers(0, 100_000)),
        st.tuples(st.just("partial_headers"), st.integers(0, 7)),
        st.tuples(st.just("junk"), st.binary(min_size=1, max_size=20)),
        st.tuples(st.just("ack"),),
        st.tuples(st.just("respond"), st.integers(0, 7), st.sampled_from([200, 200, 503])),
        st.tuples(st.just("send"), st.integers(0, 7), st.integers(0, 300_000), st.booleans()),
        st.tuples(st.just("reset"), st.integers(0, 7)),
    ),
    min_size=1,
    max_size=30,
)


def _client_bytes(op: Op, encoder: hpack.Encoder, opened: list[int]) -> bytes:
    """Wire bytes for one client-side op; stream slots index into the ids opened so far plus a
    few never opened (odd and even)."""
    slots = [*opened, 99, 2, 0]

    def sid(i: int) -> int:
        return slots[int(i) % len(slots)]

    kind = op[0]
    if kind == "open":
        new = (opened[-1] + 2) if opened else 1
        opened.append(new)
        return b"".join(_headers(encoder, new, end_headers=not op[1], extra=bool(op[2])))
    if kind == "data":
        _, i, size, flags = op
        body = bytes([0x61 + len(opened) % 26]) * int(size)
        if int(flags) & 0x8:
            body = b"\x03" + body + b"\x00\x00\x00"
        return _raw(0x0, int(flags), sid(i), body)
    if kind == "rst":
        return _raw(0x3, 0, sid(op[1]), struct.pack(">L", 8))
    if kind == "wu":
        return _raw(0x8, 0, sid(op[1]), struct.pack(">L", int(op[2])))
    if kind == "ping":
        return _frame(PingFrame(0, b"12345678"))
    if kind == "settings":
        return _frame(SettingsFrame(0, {SettingsFrame.INITIAL_WINDOW_SIZE: int(op[1])}))
    if kind == "partial_headers":
        return _headers(encoder, sid(op[1]), end_headers=False)[0]
    if kind == "junk":
        return bytes(op[1])
    return b""


def _server_op(conn: _Counting, op: Op, pending: list[Event], opened: list[int]) -> None:
    slots = [*opened, 99, 2, 0]
    kind = op[0]
    if kind == "ack":
        for e in pending:
            if isinstance(e, StreamData):
                conn.acknowledge(e.stream_id, e.flow_controlled_length)
        pending.clear()
    elif kind == "respond":
        conn.respond(slots[int(op[1]) % len(slots)], int(op[2]))
    elif kind == "send":
        conn.send_data(slots[int(op[1]) % len(slots)], b"z" * int(op[2]), end_stream=bool(op[3]))
    elif kind == "reset":
        conn.reset_stream(slots[int(op[1]) % len(slots)])


def _run(ops: list[Op], cuts: list[int]) -> tuple[_Counting, _Counting]:
    lean, plain = _Counting(True), _Counting(False)
    encoder = hpack.Encoder()
    opened: list[int] = []
    pending: dict[int, list[Event]] = {0: [], 1: []}
    wire = PREFACE + _frame(SettingsFrame(0, SMALL_WINDOWS))
    for step, op in enumerate(ops):
        wire += _client_bytes(op, encoder, opened)
        results = []
        for n, conn in enumerate((lean, plain)):
            # Same bytes, cut at the same places, into both connections.
            events: list[Event] = []
            rest = memoryview(wire)
            for cut in [*cuts[step % len(cuts):], len(wire)]:
                piece, rest = rest[:cut], rest[cut:]
                events += conn.receive_data(bytes(piece), 0.0)
                if not rest:
                    break
            pending[n] += events
            _server_op(conn, op, pending[n], opened)
            if conn.closed is not None:
                # h2 raises on a bad frame and loses the events of the good frames before it in
                # the same read; the lean path handed those frames to h2 in their own call, so
                # it still reports them. Once closed, only the final state must agree.
                events = events[-1:]
            results.append((events, conn.data_to_send(), conn.closed))
        wire = b""
        if lean.closed is not None and lean.closed.error_code == FRAME_SIZE_ERROR and plain.closed is None:
            # The one intended difference: an oversized frame header is refused at once, where h2
            # waits for its whole body (test_oversized_frame_is_refused_on_its_header).
            assert plain._h2.incoming_buffer._data, "h2 should be holding the oversized frame"
            return lean, plain
        assert results[0] == results[1], f"step {step} {op!r}: lean and h2 disagree"
    return lean, plain


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops, cuts=st.lists(st.integers(1, 40_000), min_size=1, max_size=4))
def test_lean_path_matches_h2(ops: list[Op], cuts: list[int]) -> None:
    _run(ops, cuts)


def test_plain_data_frames_take_the_lean_path_and_match_h2() -> None:
    """Without this the differential test could pass with the lean path never taken."""
    ops: list[Op] = [("open", False, False), ("respond", 0, 200)]
    ops += [("data", 0, 1000, 0)] * 40 + [("ack",), ("data", 0, 10, 0x1)]
    lean, plain = _run(ops, [7, 4000])
    assert lean.lean_frames == 40 and plain.lean_frames == 0


def test_window_overrun_on_the_lean_path_is_a_flow_control_goaway() -> None:
    ops: list[Op] = [("open", False, False), ("respond", 0, 200)]
    ops += [("data", 0, 30_000, 0)] * 4  # 120,000 > the 100,000 stream window
    lean, _ = _run(ops, [100_000])
    assert lean.closed is not None and lean.closed.error_code == 3  # FLOW_CONTROL_ERROR
    assert lean.lean_frames == 3


def test_client_side_send_and_receive_match_h2() -> None:
    """The client role: lean frames out (`_send_lean`) are parsed back by an h2-only server, and
    the server's replies come back through the client's lean receive path."""
    c = HboneClientConnection()
    s = HboneServerConnection(settings=dataclasses.replace(SERVER_SETTINGS, lean_data=False))
    sid = c.open_connect("10.0.0.2:8080")
    evs = s.receive_data(c.data_to_send(), 0.0)
    assert any(isinstance(e, ConnectRequest) for e in evs)
    s.respond(sid, 200)
    c.receive_data(s.data_to_send(), 0.0)
    payload = bytes(range(256)) * 1000
    c.send_data(sid, payload)
    got = b"".join(e.data for e in s.receive_data(c.data_to_send(), 0.0) if isinstance(e, StreamData))
    assert got == payload
    s.send_data(sid, payload[::-1])
    back = b"".join(e.data for e in c.receive_data(s.data_to_send(), 0.0) if isinstance(e, StreamData))
    assert back == payload[::-1]


def test_oversized_frame_is_refused_on_its_header() -> None:
    """h2's frame buffer waits for a whole frame before checking its length, so a header that
    announces 16 MiB made it buffer 16 MiB per connection; the lean path refuses the header
    (RFC 9113 §4.2 FRAME_SIZE_ERROR) and keeps nothing."""
    for ftype in (0x0, 0x1, 0x8):
        conn = _Counting(True)
        events = conn.receive_data(PREFACE + _frame(SettingsFrame(0, {})), 0.0)
        header = struct.pack(">BHBBL", 0xFF, 0xFFFF, ftype, 0, 1)
        events = conn.receive_data(header + b"x" * 1000, 0.0)
        assert conn.closed is not None and conn.closed.error_code == FRAME_SIZE_ERROR, ftype
        assert events[-1] == conn.closed
        assert len(conn._partial) == 0
