"""Loopback micro-benchmark: HBONE tunnel (client pool → 15008 server) vs direct TCP.

Three processes, as in a real deployment on one host: the load generator (blocking sockets), the
client-side proxy (outbound listener + HbonePool) and the server-side proxy (HboneServer + the app).
Measures one stream's bulk throughput and small request/response round trips per second on one
kept-alive connection, plus new tunnels per second (a fresh app connection per request, which
costs one CONNECT stream on the pooled mTLS connection). Prints ratios and, with --record,
appends a section to bench/RESULTS.md.

    .venv/bin/python bench/bench_hbone.py [--mb 200] [--rr 5000] [--uvloop] [--record]
                                          [--profile client|server]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import socket
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from zerotunnel.identity.bundle import TrustBundle
from zerotunnel.identity.ca import CertificateAuthority
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.node.accesslog import AccessLog
from zerotunnel.node.hbone_client import HbonePool, PoolKey
from zerotunnel.node.hbone_server import HboneServer, LocalWorkload
from zerotunnel.node.relay import TcpRelay
from zerotunnel.node.tls import WorkloadCredentials
from zerotunnel.policy.decision import Decision

TD = "cluster.local"


def make_creds() -> tuple[dict[str, Any], dict[str, Any]]:
    now = datetime.now(UTC)
    root = CertificateAuthority.create_root(TD, now - timedelta(hours=1))
    bundle_pem = root.root_bundle_pem
    out = []
    for sa in ("server", "client"):
        ident = SpiffeId.istio(TD, "bench", sa)
        chain, key = root.issue_with_key(ident, now - timedelta(minutes=1), timedelta(hours=2))
        out.append({"identity": str(ident), "chain": chain.chain_pem, "key": key, "roots": bundle_pem})
    return out[0], out[1]


def load_creds(d: dict[str, Any]) -> WorkloadCredentials:
    bundle = TrustBundle.from_pem(TD, d["roots"])
    return WorkloadCredentials.from_pem(SpiffeId.parse(d["identity"]), d["chain"], d["key"], bundle)


def _loop(use_uvloop: bool) -> asyncio.AbstractEventLoop:
    if use_uvloop:
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _maybe_profile(kind: str, want: str | None) -> Any:
    if want != kind:
        return None
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    return prof


def _dump_profile(prof: Any, kind: str) -> None:
    if prof is None:
        return
    import pstats

    prof.disable()
    path = f"/tmp/bench_hbone_{kind}.prof"
    prof.dump_stats(path)
    stats = pstats.Stats(path)
    stats.sort_stats("tottime").print_stats(15)


def server_side(creds: dict[str, Any], ports: Any, stop: Any, use_uvloop: bool, profile: str | None) -> None:
    loop = _loop(use_uvloop)
    asyncio.set_event_loop(loop)

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        total = 0
        while data := await reader.read(1 << 18):
            total += len(data)
        writer.write(str(total).encode())
        await writer.drain()
        writer.close()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
        writer.close()

    async def main() -> None:
        sc = load_creds(creds)
        count_srv = await asyncio.start_server(count, "127.0.0.1", 0)
        echo_srv = await asyncio.start_server(echo, "127.0.0.1", 0)
        for srv in (count_srv, echo_srv):
            for s in srv.sockets:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hbone = HboneServer(
            sc,
            authorize=lambda req: Decision(True, None, None, "allowed", 200),
            local_workload=lambda ip: LocalWorkload("app", "bench", sc.identity),
            access_log=AccessLog(lambda line: None),
        )
        await hbone.start("127.0.0.1", 0)
        ports.put(
            (count_srv.sockets[0].getsockname()[1], echo_srv.sockets[0].getsockname()[1], hbone.address[1])
        )
        while not stop.is_set():
            await asyncio.sleep(0.1)

    prof = _maybe_profile("server", profile)
    loop.run_until_complete(main())
    _dump_profile(prof, "server")


def client_side(
    creds: dict[str, Any],
    server_creds: dict[str, Any],
    hbone_port: int,
    targets: tuple[int, int],
    ports: Any,
    stop: Any,
    use_uvloop: bool,
    profile: str | None,
) -> None:
    loop = _loop(use_uvloop)
    asyncio.set_event_loop(loop)

    async def main() -> None:
        cc = load_creds(creds)
        pool = HbonePool(lambda _ident: cc, mark=False)
        key = PoolKey(
            cc.identity, frozenset({SpiffeId.parse(server_creds["identity"])}), ("127.0.0.1", hbone_port)
        )
        listen_ports = []
        for target in targets:

            def factory(target: int = target) -> TcpRelay:
                relay = TcpRelay()

                async def join() -> None:
                    try:
                        stream = await pool.connect(key, f"127.0.0.1:{target}")
                    except Exception as exc:
                        relay.fail(str(exc))
                        return
                    relay.attach(stream)

                loop.create_task(join())
                return relay

            srv = await loop.create_server(factory, "127.0.0.1", 0)
            listen_ports.append(srv.sockets[0].getsockname()[1])
        ports.put(tuple(listen_ports))
        while not stop.is_set():
            await asyncio.sleep(0.1)

    prof = _maybe_profile("client", profile)
    loop.run_until_complete(main())
    _dump_profile(prof, "client")


def bulk(port: int, mb: int) -> float:
    chunk = os.urandom(256 * 1024)
    n = mb * 4
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.perf_counter()
    for _ in range(n):
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    reply = b""
    while data := s.recv(64):
        reply += data
    dt = time.perf_counter() - t0
    s.close()
    assert int(reply) == n * len(chunk), reply
    return mb / dt


def rr(port: int, count: int, size: int = 100) -> float:
    msg = b"q" * size
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(50):  # warm-up
        s.sendall(msg)
        s.recv(size)
    t0 = time.perf_counter()
    for _ in range(count):
        s.sendall(msg)
        got = 0
        while got < size:
            got += len(s.recv(size - got))
    dt = time.perf_counter() - t0
    s.close()
    return count / dt


def connect_rate(port: int, count: int, size: int = 100) -> float:
    msg = b"q" * size
    t0 = time.perf_counter()
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(msg)
        got = 0
        while got < size:
            got += len(s.recv(size - got))
        s.close()
    return count / (time.perf_counter() - t0)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (the proxies' CPU cost, robust to a noisy host)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def best_of(repeat: int, fn: Any, *args: Any) -> float:
    return float(max(fn(*args) for _ in range(repeat)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--rr", type=int, default=5000)
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--uvloop", action="store_true")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--profile", choices=["client", "server"])
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs per measure (noisy shared hosts)")
    args = ap.parse_args()

    server_creds, client_creds = make_creds()
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    q: Any = ctx.Queue()
    sp = ctx.Process(target=server_side, args=(server_creds, q, stop, args.uvloop, args.profile))
    sp.start()
    count_port, echo_port, hbone_port = q.get(timeout=30)
    cp = ctx.Process(
        target=client_side,
        args=(
            client_creds,
            server_creds,
            hbone_port,
            (count_port, echo_port),
            q,
            stop,
            args.uvloop,
            args.profile,
        ),
    )
    cp.start()
    tun_count, tun_echo = q.get(timeout=30)
    try:
        rr(tun_echo, 10)  # open the pooled connection first
        r = args.repeat
        results = {"bulk_direct": best_of(r, bulk, count_port, args.mb)}
        cpu0 = cpu_seconds(cp.pid or 0) + cpu_seconds(sp.pid or 0)
        results["bulk_hbone"] = best_of(r, bulk, tun_count, args.mb)
        cpu1 = cpu_seconds(cp.pid or 0) + cpu_seconds(sp.pid or 0)
        results["cpu_per_gb"] = (cpu1 - cpu0) / (r * args.mb / 1000)
        results["rr_direct"] = best_of(r, rr, echo_port, args.rr)
        results["rr_hbone"] = best_of(r, rr, tun_echo, args.rr)
        results["conn_direct"] = best_of(r, connect_rate, echo_port, args.conns)
        results["conn_hbone"] = best_of(r, connect_rate, tun_echo, args.conns)
    finally:
        stop.set()
        cp.join(10)
        sp.join(10)
    loop_name = "uvloop" if args.uvloop else "asyncio"
    lines = [
        f"| single-stream bulk, MB/s | {results['bulk_direct']:.0f} | {results['bulk_hbone']:.0f} | "
        f"{results['bulk_hbone'] / results['bulk_direct']:.2f} |",
        f"| 100 B request/response, round trips/s (one connection) | {results['rr_direct']:.0f} | "
        f"{results['rr_hbone']:.0f} | {results['rr_hbone'] / results['rr_direct']:.2f} |",
        f"| new connection + 100 B round trip, per s (pooled HBONE) | {results['conn_direct']:.0f} | "
        f"{results['conn_hbone']:.0f} | {results['conn_hbone'] / results['conn_direct']:.2f} |",
        f"| proxy CPU-seconds per GB tunnelled (both proxies) | - | {results['cpu_per_gb']:.1f} | - |",
    ]
    header = ["| measure | direct TCP | through HBONE (2 proxies) | ratio |", "|---|---|---|---|"]
    print(f"event loop: {loop_name}; bulk {args.mb} MB, rr {args.rr}, conns {args.conns}")
    print("\n".join(header + lines))
    if args.record:
        cpu = platform.processor() or platform.machine()
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        section = [
            "",
            f"## HBONE loopback micro-benchmark ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
            "bench/bench_hbone.py)",
            "",
            f"Machine: {model}, {os.cpu_count()} vCPU, Python {platform.python_version()}, {loop_name}. "
            "Three processes on loopback: load generator (blocking sockets), client proxy "
            "(outbound listener + HbonePool), server proxy (HboneServer + app). mTLS TLS 1.3 "
            "AES-GCM, h2 windows 4/16 MiB, 1 MiB max frame (256 KiB sent). "
            f"Bulk {args.mb} MB, {args.rr} round trips, {args.conns} connections; best of {args.repeat}.",
            "",
            *header,
            *lines,
            "",
        ]
        with open(Path(__file__).resolve().parent / "RESULTS.md", "a") as f:
            f.write("\n".join(section))


if __name__ == "__main__":
    main()
