"""Header hygiene (security.md §1b) and the upstream exchange's keep-alive bookkeeping."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from zerotunnel.waypoint.http import (
    HttpRequest,
    StaleConnection,
    UpstreamHttp,
    connection_tokens,
    exchange,
    forwarding_headers,
    sanitize_request_headers,
    sanitize_response_headers,
)

NAMES = st.sampled_from(
    [
        "x-forwarded-client-cert",
        "X-Envoy-Original-Path".lower(),
        "x-istio-attributes",
        "x-zerotunnel-id",
        "x-spiffe-id",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "upgrade",
        "te",
        "host",
        "content-length",
        "x-forwarded-proto",
        "x-forwarded-for",
        "x-request-id",
        "accept",
        "x-custom",
        "cookie",
        "x-hop",
    ]
)


@settings(max_examples=100)
@given(st.lists(st.tuples(NAMES, st.text(alphabet="abc, ", max_size=8)), max_size=12))
def test_no_identity_or_hop_header_survives(headers: list[tuple[str, str]]) -> None:
    out = sanitize_request_headers(headers)
    named = connection_tokens(headers)
    for name, _ in out:
        assert name not in {
            "x-forwarded-client-cert",
            "x-spiffe-id",
            "connection",
            "keep-alive",
            "transfer-encoding",
            "upgrade",
            "te",
            "host",
            "content-length",
            "x-forwarded-proto",
            "x-forwarded-for",
            "x-request-id",
        }
        assert not name.startswith(("x-envoy-", "x-istio-", "x-zerotunnel-"))
        assert name not in named
    # everything else is kept, in order
    kept = [(k, v) for k, v in headers if k in ("accept", "x-custom", "cookie", "x-hop") and k not in named]
    assert out == kept


def test_forwarding_headers_set_once() -> None:
    request = HttpRequest(
        "GET", "/", [("x-forwarded-for", "1.2.3.4"), ("x-request-id", "abc"), ("x-forwarded-proto", "https")]
    )
    out = dict(forwarding_headers(request, "10.0.0.9", proto="http"))
    assert out == {"x-forwarded-proto": "http", "x-forwarded-for": "1.2.3.4, 10.0.0.9", "x-request-id": "abc"}
    fresh = dict(forwarding_headers(HttpRequest("GET", "/", []), None, proto="https"))
    assert fresh["x-forwarded-proto"] == "https" and len(fresh["x-request-id"]) == 36
    assert "x-forwarded-for" not in fresh


def test_response_hop_headers_removed() -> None:
    out = sanitize_response_headers(
        [
            ("connection", "x-a"),
            ("x-a", "1"),
            ("transfer-encoding", "chunked"),
            ("content-type", "text/plain"),
        ]
    )
    assert out == [("content-type", "text/plain")]


class Pipe:
    """An in-memory byte channel whose far side is scripted (a unit test of the exchange only)."""

    def __init__(self, replies: list[bytes]) -> None:
        self.replies = replies
        self.sent = b""
        self.eof = False

    async def recv(self) -> bytes:
        await asyncio.sleep(0)
        return self.replies.pop(0) if self.replies else b""

    async def send(self, data: bytes) -> None:
        self.sent += data

    def send_eof(self) -> None:
        self.eof = True

    def abort(self, reason: str) -> None:
        self.eof = True


async def test_exchange_keepalive_and_stale_detection() -> None:
    pipe = Pipe([b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"])
    up = UpstreamHttp(pipe)
    response = await exchange(up, "GET", "/a", "h", [("x", "1")], b"")
    assert (response.status, response.body) == (200, b"ok")
    assert pipe.sent.startswith(b"GET /a HTTP/1.1\r\nhost: h\r\nx: 1\r\n")
    assert up.recycle()
    # the peer closed the kept-alive connection before answering: a retryable StaleConnection
    try:
        await exchange(up, "GET", "/b", "h", [], b"")
    except StaleConnection:
        pass
    else:
        raise AssertionError("expected StaleConnection")


async def test_exchange_chunked_response_and_post_length() -> None:
    pipe = Pipe([b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n", b"0\r\n\r\n"])
    response = await exchange(pipe, "POST", "/p", "h", [], b"")
    assert (response.status, response.body) == (201, b"abc")
    assert b"content-length: 0" in pipe.sent
