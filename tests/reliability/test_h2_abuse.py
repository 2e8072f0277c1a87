"""HTTP/2 abuse against a real 15008 server while a legitimate client keeps working.

security.md §1d and §4 items 12-14 (rules 12-13). The attacker holds a *valid* SVID: these are the
floods an authenticated but compromised workload can send, which Python's `h2` does not bound by
itself. Each case: a baseline of legitimate probes, then the attack (tests/reliability/abuser.py in
its own process) while probes keep running back to back, each on a fresh mTLS connection. Pass:
the attacker's connection is cut (GOAWAY with the expected code, then close), 100% of the
legitimate probes succeed during the attack, their p99 stays bounded, and nothing the attacker
opened is left behind (tunnels, tasks, sockets).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

PROTOCOL_ERROR = 0x1
PE_OR_CALM = {0x1, 0xB}
ENHANCE_YOUR_CALM = 0xB


def run(coro: Any, timeout: float = 120) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _abuse(env: Any, rel: Any, scenario: str, n: int, *, app: str = "echo", hold: float = 3.0,
                 during: Any = None) -> dict[str, Any]:
    upstream_connects = 0
    app_port = await env.app("echo")  # the legitimate client's
    target_port = await env.app(app) if app != "echo" else app_port  # the attacker's

    from zerotunnel.node.hbone_server import connect_upstream_direct

    async def counting(request: Any, factory: Any) -> Any:
        nonlocal upstream_connects
        upstream_connects += 1
        return await connect_upstream_direct(request, factory)

    server = await env.server(handshake_timeout=2.0, connect_upstream=counting)
    probe = rel.Probe(env, server, app_port)
    for _ in range(20):
        await probe.once()
    baseline = probe.stats()
    probe = rel.Probe(env, server, app_port)  # the during-attack figures start from zero
    tasks_before = len(asyncio.all_tasks())
    stop = asyncio.Event()
    prober = asyncio.create_task(probe.loop(stop))
    sampler = asyncio.create_task(during(server)) if during is not None else None
    cpu0, rss0 = rel.cpu_seconds(), rel.rss_kib()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    result = await rel.run_abuser(env, server, scenario, n, f"127.0.0.1:{target_port}", hold=hold)
    wall = loop.time() - t0
    cpu = rel.cpu_seconds() - cpu0
    rss_growth = rel.rss_kib() - rss0
    stop.set()
    await prober
    sampled = await sampler if sampler is not None else None
    # Everything the attacker opened must be gone once its socket is.
    for _ in range(100):
        if not server.live and server.open_sockets == 0 and len(asyncio.all_tasks()) <= tasks_before:
            break
        await asyncio.sleep(0.05)
    leftover = {"live_tunnels": len(server.live), "open_sockets": server.open_sockets,
                "tasks_over_baseline": max(0, len(asyncio.all_tasks()) - tasks_before)}
    await env.aclose()
    return {"attack": result, "baseline": baseline, "during": probe.stats(), "leftover": leftover,
            "upstream_connects": upstream_connects, "server_cpu_s": round(cpu, 3),
            "cpu_share": round(cpu / wall, 3), "rss_growth_kib": rss_growth, "sampled": sampled}


def _check_legit(out: dict[str, Any]) -> None:
    during, baseline = out["during"], out["baseline"]
    assert during["probes"] >= 3, out
    assert during["success_rate"] == 1.0, out
    # security.md §4 item 12 proposes p99 < 2x baseline; on a shared 2-core CI box the attacker's
    # process competes for the same cores, so the gate is looser and the figure is recorded.
    assert during["p99_ms"] < max(10 * baseline["p99_ms"], 1000), out
    assert out["leftover"] == {"live_tunnels": 0, "open_sockets": 0, "tasks_over_baseline": 0}, out


CUT_OFF = [
    # scenario, frames, accepted GOAWAY codes (security.md §4 items 12-14)
    pytest.param("rapid_reset", 10_000, {ENHANCE_YOUR_CALM}, id="rapid-reset-10k"),
    pytest.param("early_error_reset", 10_000, PE_OR_CALM, id="refused-streams-10k"),
    pytest.param("continuation_empty", 1_000, PE_OR_CALM, id="continuation-1k-empty"),
    pytest.param("continuation_1k", 1_000, PE_OR_CALM, id="continuation-1k-1KiB"),
    pytest.param("big_headers", 1, PE_OR_CALM, id="header-list-70KiB"),
    pytest.param("hpack_bomb", 100, PE_OR_CALM, id="hpack-bomb-400KiB-decoded"),
    pytest.param("settings_flood", 10_000, {ENHANCE_YOUR_CALM}, id="settings-flood-10k"),
    pytest.param("ping_flood", 10_000, {ENHANCE_YOUR_CALM}, id="ping-flood-10k"),
    pytest.param("window_update_flood", 10_000, {ENHANCE_YOUR_CALM}, id="window-update-flood-10k"),
    pytest.param("empty_data_flood", 10_000, {ENHANCE_YOUR_CALM}, id="empty-data-flood-10k"),
    # 200 held, then refusals (RST_STREAM REFUSED_STREAM each) until the reset budget runs out
    pytest.param("streams_beyond_limit", 1500, {ENHANCE_YOUR_CALM}, id="streams-beyond-200"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("scenario", "n", "codes"), CUT_OFF)
def test_abuser_is_cut_off_and_legit_client_unaffected(
    env: Any, rel: Any, figures: Any, scenario: str, n: int, codes: set[int]
) -> None:
    out = run(_abuse(env, rel, scenario, n, app="hold" if scenario == "streams_beyond_limit" else "echo"))
    figures(scenario=scenario, frames=n, **out)
    attack = out["attack"]
    assert attack["goaway"] in codes, attack
    assert attack["closed"], attack
    assert attack["elapsed_s"] < 3.0, attack  # cut off promptly, not by a timeout
    _check_legit(out)
    if scenario == "rapid_reset":
        # The reset budget (AbuseLimits.reset_burst = 1000) bounds the upstream work too: streams
        # reset before their task ran never dial the app.
        assert out["upstream_connects"] <= 20 + out["during"]["probes"] + 1000, out
        assert out["rss_growth_kib"] < 64 * 1024, out
    if scenario.startswith("continuation") or scenario in ("big_headers", "hpack_bomb"):
        assert out["rss_growth_kib"] < 10 * 1024, out  # security.md §4 item 13: < 10 MiB


@pytest.mark.slow
def test_zero_window_stall_is_bounded(env: Any, rel: Any, figures: Any) -> None:
    """security.md §4 item 14 / Envoy CVE-2020-12604: a peer that opens a tunnel to an echo app with
    a zero receive window and pushes 4 MiB. The server must hold at most its per-stream send buffer
    (400 KiB, ztunnel's `max_send_buffer_size`) plus one read for it; the stalled stream is not an
    error (ztunnel does not cut it either: TCP keepalive and the peer's own timeouts end it), but it
    must not cost other clients anything."""
    peak = {"buffered": 0}

    async def sample(server: Any) -> dict[str, int]:
        for _ in range(60):
            for conn in list(server.connections):
                if conn.peer and conn.peer.spiffe_id.service_account == "abuser":
                    peak["buffered"] = max(peak["buffered"], conn.h2.buffered(1))
            await asyncio.sleep(0.05)
        return peak

    out = run(_abuse(env, rel, "zero_window", 4096, hold=3.0, during=sample))
    figures(scenario="zero_window", pushed_kib=4096, **out)
    from zerotunnel.hbone.protocol import SERVER_SETTINGS
    from zerotunnel.node.hbone_conn import READ_SIZE

    assert 0 < peak["buffered"] <= SERVER_SETTINGS.max_send_buffer + READ_SIZE, out
    assert out["rss_growth_kib"] < 32 * 1024, out
    _check_legit(out)
