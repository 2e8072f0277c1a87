"""Connection floods and slow clients on 15008 (security.md §4 items 15-16, rule 12, §3 timeouts).

Unauthenticated sockets are the cheapest attack there is: they cost the attacker one TCP connect.
What must hold: the handshake timeout reaps silent and slow sockets (a TLS slowloris that drips
bytes is cut as surely as a silent one: the timer covers the whole handshake, not idle time),
garbage is refused at once, a per-listener cap bounds both pending handshakes and open sockets,
a pre-handshake socket costs little memory, and a legitimate client keeps succeeding throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from typing import Any

import pytest

from zerotunnel.node.tls import client_context


def run(coro: Any, timeout: float = 120) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _silent(addr: tuple[str, int], n: int) -> list[socket.socket]:
    loop = asyncio.get_running_loop()
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        await loop.sock_connect(s, addr)
        socks.append(s)
    return socks


async def _garbage(addr: tuple[str, int], payload: bytes) -> bool:
    """Send junk instead of a ClientHello; True if the server closed on us within 2 s."""
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(payload)
    try:
        while await asyncio.wait_for(reader.read(4096), 2.0):
            pass
        return True
    except (ConnectionError, OSError):
        return True
    except TimeoutError:
        return False
    finally:
        writer.close()


def _closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def _wait_for(predicate: Any, timeout: float) -> float:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while not predicate():
        if loop.time() - t0 > timeout:
            break
        await asyncio.sleep(0.02)
    return loop.time() - t0


@pytest.mark.slow
def test_silent_and_garbage_flood_reaped_while_legit_client_works(env: Any, rel: Any, figures: Any) -> None:
    """ghostunnel's handshake-flood: 40 silent + 20 garbage sockets, handshake timeout 1 s."""
    silent_n, garbage_n = rel.scale(40, 400), rel.scale(20, 200)

    async def main() -> dict[str, Any]:
        app = await env.app("echo")
        # the pending-handshake cap (its own test below) is set above the flood, so every silent
        # socket is admitted and must be reaped by the timeout
        server = await env.server(handshake_timeout=1.0, max_pending_handshakes=silent_n + garbage_n + 64)
        probe = rel.Probe(env, server, app)
        for _ in range(5):
            await probe.once()
        probe.latencies.clear()
        fds0, tasks0 = rel.open_fds(), len(asyncio.all_tasks())
        stop = asyncio.Event()
        prober = asyncio.create_task(probe.loop(stop))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        socks = await _silent(server.address, silent_n)
        opened = loop.time()
        junk = [os.urandom(64 + i) for i in range(garbage_n // 2)] + [b"GET / HTTP/1.1\r\n\r\n"] * (
            garbage_n - garbage_n // 2)
        garbage = asyncio.gather(*(_garbage(server.address, j) for j in junk))
        peak_pending = server.pending_handshakes
        await _wait_for(lambda: server.pending_handshakes == 0, 10.0)
        reaped_after = loop.time() - opened  # the last silent socket was accepted at `opened`
        open_s = opened - t0
        garbage_closed = await garbage
        await asyncio.sleep(0.3)
        stop.set()
        await prober
        all_closed = all(_closed_by_peer(s) for s in socks)
        for s in socks:
            s.close()
        await _wait_for(lambda: server.open_sockets == 0, 5.0)
        await asyncio.sleep(0.1)
        out = {
            "silent": silent_n, "garbage": garbage_n, "garbage_refused": sum(garbage_closed),
            "peak_pending_handshakes": peak_pending, "open_flood_s": round(open_s, 2),
            "all_reaped_s_after_flood_opened": round(reaped_after, 2),
            "silent_closed_by_server": all_closed, "legit": probe.stats(),
            "fds_over_baseline": rel.open_fds() - fds0,
            "tasks_over_baseline": len(asyncio.all_tasks()) - tasks0,
            "open_sockets_after": server.open_sockets,
            "timeouts_counted": _metric(server, "timeout"),
        }
        await env.aclose()
        return out

    out = run(main())
    figures(**out)
    assert out["garbage_refused"] == garbage_n, out
    assert out["silent_closed_by_server"], out
    assert out["all_reaped_s_after_flood_opened"] <= 1.0 + 1.0, out  # item 15: timeout + 1 s
    assert out["legit"]["success_rate"] == 1.0 and out["legit"]["probes"] >= 5, out
    assert out["open_sockets_after"] == 0, out
    assert out["fds_over_baseline"] <= 10 and out["tasks_over_baseline"] <= 10, out  # item 15: +10
    assert out["timeouts_counted"] >= silent_n, out


def _metric(server: Any, reason: str) -> float:
    text = server.metrics.render().decode()
    total = 0.0
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if not name.endswith("_total") or "handshake" not in name or f'"{reason}"' not in line:
            continue
        total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
def test_tls_slowloris_is_cut_at_the_handshake_timeout(env: Any, rel: Any, figures: Any) -> None:
    """A real ClientHello dripped one byte every 100 ms: activity must not extend the deadline."""

    async def main() -> dict[str, Any]:
        app = await env.app("echo")
        server = await env.server(handshake_timeout=1.0)
        hello_bio_in, hello_bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_context(env.client_creds).wrap_bio(hello_bio_in, hello_bio_out, server_hostname=None)
        with contextlib.suppress(ssl.SSLWantReadError):
            client.do_handshake()
        hello = hello_bio_out.read()
        drippers = []

        async def drip() -> float:
            reader, writer = await asyncio.open_connection(*server.address)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            try:
                for b in hello:
                    writer.write(bytes([b]))
                    await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                            break
            except (ConnectionError, OSError):
                pass
            writer.close()
            return loop.time() - t0

        n = rel.scale(20, 200)
        drippers = [asyncio.create_task(drip()) for _ in range(n)]
        probe = rel.Probe(env, server, app)
        await asyncio.sleep(0.3)
        for _ in range(5):
            await probe.once()
        cut = await asyncio.gather(*drippers)
        out = {"slow_clients": n, "hello_bytes": len(hello), "cut_after_s_max": round(max(cut), 2),
               "cut_after_s_min": round(min(cut), 2), "legit": probe.stats(),
               "timeouts_counted": _metric(server, "timeout")}
        await env.aclose()
        return out

    out = run(main())
    figures(**out)
    # a full drip would take len(hello) * 0.1 s (> 20 s); the server cuts it at ~1 s
    assert out["cut_after_s_max"] < 2.0, out
    assert out["timeouts_counted"] >= out["slow_clients"], out
    assert out["legit"]["success_rate"] == 1.0, out


def test_pending_handshake_cap(env: Any, rel: Any, figures: Any) -> None:
    """At `max_pending_handshakes` the oldest silent socket is dropped to admit the newest, so the
    cap holds and a legitimate client gets in *while* the flood keeps it full (refusing newcomers
    locked everyone out until the handshake timeout reaped the flood; open finding 9)."""

    async def main() -> dict[str, Any]:
        app = await env.app("echo")
        server = await env.server(handshake_timeout=5.0, max_pending_handshakes=10)
        socks = await _silent(server.address, 30)
        await _wait_for(lambda: server.evicted_sockets >= 20, 2.0)
        evicted, peak = server.evicted_sockets, server.pending_handshakes
        probe = rel.Probe(env, server, app)
        ok_during = await probe.once()  # 10 silent sockets still pending, well inside the timeout
        still_pending = server.pending_handshakes
        for s in socks:
            s.close()
        out = {"evicted": evicted, "refused": server.refused_sockets, "peak_pending": peak,
               "legit_during_flood": ok_during, "pending_after_probe": still_pending,
               "overload_counted": _metric(server, "overload")}
        await env.aclose()
        return out

    out = run(main())
    figures(**out)
    assert out["evicted"] == 20 and out["refused"] == 0 and out["peak_pending"] == 10, out
    assert out["overload_counted"] >= 20, out
    assert out["legit_during_flood"], out
    assert out["pending_after_probe"] >= 9, out  # the flood was still there: the probe did not wait it out


def test_connection_cap(env: Any, rel: Any, figures: Any) -> None:
    """security.md §4 item 16 (ghostunnel max-concurrent-conns = 2): connection N+1 is refused,
    and admitted again once one closes."""

    async def main() -> dict[str, Any]:
        app = await env.app("echo")
        server = await env.server(max_connections=2)
        held = []
        for _ in range(2):
            _r, w = await asyncio.open_connection(*server.address, ssl=client_context(env.client_creds),
                                                 server_hostname="")
            held.append(w)
        probe = rel.Probe(env, server, app)
        third = await probe.once(timeout=2.0)
        held.pop().close()
        await _wait_for(lambda: server.open_sockets < 2, 2.0)
        after = await probe.once(timeout=2.0)
        for w in held:
            w.close()
        out = {"third_admitted": third, "after_close_admitted": after, "refused": server.refused_sockets,
               "error": probe.errors[:1]}
        await env.aclose()
        return out

    out = run(main())
    figures(**out)
    assert out["third_admitted"] is False and out["refused"] >= 1, out
    assert out["after_close_admitted"] is True, out


@pytest.mark.slow
def test_pre_handshake_socket_memory(env: Any, rel: Any, figures: Any) -> None:
    """What an unauthenticated socket costs the server before its handshake: was 260 KiB (a
    256 KiB read buffer per connection), now a shared per-thread buffer. 1,000 silent sockets."""
    n = rel.scale(1000, 4000)

    async def main() -> dict[str, Any]:
        server = await env.server(handshake_timeout=30.0, max_pending_handshakes=n + 100,
                                  max_connections=n + 100)
        rel.settle()
        socks0 = await _silent(server.address, 50)  # warm up allocator pools
        await _wait_for(lambda: server.pending_handshakes == 50, 5.0)
        rss0 = rel.rss_kib()
        socks = await _silent(server.address, n)
        await _wait_for(lambda: server.pending_handshakes == n + 50, 10.0)
        rss1 = rel.rss_kib()
        pending = server.pending_handshakes
        for s in socks + socks0:
            s.close()
        await _wait_for(lambda: server.open_sockets == 0, 5.0)
        out = {"sockets": n, "pending": pending, "rss_growth_kib": rss1 - rss0,
               "kib_per_socket": round((rss1 - rss0) / n, 1), "open_after_close": server.open_sockets}
        await env.aclose()
        return out

    out = run(main())
    figures(**out)
    assert out["pending"] == n + 50, out
    assert out["kib_per_socket"] < 64, out  # both ends of each socket live in this process
    assert out["open_after_close"] == 0, out


def test_tls_close_notify_frees_the_socket(env: Any) -> None:
    """Regression: a client that ends its TLS session properly (close_notify, then waits for ours,
    as asyncio and many TLS stacks do) used to leave the server socket open until the client's own
    shutdown timeout (30 s): CPython's SSLObject.read returns 0 instead of raising on close_notify."""

    async def main() -> float:
        server = await env.server()
        _r, w = await asyncio.open_connection(*server.address, ssl=client_context(env.client_creds),
                                              server_hostname="")
        await _wait_for(lambda: server.open_sockets == 1 and server.pending_handshakes == 0, 2.0)
        w.close()
        took = await _wait_for(lambda: server.open_sockets == 0, 5.0)
        await env.aclose()
        return took

    assert run(main()) < 1.0


def test_plaintext_http_to_15008_is_refused(env: Any) -> None:
    """security.md §4 item 11: plaintext to 15008 → TLS failure, counted, nothing else."""

    async def main() -> bool:
        server = await env.server()
        closed = await _garbage(server.address, b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: x\r\n\r\n")
        await env.aclose()
        return closed

    t0 = time.monotonic()
    assert run(main())
    assert time.monotonic() - t0 < 3
