"""Load generators run inside the client pod: an open-loop fixed-rate HTTP/1.1 client and an idle holder.

Standalone (stdlib only) so it runs as `ip netns exec <client pod> python bench/loadgen.py ...`.

`latency`: wrk2 is not packaged in Debian, so this is its open-loop core (performance.md §6: fortio
`-qps` / wrk2 `-R` style, with coordinated omission corrected). Request i is *due* at t0 + i/rate;
latency is measured from when it was due, not from when a connection became free, so a stall in the
path shows up in the percentiles instead of silently lowering the offered rate. Requests go over a
few pre-warmed keep-alive connections (Istio's 1.24 runs used 4), one outstanding request each.

`hold`: opens N connections, makes one request on each (so the tunnel is proven end to end and any
lazily created state exists), then leaves them idle until stdin closes. It prints `ready N` once all
are idle, which is when the harness reads the proxies' RSS (issue 8 workload 5).

Output: one JSON object on stdout (latency) or the `ready` line (hold); diagnostics on stderr.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import resource
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field


class LoadgenError(Exception):
    """The target misbehaved (connection closed, unparsable response): the run is void."""


@dataclass(slots=True)
class _Conn:
    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    due: float = 0.0
    busy: bool = False


def _request(host: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: zt-bench\r\n\r\n".encode()


def _response_length(buf: bytearray) -> int | None:
    """Bytes of the first complete response in `buf`, or None while it is incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).decode("latin-1")
    status = head.split("\r\n", 1)[0]
    if not status.startswith("HTTP/1.1 2"):
        raise LoadgenError(f"unexpected response: {status!r}")
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            total = end + 4 + int(value.strip())
            return total if len(buf) >= total else None
    raise LoadgenError("response without Content-Length")


def _connect(host: str, port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _roundtrip(sock: socket.socket, request: bytes) -> None:
    sock.sendall(request)
    buf = bytearray()
    while _response_length(buf) is None:
        chunk = sock.recv(65536)
        if not chunk:
            raise LoadgenError("connection closed before the response")
        buf += chunk


def _percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(p * len(sorted_values)) - 1)]


def run_latency(
    host: str, port: int, path: str, rate: float, duration: float, conns: int
) -> dict[str, float]:
    request = _request(host, path)
    pool = [_Conn(_connect(host, port)) for _ in range(conns)]
    for c in pool:
        for _ in range(3):
            _roundtrip(c.sock, request)
        c.sock.setblocking(False)
    sel = selectors.DefaultSelector()
    for c in pool:
        sel.register(c.sock, selectors.EVENT_READ, c)
    total = int(rate * duration)
    interval = 1.0 / rate
    idle: collections.deque[_Conn] = collections.deque(pool)
    waiting: collections.deque[float] = collections.deque()
    latencies: list[float] = []
    errors = 0
    t0 = time.perf_counter() + 0.01
    issued = 0
    deadline = t0 + duration + 10.0
    while len(latencies) + errors < total:
        now = time.perf_counter()
        if now > deadline:
            break
        while issued < total and t0 + issued * interval <= now:
            waiting.append(t0 + issued * interval)
            issued += 1
        while waiting and idle:
            c = idle.popleft()
            c.due = waiting.popleft()
            c.busy = True
            c.sock.send(request)  # a small request always fits an idle socket's send buffer
        timeout = max(0.0, t0 + issued * interval - time.perf_counter()) if issued < total else 0.05
        for key, _ in sel.select(timeout if not waiting else 0.0):
            c = key.data
            try:
                chunk = c.sock.recv(262144)
            except BlockingIOError:
                continue
            if not chunk:
                raise LoadgenError("server closed a keep-alive connection")
            c.buf += chunk
            n = _response_length(c.buf)
            if n is not None and c.busy:
                latencies.append(time.perf_counter() - c.due)
                del c.buf[:n]
                c.busy = False
                idle.append(c)
    elapsed = time.perf_counter() - t0
    for c in pool:
        c.sock.close()
    latencies.sort()
    ms = [v * 1000.0 for v in latencies]
    return {
        "offered_rps": rate,
        "achieved_rps": len(ms) / elapsed if elapsed > 0 else 0.0,
        "requests": float(len(ms)),
        "missing": float(total - len(ms)),
        "p50_ms": _percentile(ms, 0.50),
        "p90_ms": _percentile(ms, 0.90),
        "p99_ms": _percentile(ms, 0.99),
        "p999_ms": _percentile(ms, 0.999),
        "max_ms": ms[-1] if ms else math.nan,
        "mean_ms": sum(ms) / len(ms) if ms else math.nan,
    }


def run_hold(host: str, port: int, path: str, count: int, batch: int) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    request = _request(host, path)
    held: list[socket.socket] = []
    while len(held) < count:
        group = [_connect(host, port, timeout=30) for _ in range(min(batch, count - len(held)))]
        for s in group:
            s.sendall(request)
        for s in group:
            buf = bytearray()
            while _response_length(buf) is None:
                chunk = s.recv(65536)
                if not chunk:
                    raise LoadgenError(f"connection {len(held)} closed before the response")
                buf += chunk
            held.append(s)
    print(f"ready {len(held)}", flush=True)
    sys.stdin.read()
    for s in held:
        s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    lat = sub.add_parser("latency")
    hold = sub.add_parser("hold")
    for p in (lat, hold):
        p.add_argument("--host", required=True)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--path", default="/1k")
    lat.add_argument("--rate", type=float, default=1000.0)
    lat.add_argument("--duration", type=float, default=10.0)
    lat.add_argument("--conns", type=int, default=4)
    hold.add_argument("--count", type=int, required=True)
    hold.add_argument("--batch", type=int, default=100)
    args = parser.parse_args(argv)
    try:
        if args.mode == "latency":
            print(
                json.dumps(run_latency(args.host, args.port, args.path, args.rate, args.duration, args.conns))
            )
        else:
            run_hold(args.host, args.port, args.path, args.count, args.batch)
    except (LoadgenError, OSError) as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
