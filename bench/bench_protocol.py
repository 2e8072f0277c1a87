"""Per-frame cost of the HBONE protocol core, lean DATA path vs every frame through h2.

No sockets, no TLS: a client and a server connection (`zerotunnel.hbone.protocol`) pass small DATA
frames on 64 open streams, as 64 keep-alive connections multiplexed on one pooled HBONE connection do.
Measures, per frame, the sender's `send_data` + `data_to_send`, the receiver's `receive_data` and its
`acknowledge`, with `HboneSettings.lean_data` on and off in the same run (issue 8, performance.md §4).

    .venv/bin/python bench/bench_protocol.py [--messages 3000] [--streams 64] [--size 120]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from zerotunnel.hbone.events import ConnectRequest, StreamData
from zerotunnel.hbone.protocol import (
    CLIENT_SETTINGS,
    SERVER_SETTINGS,
    HboneClientConnection,
    HboneServerConnection,
)


def measure(lean: bool, messages: int, streams: int, size: int) -> dict[str, float]:
    """Microseconds per frame for each step (best of the run: one pass, all steps timed apart)."""
    c = HboneClientConnection(settings=dataclasses.replace(CLIENT_SETTINGS, lean_data=lean))
    s = HboneServerConnection(settings=dataclasses.replace(SERVER_SETTINGS, lean_data=lean))
    s.receive_data(c.data_to_send(), 0.0)
    c.receive_data(s.data_to_send(), 0.0)
    sids = [c.open_connect("10.0.0.1:80") for _ in range(streams)]
    for e in s.receive_data(c.data_to_send(), 0.0):
        if isinstance(e, ConnectRequest):
            s.respond(e.stream_id, 200)
    c.receive_data(s.data_to_send(), 0.0)
    payload = b"x" * size
    send = recv = ack = 0.0
    for _ in range(messages):
        t0 = time.perf_counter()
        for sid in sids:
            c.send_data(sid, payload)
        wire = c.data_to_send()
        t1 = time.perf_counter()
        events = s.receive_data(wire, 0.0)
        t2 = time.perf_counter()
        for e in events:
            if isinstance(e, StreamData):
                s.acknowledge(e.stream_id, e.flow_controlled_length)
        back = s.data_to_send()
        t3 = time.perf_counter()
        c.receive_data(back, 0.0)
        if len(events) != streams:
            raise SystemExit(f"expected {streams} DATA events, got {len(events)}")
        send, recv, ack = send + t1 - t0, recv + t2 - t1, ack + t3 - t2
    frames = messages * streams / 1e6
    return {"send": send / frames, "receive": recv / frames, "acknowledge": ack / frames}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=3000, help="rounds of one frame per stream")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--size", type=int, default=120, help="DATA payload bytes")
    args = ap.parse_args()
    rows = {name: measure(lean, args.messages, args.streams, args.size)
            for name, lean in (("h2 only", False), ("lean DATA path", True))}
    print(f"{args.streams} streams × {args.messages} frames of {args.size} B, µs per frame\n")
    print("| step | h2 only | lean DATA path | speed-up |")
    print("|---|---|---|---|")
    for step in ("send", "receive", "acknowledge"):
        a, b = rows["h2 only"][step], rows["lean DATA path"][step]
        print(f"| {step} | {a:.2f} | {b:.2f} | ×{a / b:.1f} |")


if __name__ == "__main__":
    main()
