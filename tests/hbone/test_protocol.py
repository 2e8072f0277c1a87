from __future__ import annotations

import h2.config
import h2.connection
import h2.events
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zerotunnel.hbone.authority import HboneAuthority
from zerotunnel.hbone.events import (
    ConnectionClosed,
    ConnectRequest,
    ConnectResponse,
    Event,
    PeerSettingsChanged,
    RequestRejected,
    StreamData,
    StreamDrained,
    StreamEnd,
    StreamReset,
)
from zerotunnel.hbone.protocol import AbuseLimits, HboneClientConnection, HboneServerConnection

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def pump(c: HboneClientConnection, s: HboneServerConnection) -> tuple[list[Event], list[Event]]:
    """Exchange bytes until quiet; returns (client events, server events)."""
    ce: list[Event] = []
    se: list[Event] = []
    for _ in range(100):
        a = c.data_to_send()
        if a:
            se += s.receive_data(a)
        b = s.data_to_send()
        if b:
            ce += c.receive_data(b)
        if not a and not b:
            break
    return ce, se


def opened(authority: str = "10.0.0.2:8080") -> tuple[HboneClientConnection, HboneServerConnection, int]:
    c, s = HboneClientConnection(), HboneServerConnection()
    sid = c.open_connect(authority, [(b"traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-00")])
    ce, se = pump(c, s)
    req = [e for e in se if isinstance(e, ConnectRequest)]
    assert len(req) == 1 and req[0].stream_id == sid
    assert req[0].authority == HboneAuthority.from_ip("10.0.0.2", 8080)
    assert req[0].header(b"traceparent") is not None
    assert PeerSettingsChanged(200) in ce
    s.respond(sid, 200)
    ce, _ = pump(c, s)
    assert [e for e in ce if isinstance(e, ConnectResponse)] == [ConnectResponse(sid, 200, ())]
    return c, s, sid


def test_settings_match_istio() -> None:
    c, s = HboneClientConnection(), HboneServerConnection()
    pump(c, s)
    assert s._h2.remote_settings.initial_window_size == 4 * 1024 * 1024
    assert s._h2.remote_settings.max_frame_size == 1024 * 1024
    assert s._h2.remote_settings.max_header_list_size == 16 * 1024
    assert s._h2.remote_settings.enable_push == 0
    assert c._h2.remote_settings.max_concurrent_streams == 200
    assert c._h2.remote_settings.max_header_list_size == 64 * 1024
    # connection window 16 MiB both ways
    assert s._h2.outbound_flow_control_window == 16 * 1024 * 1024
    assert c._h2.outbound_flow_control_window == 16 * 1024 * 1024


def test_bytes_both_ways_and_half_close() -> None:
    c, s, sid = opened()
    c.send_data(sid, b"hello")
    c.end_stream(sid)
    _, se = pump(c, s)
    assert next(e for e in se if isinstance(e, StreamData)).data == b"hello"
    assert StreamEnd(sid) in se
    s.send_data(sid, b"world" * 1000)
    s.end_stream(sid)
    ce, _ = pump(c, s)
    assert b"".join(e.data for e in ce if isinstance(e, StreamData)) == b"world" * 1000
    assert StreamEnd(sid) in ce
    assert c.open_streams == 0 and s.open_streams == 0
    assert c.capacity == 100


def test_flow_control_backpressure_until_acknowledged() -> None:
    c, s, sid = opened()
    big = b"x" * (6 * 1024 * 1024)
    c.send_data(sid, big)
    _, se = pump(c, s)
    got = sum(len(e.data) for e in se if isinstance(e, StreamData))
    assert got == 4 * 1024 * 1024  # the stream window, nothing more until the app consumes
    assert c.buffered(sid) == len(big) - got
    for e in se:
        if isinstance(e, StreamData):
            s.acknowledge(sid, e.flow_controlled_length)
    ce, se = pump(c, s)
    assert sum(len(e.data) for e in se if isinstance(e, StreamData)) == len(big) - got
    assert StreamDrained(sid) in ce
    assert c.buffered(sid) == 0


def test_non_connect_is_400() -> None:
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    raw.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a:1")])
    s = HboneServerConnection()
    ev = s.receive_data(raw.data_to_send())
    assert RequestRejected(1, 400, "expected method CONNECT, got GET") in ev
    resp = [e for e in raw.receive_data(s.data_to_send()) if isinstance(e, h2.events.ResponseReceived)]
    assert dict(resp[0].headers)[b":status"] == b"400"


def test_bad_authority_is_400() -> None:
    c, s = HboneClientConnection(), HboneServerConnection()
    sid = c.open_connect("nope")
    ce, se = pump(c, s)
    rej = [e for e in se if isinstance(e, RequestRejected)]
    assert rej == [RequestRejected(sid, 400, "no valid authority pseudo header: 'nope'")]
    assert ConnectResponse(sid, 400, ()) in ce
    assert c.open_streams == 0


def test_reject_ends_stream_and_client_sees_status() -> None:
    c, s = HboneClientConnection(), HboneServerConnection()
    sid = c.open_connect("10.0.0.2:80")
    pump(c, s)
    s.reject(sid, 401, "connection closed due to policy rejection: x")
    ce, _ = pump(c, s)
    assert ConnectResponse(sid, 401, ()) in ce
    assert c.open_streams == 0 and s.open_streams == 0
    assert c.capacity == 100


def test_reset_propagates() -> None:
    c, s, sid = opened()
    c.reset_stream(sid)
    _, se = pump(c, s)
    assert StreamReset(sid, ErrorCodes.CANCEL, True) in se


def test_capacity_capped_by_peer_settings() -> None:
    from zerotunnel.hbone.protocol import HboneSettings

    c = HboneClientConnection()
    s = HboneServerConnection(settings=HboneSettings(max_concurrent_streams=3))
    pump(c, s)
    assert c.capacity == 3
    for _ in range(3):
        c.open_connect("10.0.0.2:80")
    assert c.capacity == 0


def _raw_client() -> h2.connection.H2Connection:
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    return raw


def test_rapid_reset_goaway() -> None:
    raw = _raw_client()
    s = HboneServerConnection(limits=AbuseLimits(reset_burst=50, reset_rate=1))
    events: list[Event] = []
    for i in range(200):
        sid = 1 + 2 * i
        raw.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.0.0.2:80")])
        raw.reset_stream(sid)
        events += s.receive_data(raw.data_to_send(), now=0.0)
        if s.closed:
            break
    closed = [e for e in events if isinstance(e, ConnectionClosed)]
    assert closed and closed[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert "stream resets" in closed[0].reason
    assert b"\x07" in s.data_to_send()  # a GOAWAY frame (type 7) went out


def test_reset_budget_refills_over_time() -> None:
    raw = _raw_client()
    s = HboneServerConnection(limits=AbuseLimits(reset_burst=10, reset_rate=10))
    for i in range(100):
        sid = 1 + 2 * i
        raw.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.0.0.2:80")])
        raw.reset_stream(sid)
        s.receive_data(raw.data_to_send(), now=i * 0.5)
    assert s.closed is None


def test_ping_flood_goaway() -> None:
    s = HboneServerConnection()
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    data = PREFACE + SettingsFrame(0).serialize() + ping * 300
    ev = s.receive_data(data, now=1.0)
    assert isinstance(ev[-1], ConnectionClosed) and ev[-1].error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_settings_flood_goaway() -> None:
    s = HboneServerConnection()
    data = PREFACE + b"".join(SettingsFrame(0).serialize() for _ in range(300))
    ev = s.receive_data(data, now=1.0)
    assert isinstance(ev[-1], ConnectionClosed) and "SETTINGS" in ev[-1].reason


def test_continuation_flood_goaway() -> None:
    s = HboneServerConnection()
    raw = _raw_client()
    raw.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.2:80")])
    start = raw.data_to_send()
    h = HeadersFrame(3)
    h.data = b"\x00" * 1000
    frames = [h.serialize()]
    for _ in range(100):
        cf = ContinuationFrame(3)
        cf.data = b"\x00" * 3000
        frames.append(cf.serialize())
    ev = s.receive_data(start + b"".join(frames))
    closed = [e for e in ev if isinstance(e, ConnectionClosed)]
    assert closed and closed[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert "header block" in closed[0].reason


def test_oversized_header_list_goaway() -> None:
    c = HboneClientConnection()
    s = HboneServerConnection()
    pump(c, s)
    c.open_connect("10.0.0.2:80", [(b"x-big", b"a" * (70 * 1024))])
    _, se = pump(c, s)
    assert any(isinstance(e, ConnectionClosed) for e in se)
    assert not any(isinstance(e, ConnectRequest) for e in se)


def test_peer_goaway_reported() -> None:
    c, s, _ = opened()
    s.close(reason="drain")
    ce, _ = pump(c, s)
    assert any(isinstance(e, ConnectionClosed) and e.remote and e.reason == "drain" for e in ce)
    assert c.capacity == 0


def test_rst_frame_for_unknown_stream_is_contained() -> None:
    s = HboneServerConnection()
    ev = s.receive_data(PREFACE + SettingsFrame(0).serialize() + RstStreamFrame(9).serialize())
    assert ev == [] or isinstance(ev[-1], ConnectionClosed)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_arbitrary_bytes_never_raise(junk: bytes, with_preface: bool) -> None:
    s = HboneServerConnection()
    data = (PREFACE + SettingsFrame(0).serialize() + junk) if with_preface else junk
    ev = s.receive_data(data)
    ev += s.receive_data(junk)
    for e in ev:
        assert isinstance(
            e,
            (
                ConnectRequest,
                RequestRejected,
                StreamData,
                StreamEnd,
                StreamReset,
                PeerSettingsChanged,
                ConnectionClosed,
                StreamDrained,
            ),
        )
    s.data_to_send()


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 9), st.integers(0, 255), st.integers(0, 15), st.binary(max_size=64)),
        max_size=12,
    )
)
def test_arbitrary_frames_never_raise(frames: list[tuple[int, int, int, bytes]]) -> None:
    s = HboneServerConnection()
    data = bytearray(PREFACE + SettingsFrame(0).serialize())
    for ftype, flags, sid, payload in frames:
        data += len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload
    s.receive_data(bytes(data))
    s.data_to_send()


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 9), st.integers(0, 255), st.integers(0, 7), st.binary(max_size=64)),
        max_size=12,
    )
)
def test_client_survives_arbitrary_server_frames(frames: list[tuple[int, int, int, bytes]]) -> None:
    """A malicious server must not crash the client either."""
    c = HboneClientConnection()
    c.open_connect("10.0.0.2:80")
    c.data_to_send()
    data = bytearray(SettingsFrame(0).serialize())
    for ftype, flags, sid, payload in frames:
        data += len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload
    c.receive_data(bytes(data))
    c.data_to_send()
    assert c.capacity >= 0


def test_stream_over_the_concurrency_limit_is_refused_alone() -> None:
    """RFC 9113 §5.1.2 (and ztunnel): the stream past SETTINGS_MAX_CONCURRENT_STREAMS gets
    RST_STREAM(REFUSED_STREAM); the connection and the streams already open carry on, and a
    slot freed later can be used again."""
    from zerotunnel.hbone.protocol import HboneSettings

    raw = _raw_client()
    s = HboneServerConnection(settings=HboneSettings(max_concurrent_streams=3))
    s.receive_data(raw.data_to_send(), 0.0)
    raw.receive_data(s.data_to_send())
    connect = [(":method", "CONNECT"), (":authority", "10.0.0.2:80")]
    for sid in (1, 3, 5):
        raw.send_headers(sid, connect)
    # h2 will not send a 4th itself; the frame is built by hand with the client's HPACK encoder
    fourth = HeadersFrame(7, raw.encoder.encode(connect), flags=["END_HEADERS"]).serialize()
    raw.highest_outbound_stream_id = 7
    events = s.receive_data(raw.data_to_send() + fourth, 0.0)
    assert [e.stream_id for e in events if isinstance(e, ConnectRequest)] == [1, 3, 5]
    assert s.closed is None
    out = s.data_to_send()
    assert RstStreamFrame(7, error_code=ErrorCodes.REFUSED_STREAM).serialize() in out
    raw.receive_data(out)
    # the open streams still work, and a freed slot is usable again (HPACK stayed in step)
    s.respond(1, 200)
    raw.receive_data(s.data_to_send())
    raw.send_data(1, b"ping", end_stream=True)
    events = s.receive_data(raw.data_to_send(), 0.0)
    assert StreamData(1, b"ping", 4) in events
    s.send_data(1, b"", end_stream=True)
    raw.receive_data(s.data_to_send())
    raw.send_headers(9, [*connect, ("x-after", "refusal")])
    events = s.receive_data(raw.data_to_send(), 0.0)
    req = [e for e in events if isinstance(e, ConnectRequest)]
    assert [e.stream_id for e in req] == [9] and req[0].header(b"x-after") == b"refusal"


def test_refusals_share_the_reset_budget() -> None:
    from zerotunnel.hbone.protocol import HboneSettings

    raw = _raw_client()
    s = HboneServerConnection(settings=HboneSettings(max_concurrent_streams=1),
                              limits=AbuseLimits(reset_burst=20, reset_rate=1))
    s.receive_data(raw.data_to_send(), 0.0)
    for i in range(100):
        raw.send_headers(1 + 2 * i, [(":method", "CONNECT"), (":authority", "10.0.0.2:80")])
    s.receive_data(raw.data_to_send(), 0.0)
    assert s.closed is not None and s.closed.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert "refused streams" in s.closed.reason


def test_per_tunnel_headers_are_not_indexed() -> None:
    """traceparent/forwarded change on every tunnel: sent as never-indexed literals (no Huffman), so
    the HPACK dynamic table keeps only what repeats, and the server still reads every value."""
    c, s = HboneClientConnection(), HboneServerConnection()
    pump(c, s)
    seen = []
    for i in range(50):
        tp = b"00-" + b"%032x" % i + b"-" + b"%016x" % i + b"-01"
        c.open_connect("10.0.0.2:80", [(b"baggage", b"k8s.namespace.name=ns"),
                                       (b"forwarded", b"for=10.0.0.1:%d" % (1000 + i)), (b"traceparent", tp)])
        _, se = pump(c, s)
        seen += [(e.header(b"traceparent"), e.header(b"forwarded"))
                 for e in se if isinstance(e, ConnectRequest)]
    assert seen == [(b"00-" + b"%032x" % i + b"-" + b"%016x" % i + b"-01", b"for=10.0.0.1:%d" % (1000 + i))
                    for i in range(50)]
    names = {bytes(n) for n, _ in c._h2.encoder.header_table.dynamic_entries}
    assert b"traceparent" not in names and b"forwarded" not in names
    assert b"baggage" in names
