"""Fast, sans-IO regression tests for the HTTP/2 limits this suite added or fixed (zerotunnel.hbone).

The real-socket versions with a concurrent legitimate client are in test_h2_abuse.py (slow); these
pin each fix in a few milliseconds, and check the other side of every limit: an honest peer,
including a bulk transfer that makes the receiver send many WINDOW_UPDATEs, is never cut off.
"""

from __future__ import annotations

import time

import hpack
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from zerotunnel.hbone import ConnectionClosed, ConnectRequest, StreamData
from zerotunnel.hbone.protocol import AbuseLimits, HboneClientConnection, HboneServerConnection

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize()
ENHANCE_YOUR_CALM = 0xB


def _connect(sid: int, authority: str = "127.0.0.1:8080") -> bytes:
    block = hpack.Encoder().encode([(":method", "CONNECT"), (":authority", authority)])
    return HeadersFrame(sid, block, flags=["END_HEADERS"]).serialize()


def _frames(data: bytes) -> list[Frame]:
    out, pos = [], 0
    while pos + 9 <= len(data):
        frame, length = Frame.parse_frame_header(memoryview(data[pos : pos + 9]))
        frame.parse_body(memoryview(data[pos + 9 : pos + 9 + length]))
        out.append(frame)
        pos += 9 + length
    return out


def _goaway(server: HboneServerConnection) -> GoAwayFrame | None:
    return next((f for f in _frames(server.data_to_send()) if isinstance(f, GoAwayFrame)), None)


def test_rapid_reset_stops_inside_one_read() -> None:
    """10,000 HEADERS+RST_STREAM pairs in one read: the budget stops h2 at the frame that exhausts
    it (was: h2 parsed all 10,000 first, 1.3 s on the event loop), and no CONNECT past it surfaces."""
    server = HboneServerConnection()
    server.data_to_send()
    attack = b"".join(_connect(2 * i + 1) + RstStreamFrame(2 * i + 1, error_code=8).serialize()
                      for i in range(10_000))
    t0 = time.perf_counter()
    events = server.receive_data(PREFACE + attack, 0.0)
    took = time.perf_counter() - t0
    goaway = _goaway(server)
    assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
    assert bytes(goaway.additional_data) == b"too many stream resets"
    assert isinstance(events[-1], ConnectionClosed)
    assert sum(isinstance(e, ConnectRequest) for e in events) <= AbuseLimits().reset_burst + 1
    assert took < 1.0, took
    # h2 itself stopped there: it never saw the streams after the budget ran out
    assert server._h2.highest_inbound_stream_id <= 2 * (AbuseLimits().reset_burst + 1) + 1


def test_window_update_flood_is_cut_off() -> None:
    server = HboneServerConnection()
    flood = b"".join(WindowUpdateFrame(0, window_increment=1).serialize() for _ in range(5_000))
    events = server.receive_data(PREFACE + flood, 0.0)
    goaway = _goaway(server)
    assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
    assert bytes(goaway.additional_data) == b"too many WINDOW_UPDATE frames"
    assert isinstance(events[-1], ConnectionClosed)


def test_empty_data_flood_is_cut_off() -> None:
    server = HboneServerConnection()
    flood = _connect(1) + b"".join(DataFrame(1, b"").serialize() for _ in range(5_000))
    server.receive_data(PREFACE + flood, 0.0)
    goaway = _goaway(server)
    assert goaway is not None and bytes(goaway.additional_data) == b"too many empty DATA frames"


def test_empty_data_with_end_stream_is_not_counted() -> None:
    """A half-close is an empty DATA frame with END_STREAM: honest, and never budgeted."""
    server = HboneServerConnection()
    frames = b"".join(_connect(2 * i + 1) + DataFrame(2 * i + 1, b"", flags=["END_STREAM"]).serialize()
                      for i in range(150))
    server.receive_data(PREFACE + frames, 0.0)
    assert server.closed is None


def test_refused_stream_is_reset_so_it_frees_its_slot() -> None:
    """RFC 9113 §8.1: after a complete early response (400) the server sends RST_STREAM(NO_ERROR);
    without it a peer that never half-closes refused streams filled the 200 stream slots."""
    server = HboneServerConnection()
    server.data_to_send()
    server.receive_data(PREFACE + _connect(1, "not-an-authority"), 0.0)
    out = _frames(server.data_to_send())
    assert any(isinstance(f, HeadersFrame) and "END_STREAM" in f.flags for f in out)
    rst = [f for f in out if isinstance(f, RstStreamFrame)]
    assert rst and rst[0].stream_id == 1 and rst[0].error_code == 0
    for i in range(1, 300):  # 300 refusals, one at a time, stay within the streams limit
        server.receive_data(_connect(2 * i + 1, "bad"), float(i))
        server.data_to_send()
    assert server.closed is None


def test_honest_bulk_transfer_with_many_window_updates_is_not_cut_off() -> None:
    """The WINDOW_UPDATE budget grows with the DATA we send: 64 MiB server → client, the client
    acknowledging every frame. The burst is cut to the one connection-window update a client sends
    first, so every later update must be covered by the per-DATA-frame allowance alone."""
    server = HboneServerConnection(limits=AbuseLimits(window_update_burst=1))
    client = HboneClientConnection()
    sid = client.open_connect("127.0.0.1:8080")
    events = server.receive_data(client.data_to_send(), 0.0)
    assert any(isinstance(e, ConnectRequest) for e in events)
    server.respond(sid, 200)
    client.receive_data(server.data_to_send(), 0.0)
    chunk, total, received, updates = b"x" * (256 * 1024), 64 * 1024 * 1024, 0, 0
    sent = 0
    while received < total:
        while sent < total and server.buffered(sid) < 1024 * 1024:
            server.send_data(sid, chunk)
            sent += len(chunk)
        for ev in client.receive_data(server.data_to_send(), 0.0):
            if isinstance(ev, StreamData):
                received += len(ev.data)
                client.acknowledge(sid, ev.flow_controlled_length)
        back = client.data_to_send()
        updates += sum(isinstance(f, WindowUpdateFrame) for f in _frames(back))
        server.receive_data(back, 0.0)
        assert server.closed is None and client.closed is None
    assert received == total and updates > 20
