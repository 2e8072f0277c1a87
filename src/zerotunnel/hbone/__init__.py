"""zerotunnel.hbone: HBONE (HTTP/2 CONNECT over mTLS, spec/istio-ambient.md §1) as a sans-IO core.

Bytes in → events, calls → bytes out; the node proxy, waypoint and gateway shells do the I/O.
"""

from __future__ import annotations

from zerotunnel.hbone.authority import AuthorityError, HboneAuthority, parse_authority
from zerotunnel.hbone.events import (
    ConnectionClosed,
    ConnectRequest,
    ConnectResponse,
    Event,
    PeerSettingsChanged,
    PingAcknowledged,
    RequestRejected,
    StreamData,
    StreamDrained,
    StreamEnd,
    StreamReset,
)
from zerotunnel.hbone.headers import (
    Baggage,
    build_request_headers,
    connect_request_headers,
    format_forwarded,
    format_traceparent,
    parse_baggage,
    parse_forwarded_host,
)
from zerotunnel.hbone.protocol import (
    CLIENT_SETTINGS,
    SERVER_SETTINGS,
    AbuseLimits,
    HboneClientConnection,
    HboneServerConnection,
    HboneSettings,
)

__all__ = [
    "CLIENT_SETTINGS",
    "SERVER_SETTINGS",
    "AbuseLimits",
    "AuthorityError",
    "Baggage",
    "ConnectRequest",
    "ConnectResponse",
    "ConnectionClosed",
    "Event",
    "HboneAuthority",
    "HboneClientConnection",
    "HboneServerConnection",
    "HboneSettings",
    "PeerSettingsChanged",
    "PingAcknowledged",
    "RequestRejected",
    "StreamData",
    "StreamDrained",
    "StreamEnd",
    "StreamReset",
    "build_request_headers",
    "connect_request_headers",
    "format_forwarded",
    "format_traceparent",
    "parse_authority",
    "parse_baggage",
    "parse_forwarded_host",
]
