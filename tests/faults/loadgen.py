"""Load generators for issue 9's load items, run inside a pod's netns (`ip netns exec POD python loadgen.py`).

Standalone (stdlib only, like bench/loadgen.py, which covers keep-alive latency and idle holding for the
benchmark): these modes are what the reliability suite needs on top of it.

- `churn`: open loop, one *new* connection per request (`Connection: close`), request i due at
  t0 + i/rate. Latency is measured from when a request was due, not from when the generator got to it
  (wrk2 / fortio `-qps` style, performance.md §6), so a proxy that falls behind shows up in the
  percentiles and in the achieved rate instead of silently lowering the offered load. One thread,
  non-blocking sockets and a selector: ~30 µs of Python per connection, so the generator is not what
  limits the rate on a 2-core box.
- `hold`: opens N keep-alive connections, proves each with a request, prints one JSON line, then obeys
  stdin: `check` makes one more request on every connection and reports how many answered; EOF closes
  them all. The harness reads the proxies' RSS and fds while they are held.
- `mixed`: open loop over a list of cases (plain HTTP or HTTPS with a client certificate), one new
  connection per request, a thread pool doing the blocking I/O; every request is recorded as
  (due time, case, status, seconds). This is the seed soak's client (it replaced one `curl` process per
  request, whose start-up dominated the latencies). A refused connection or handshake is status `000`,
  as curl writes it.
- `serve`: a small keep-alive HTTP/1.1 server (asyncio) for hosts without nginx.

Output: JSON on stdout; diagnostics on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import json
import math
import resource
import selectors
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

BODY = b"z" * 64


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit: 10,000 held connections need 10,000 descriptors here."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(p * len(sorted_values)) - 1)]


def _request(host: str, path: str, *, close: bool, method: str = "GET") -> bytes:
    conn = "Connection: close\r\n" if close else ""
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: zt-load\r\n{conn}\r\n".encode()


def response_length(buf: bytes | bytearray) -> tuple[int, int] | None:
    """(status, bytes of the first complete response) or None while incomplete; Content-Length or chunked."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"bad status line {lines[0]!r}")
    status = int(parts[1])
    body = end + 4
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            total = body + int(value.strip())
            return (status, total) if len(buf) >= total else None
        if name == "transfer-encoding" and "chunked" in value.lower():
            tail = buf.find(b"\r\n0\r\n\r\n", body - 2)
            return (status, tail + 7) if tail >= 0 else None
    return None  # no length: the body ends at EOF


# --- churn ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    sock: socket.socket
    due: float
    deadline: float
    sent: bool = False
    buf: bytearray = field(default_factory=bytearray)


def run_churn(
    host: str, port: int, path: str, rate: float, duration: float, *, timeout: float, max_inflight: int,
) -> dict[str, Any]:
    """Open-loop connection churn; returns counts, achieved rate and latency percentiles (ms)."""
    raise_nofile()
    request = _request(host, path, close=True)
    total = int(rate * duration)
    interval = 1.0 / rate
    sel = selectors.DefaultSelector()
    inflight: dict[int, _Pending] = {}
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[int] = collections.Counter()
    per_second: collections.Counter[int] = collections.Counter()
    issued = 0
    max_seen = 0
    t0 = time.perf_counter() + 0.05
    end_by = t0 + duration + timeout + 5.0
    next_sweep = t0

    def finish(fd: int, err: str | None, status: int | None = None) -> None:
        p = inflight.pop(fd)
        sel.unregister(p.sock)
        p.sock.close()
        if err is not None:
            errors[err] += 1
            return
        assert status is not None
        statuses[status] += 1
        if status != 200:
            errors[f"status {status}"] += 1
            return
        done = time.perf_counter()
        latencies.append(done - p.due)
        per_second[int(done - t0)] += 1

    while issued < total or inflight:
        now = time.perf_counter()
        if now > end_by:
            for fd in list(inflight):
                finish(fd, "timeout")
            break
        while issued < total and t0 + issued * interval <= now and len(inflight) < max_inflight:
            due = t0 + issued * interval
            issued += 1
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rc = s.connect_ex((host, port))
            if rc not in (0, errno.EINPROGRESS):
                s.close()
                errors[f"connect {errno.errorcode.get(rc, rc)}"] += 1
                continue
            inflight[s.fileno()] = _Pending(s, due, due + timeout)
            sel.register(s, selectors.EVENT_WRITE)
        max_seen = max(max_seen, len(inflight))
        if issued < total and len(inflight) < max_inflight:
            wait = max(0.0, t0 + issued * interval - time.perf_counter())
        else:
            wait = 0.05
        for key, _ in sel.select(min(wait, 0.05)):
            fd = key.fd
            p = inflight.get(fd)
            if p is None:
                continue
            if not p.sent:
                err = p.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    finish(fd, f"connect {errno.errorcode.get(err, err)}")
                    continue
                try:
                    p.sock.send(request)
                except OSError as exc:
                    finish(fd, f"send {errno.errorcode.get(exc.errno or 0, exc.errno)}")
                    continue
                p.sent = True
                sel.modify(p.sock, selectors.EVENT_READ)
                continue
            try:
                chunk = p.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                finish(fd, f"recv {errno.errorcode.get(exc.errno or 0, exc.errno)}")
                continue
            p.buf += chunk
            try:
                parsed = response_length(p.buf)
            except ValueError:
                finish(fd, "bad response")
                continue
            if parsed is not None:
                finish(fd, None, parsed[0])
            elif not chunk:
                finish(fd, "closed before the response" if not p.buf else "truncated response")
        if time.perf_counter() >= next_sweep:
            next_sweep = time.perf_counter() + 0.1
            late = [fd for fd, p in inflight.items() if p.deadline < time.perf_counter()]
            for fd in late:
                finish(fd, "timeout")
    elapsed = max(time.perf_counter() - t0, 1e-9)
    ms = sorted(v * 1000.0 for v in latencies)
    seconds = sorted(per_second.items())
    steady = [n for s, n in seconds if 1 <= s < int(duration)]
    return {
        "offered_rps": rate,
        "duration_s": duration,
        "requests": total,
        "ok": len(ms),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(6)),
        "statuses": {str(k): v for k, v in statuses.items()},
        "achieved_rps": round(len(ms) / elapsed, 1),
        "min_rps_1s": min(steady) if steady else 0,
        "max_inflight": max_seen,
        "p50_ms": round(percentile(ms, 0.50), 2),
        "p90_ms": round(percentile(ms, 0.90), 2),
        "p99_ms": round(percentile(ms, 0.99), 2),
        "p999_ms": round(percentile(ms, 0.999), 2),
        "max_ms": round(ms[-1], 2) if ms else math.nan,
        "generator_cpu_s": round(_cpu_s(), 2),
    }


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- hold -------------------------------------------------------------------------------------------


def _roundtrips(socks: list[socket.socket], request: bytes, timeout: float) -> list[str]:
    """One request on every socket (all sent first, then all read); the errors, by connection index."""
    errors: list[str] = []
    for s in socks:
        s.settimeout(timeout)
    sent: list[bool] = []
    for i, s in enumerate(socks):
        try:
            s.sendall(request)
            sent.append(True)
        except OSError as exc:
            errors.append(f"{i}: send {exc}")
            sent.append(False)
    for i, s in enumerate(socks):
        if not sent[i]:
            continue
        buf = bytearray()
        try:
            while (parsed := response_length(buf)) is None:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                buf += chunk
            if parsed[0] != 200 or parsed[1] != len(buf):
                errors.append(f"{i}: status {parsed[0]}, {len(buf) - parsed[1]} extra bytes")
        except (OSError, ValueError) as exc:
            errors.append(f"{i}: {type(exc).__name__} {exc}")
    return errors


def run_hold(host: str, port: int, path: str, count: int, batch: int, timeout: float) -> None:
    raise_nofile()
    request = _request(host, path, close=False)
    held: list[socket.socket] = []
    t0 = time.perf_counter()
    failures: list[str] = []
    while len(held) < count:
        group: list[socket.socket] = []
        for _ in range(min(batch, count - len(held))):
            try:
                group.append(socket.create_connection((host, port), timeout=timeout))
            except OSError as exc:
                failures.append(f"connect {exc}")
        if len(failures) > 10:
            break
        failures += _roundtrips(group, request, timeout)
        held += group
    opened = time.perf_counter() - t0
    print(json.dumps({"ready": len(held), "open_s": round(opened, 2), "errors": len(failures),
                      "first_errors": failures[:5]}), flush=True)
    for line in sys.stdin:
        if line.strip() == "check":
            t1 = time.perf_counter()
            errs = _roundtrips(held, request, timeout)
            print(json.dumps({"checked": len(held), "alive": len(held) - len(errs), "dead": len(errs),
                              "first_errors": errs[:5], "check_s": round(time.perf_counter() - t1, 2)}),
                  flush=True)
    for s in held:
        s.close()
    print(json.dumps({"closed": len(held)}), flush=True)


# --- mixed (the seed soak's client) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    host: str
    port: int
    path: str = "/"
    method: str = "GET"
    host_header: str = ""
    tls: dict[str, str] | None = None  # {"ca", "cert", "key", "sni"}


def _tls_context(tls: dict[str, str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=tls["ca"])
    ctx.load_cert_chain(tls["cert"], tls["key"])
    return ctx


def one_request(case: Case, ctx: ssl.SSLContext | None, timeout: float) -> str:
    """One new connection, one request, `Connection: close`: the status as curl's `%{http_code}` has it."""
    try:
        raw = socket.create_connection((case.host, case.port), timeout=timeout)
    except OSError:
        return "000"
    sock: socket.socket = raw
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx is not None:
            assert case.tls is not None
            sock = ctx.wrap_socket(raw, server_hostname=case.tls["sni"])
        sock.sendall(_request(case.host_header or case.host, case.path, close=True, method=case.method))
        buf = bytearray()
        while (parsed := response_length(buf)) is None:
            chunk = sock.recv(65536)
            if not chunk:
                if not buf:
                    return "000"
                return str(int(bytes(buf[9:12])))
            buf += chunk
        return str(parsed[0])
    except (OSError, ValueError):
        return "000"
    finally:
        sock.close()


def run_mixed(
    cases: list[Case], rate: float, duration: float, workers: int, timeout: float
) -> dict[str, Any]:
    """Round robin over `cases` at a fixed total rate; every request recorded from its due time."""
    contexts = [_tls_context(c.tls) if c.tls else None for c in cases]
    total = int(rate * duration)
    records: list[tuple[float, str, str, float]] = []
    lock = threading.Lock()
    t0 = time.monotonic() + 0.05

    def job(i: int, due: float) -> None:
        case = cases[i % len(cases)]
        got = one_request(case, contexts[i % len(cases)], timeout)
        with lock:
            records.append((round(due - t0, 4), case.name, got, round(time.monotonic() - due, 5)))

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for i in range(total):
            due = t0 + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pool.submit(job, i, due)
    records.sort()
    return {"offered_rps": rate, "seconds": round(time.monotonic() - t0, 2), "records": records}


# --- serve ------------------------------------------------------------------------------------------


async def _serve(port: int) -> None:
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
    closing = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(BODY), BODY)

    class Http(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while (end := self.buf.find(b"\r\n\r\n")) >= 0:
                head, self.buf = self.buf[:end].lower(), self.buf[end + 4 :]
                if b"connection: close" in head:
                    self.transport.write(closing)
                    self.transport.close()
                    return
                self.transport.write(response)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Http, "0.0.0.0", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    churn = sub.add_parser("churn")
    hold = sub.add_parser("hold")
    for p in (churn, hold):
        p.add_argument("--host", required=True)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--path", default="/")
        p.add_argument("--timeout", type=float, default=10.0)
    churn.add_argument("--rate", type=float, required=True)
    churn.add_argument("--duration", type=float, required=True)
    churn.add_argument("--max-inflight", type=int, default=4000)
    hold.add_argument("--count", type=int, required=True)
    hold.add_argument("--batch", type=int, default=200)
    mixed = sub.add_parser("mixed")
    mixed.add_argument("--cases", required=True, help="JSON list of cases (see Case)")
    mixed.add_argument("--rate", type=float, required=True)
    mixed.add_argument("--duration", type=float, required=True)
    mixed.add_argument("--workers", type=int, default=16)
    mixed.add_argument("--timeout", type=float, default=5.0)
    serve = sub.add_parser("serve")
    serve.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.mode == "churn":
        print(json.dumps(run_churn(args.host, args.port, args.path, args.rate, args.duration,
                                   timeout=args.timeout, max_inflight=args.max_inflight)))
    elif args.mode == "hold":
        run_hold(args.host, args.port, args.path, args.count, args.batch, args.timeout)
    elif args.mode == "mixed":
        cases = [Case(**c) for c in json.loads(args.cases)]
        print(json.dumps(run_mixed(cases, args.rate, args.duration, args.workers, args.timeout)))
    else:
        raise_nofile()
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
