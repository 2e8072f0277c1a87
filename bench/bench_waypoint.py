"""Loopback benchmark: HTTP through source HBONE → waypoint → destination HBONE vs direct (issue 7).

Three processes, as deployed: the load generator holding the source node proxy's HBONE pool (app-b's
identity), the waypoint (`Waypoint` with examples/seed/waypoint.yaml: "allow app-b to GET /data"), the
destination node proxy (`HboneServer`) in front of the demo app. "direct" skips the waypoint: the pool
tunnels straight to the destination. Requests are HTTP/1.1 `GET /data`, kept alive on C tunnels.

1. latency at a fixed request rate (open loop: each request is timed from its *scheduled* send time,
   so queueing is counted — no coordinated omission), p50/p90/p99 for both paths and the added cost;
2. maximum requests per second (closed loop, C concurrent tunnels).

    .venv/bin/python bench/bench_waypoint.py [--rate 300] [--seconds 5] [--conns 8] [--uvloop] [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import random
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from zerotunnel.config import load
from zerotunnel.demoapp import start_demo_app
from zerotunnel.identity.bundle import TrustBundle
from zerotunnel.identity.ca import CertificateAuthority
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.mesh.build import Addresses
from zerotunnel.mesh.model import WaypointRef
from zerotunnel.node.accesslog import AccessLog
from zerotunnel.node.hbone_client import HbonePool, PoolKey
from zerotunnel.node.hbone_server import HboneServer, LocalWorkload
from zerotunnel.node.tls import WorkloadCredentials
from zerotunnel.policy.decision import Decision
from zerotunnel.waypoint.http import StreamChannel
from zerotunnel.waypoint.proxy import Waypoint
from zerotunnel.waypoint.telemetry import RequestTelemetry

TD = "cluster.local"
ROOT = Path(__file__).resolve().parents[1]
VIP = "10.96.0.10"
REQUEST = b"GET /data HTTP/1.1\r\nHost: app-a.namespace-a.svc.cluster.local\r\n\r\n"


def make_creds() -> dict[str, dict[str, Any]]:
    now = datetime.now(UTC)
    root = CertificateAuthority.create_root(TD, now - timedelta(hours=1))
    out = {}
    for ns, sa in (
        ("namespace-a", "waypoint"),
        ("namespace-a", "service-account-a"),
        ("namespace-b", "service-account-b"),
    ):
        ident = SpiffeId.istio(TD, ns, sa)
        chain, key = root.issue_with_key(ident, now - timedelta(minutes=1), timedelta(hours=2))
        out[sa] = {
            "identity": str(ident),
            "chain": chain.chain_pem,
            "key": key,
            "roots": root.root_bundle_pem,
        }
    return out


def load_creds(d: dict[str, Any]) -> WorkloadCredentials:
    return WorkloadCredentials.from_pem(
        SpiffeId.parse(d["identity"]), d["chain"], d["key"], TrustBundle.from_pem(TD, d["roots"])
    )


def config_text() -> list[tuple[str, str]]:
    mesh = (
        (ROOT / "examples" / "seed" / "mesh.yaml")
        .read_text()
        .replace(
            "  name: namespace-a\n  labels:\n",
            "  name: namespace-a\n  labels:\n    istio.io/use-waypoint: waypoint\n",
        )
    )
    waypoint = (ROOT / "examples" / "seed" / "waypoint.yaml").read_text()
    return [("mesh.yaml", mesh), ("waypoint.yaml", waypoint)]


def _run(coro_fn: Any, use_uvloop: bool) -> None:
    if use_uvloop:
        import uvloop

        uvloop.run(coro_fn())
    else:
        asyncio.run(coro_fn())


def destination_side(creds: dict[str, Any], app_ip: str, ready: Any, stop: Any, use_uvloop: bool) -> None:
    async def main() -> None:
        sc = load_creds(creds)
        app = await start_demo_app(app_ip, 8080, "app-a")
        server = HboneServer(
            sc,
            authorize=lambda _r: Decision(True, None, None, "allowed", 200),
            local_workload=lambda _ip: LocalWorkload("app-a", "namespace-a", sc.identity),
            access_log=AccessLog(lambda _line: None),
        )
        await server.start(app_ip, 15008)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await server.close(0)
        await app.close()

    _run(main, use_uvloop)


def waypoint_side(
    creds: dict[str, Any], addresses: dict[str, Any], wp_ip: str, ready: Any, stop: Any, use_uvloop: bool
) -> None:
    async def main() -> None:
        config = load(config_text())
        wp = Waypoint(
            WaypointRef("namespace-a", "waypoint"),
            load_creds(creds),
            telemetry=RequestTelemetry("waypoint", sink=lambda _line: None),
            access_log=AccessLog(lambda _line: None),
            mark=False,
        )
        wp.apply(config, Addresses(**addresses), 1)
        await wp.start(wp_ip, 15008)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await wp.close(0)

    _run(main, use_uvloop)


class Conn:
    """One kept-alive HTTP/1.1 tunnel; `get` sends one request and reads one response."""

    def __init__(self, channel: StreamChannel) -> None:
        self.channel = channel
        self.buf = b""

    async def get(self) -> int:
        await self.channel.send(REQUEST)
        while b"\r\n\r\n" not in self.buf:
            chunk = await self.channel.recv()
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        m = re.search(rb"(?i)content-length: *(\d+)", head)
        n = int(m.group(1)) if m else 0
        while len(rest) < n:
            chunk = await self.channel.recv()
            if not chunk:
                raise ConnectionError("closed")
            rest += chunk
        self.buf = rest[n:]
        return int(head.split(b" ", 2)[1])


async def open_conns(pool: HbonePool, key: PoolKey, authority: str, n: int) -> list[Conn]:
    return [Conn(StreamChannel(await pool.connect(key, authority))) for _ in range(n)]


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] if s else float("nan")


async def fixed_rate(conns: list[Conn], rate: float, seconds: float) -> tuple[list[float], int]:
    """Open loop: request i is due at t0 + i/rate and waits for a free tunnel; latency from due time."""
    free: asyncio.Queue[Conn] = asyncio.Queue()
    for c in conns:
        free.put_nowait(c)
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter() + 0.05  # uvloop's loop.time() has 1 ms resolution
    total = int(rate * seconds)

    async def one(due: float) -> None:
        nonlocal errors
        conn = await free.get()
        try:
            status = await conn.get()
            if status != 200:
                errors += 1
            latencies.append((time.perf_counter() - due) * 1000)
        finally:
            free.put_nowait(conn)

    tasks = []
    for i in range(total):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(due)))
    await asyncio.gather(*tasks)
    return latencies, errors


async def max_rps(conns: list[Conn], seconds: float) -> float:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    count = 0

    async def worker(conn: Conn) -> None:
        nonlocal count
        while loop.time() < end:
            await conn.get()
            count += 1

    start = loop.time()
    await asyncio.gather(*(worker(c) for c in conns))
    return count / (loop.time() - start)


async def measure(
    creds: dict[str, dict[str, Any]], app_ip: str, wp_ip: str, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    client = load_creds(creds["service-account-b"])
    pool = HbonePool(lambda _i: client, mark=False)
    paths = {
        "direct": (
            PoolKey(
                client.identity,
                frozenset({SpiffeId.parse(creds["service-account-a"]["identity"])}),
                (app_ip, 15008),
            ),
            f"{app_ip}:8080",
        ),
        "waypoint": (
            PoolKey(
                client.identity, frozenset({SpiffeId.parse(creds["waypoint"]["identity"])}), (wp_ip, 15008)
            ),
            f"{VIP}:80",
        ),
    }
    results: dict[str, dict[str, float]] = {}
    for name, (key, authority) in paths.items():
        conns = await open_conns(pool, key, authority, args.conns)
        await max_rps(conns, 0.5)  # warm-up
        lat, errors = await fixed_rate(conns, args.rate, args.seconds)
        rps = await max_rps(conns, args.seconds)
        results[name] = {
            "p50": pct(lat, 50),
            "p90": pct(lat, 90),
            "p99": pct(lat, 99),
            "errors": errors,
            "max_rps": rps,
            "n": len(lat),
        }
        for c in conns:
            c.channel.send_eof()
    await pool.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=300.0, help="fixed request rate (req/s)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--conns", type=int, default=8, help="kept-alive tunnels")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    args = parser.parse_args()
    net = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}"
    app_ip, wp_ip = f"{net}.2", f"{net}.3"
    addresses = {
        "pod_ips": {"namespace-a/app-a": app_ip, "namespace-a/waypoint": wp_ip},
        "service_vips": {"namespace-a/app-a": VIP},
    }
    creds = make_creds()
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    ready = [ctx.Event(), ctx.Event()]
    procs = [
        ctx.Process(
            target=destination_side, args=(creds["service-account-a"], app_ip, ready[0], stop, args.uvloop)
        ),
        ctx.Process(
            target=waypoint_side, args=(creds["waypoint"], addresses, wp_ip, ready[1], stop, args.uvloop)
        ),
    ]
    for p in procs:
        p.start()
    for r in ready:
        if not r.wait(60):
            raise SystemExit("a proxy did not start")
    try:
        if args.uvloop:
            import uvloop

            results = uvloop.run(measure(creds, app_ip, wp_ip, args))
        else:
            results = asyncio.run(measure(creds, app_ip, wp_ip, args))
    finally:
        stop.set()
        for p in procs:
            p.join(10)
    d, w = results["direct"], results["waypoint"]
    lines = [
        f"| path | p50 ms | p90 ms | p99 ms | errors | max req/s ({args.conns} tunnels) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {k} | {v['p50']:.2f} | {v['p90']:.2f} | {v['p99']:.2f} | {int(v['errors'])} "
            f"| {v['max_rps']:.0f} |"
            for k, v in results.items()
        ),
        f"| added by the waypoint | {w['p50'] - d['p50']:+.2f} | {w['p90'] - d['p90']:+.2f} | "
        f"{w['p99'] - d['p99']:+.2f} | | {w['max_rps'] / d['max_rps']:.2f}x |",
    ]
    table = "\n".join(lines)
    print(
        f"fixed rate {args.rate:.0f} req/s for {args.seconds:.0f} s, {'uvloop' if args.uvloop else 'asyncio'}"
    )
    print(table)
    if args.record:
        load_avg = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        loop_name = "uvloop" if args.uvloop else "asyncio"
        section = (
            "\n## Waypoint: HTTP through HBONE → waypoint → HBONE vs direct "
            "(`bench/bench_waypoint.py`, issue 7)\n\n"
            f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs shared with other jobs "
            f"(load average {load_avg}), Python {platform.python_version()}, {loop_name}. Three processes "
            "on loopback (load generator + source HBONE pool, waypoint, destination HBONE server + demo "
            f"app); HTTP/1.1 `GET /data` kept alive on {args.conns} tunnels, the seed's L7 policy evaluated "
            f"per request. Latency at a fixed {args.rate:.0f} req/s for {args.seconds:.0f} s (open loop, "
            "timed from the scheduled send), then closed-loop maximum.\n\n"
            f"{table}\n"
        )
        with (ROOT / "bench" / "RESULTS.md").open("a") as f:
            f.write(section)


if __name__ == "__main__":
    main()
