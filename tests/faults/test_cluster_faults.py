"""Faults and a soak on the seed example as `zerotunnel up` runs it (issue 9; security.md §4 item 26).

One cluster for the module: `zerotunnel up examples/seed` with its control plane, app-a's waypoint and
the ingress gateway. The soak is the short form here (`SOAK_SECONDS`, 45 s by default); `make soak`
(`ZT_SOAK=1`) holds it `ZT_SOAK_SECONDS` (600 s by default). Its clients are load generators at a fixed
rate (tests/faults/loadgen.py `mixed`). Figures go to `$ZT_RELIABILITY_FIGURES`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from zerotunnel.cluster import runner
from zerotunnel.cluster.state import STATE_ENV

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nft"),
]

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "seed"
GW = SEED / "gateway"
ZT = [sys.executable, "-m", "zerotunnel.cli.main"]
SOAK_SECONDS = float(os.environ.get("ZT_SOAK_SECONDS", "600")) if os.environ.get("ZT_SOAK") == "1" else 45.0
WARMUP = 0.25  # share of the soak before the memory/fd baseline is taken


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    name = "s" + secrets.token_hex(3)
    old = os.environ.get(STATE_ENV)
    os.environ[STATE_ENV] = str(tmp_path_factory.mktemp("soak") / "state")
    try:
        runner.up([str(SEED)], name, control_plane=True)
        yield name
    finally:
        runner.down(name)
        if old is None:
            os.environ.pop(STATE_ENV, None)
        else:
            os.environ[STATE_ENV] = old


def _pod(status: dict[str, Any], ns: str, name: str) -> dict[str, Any]:
    pod: dict[str, Any] = next(p for p in status["pods"] if (p["namespace"], p["name"]) == (ns, name))
    return pod


def _curl_in(netns: str, url: str, *, method: str = "GET") -> str:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method,
         "--max-time", "5", url],
        capture_output=True, text=True, timeout=15, check=False,
    )
    return out.stdout.strip() or "000"


def test_pod_app_killed_is_restarted_with_backoff(seed: str, figures: Callable[..., None]) -> None:
    """app-a's command is SIGKILLed twice: the runner restarts it (the second time after a longer
    backoff), requests through the waypoint recover, and `zerotunnel status` shows the restarts."""
    status = runner.cluster_status(seed)
    b = _pod(status, "namespace-b", "app-b")["netns"]
    url = "http://app-a.namespace-a/data"
    assert _curl_in(b, url) == "200"
    recoveries: list[float] = []
    failed = sent = 0
    for round_ in (1, 2):
        app_a = _pod(runner.cluster_status(seed), "namespace-a", "app-a")
        os.kill(app_a["pid"], signal.SIGKILL)
        started = time.monotonic()
        while True:
            sent += 1
            if _curl_in(b, url) == "200":
                break
            failed += 1
            assert time.monotonic() - started < 40, f"app-a not back after kill {round_}"
            time.sleep(0.1)
        recoveries.append(time.monotonic() - started)
        deadline = time.monotonic() + 10  # the supervisor writes its status file a moment later
        while not ((app_a := _pod(runner.cluster_status(seed), "namespace-a", "app-a"))["ready"]
                   and app_a["restarts"] == round_):
            assert time.monotonic() < deadline, app_a
            time.sleep(0.2)
    shown = subprocess.run([*ZT, "status", "--name", seed], capture_output=True, text=True, timeout=30,
                           check=True).stdout
    row = next(line.split() for line in shown.splitlines() if line.startswith("namespace-a/app-a "))
    assert row[6:8] == ["running", "2"], row  # STATUS, RESTARTS
    assert recoveries[1] > recoveries[0], f"no backoff between restarts: {recoveries}"
    # the rest of the mesh never noticed: app-c stays denied
    assert _curl_in(_pod(status, "namespace-c", "app-c")["netns"], url) == "403"
    figures(recovery_s=[round(r, 2) for r in recoveries], requests_sent=sent, requests_failed=failed)


def _proc_sample(pid: int) -> tuple[int, int]:
    """(RSS KiB, open fds) of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


CASES: list[tuple[str, str]] = [
    ("b-get-data", "200"),      # app-b GET /data through the waypoint: allowed
    ("b-post-data", "403"),     # app-b POST /data: denied at the waypoint (L7)
    ("c-get-data", "403"),      # app-c: denied
    ("gw-partner-a", "200"),    # outside client through the ingress gateway
    ("gw-partner-b", "200"),
    ("gw-stranger", "000"),     # unknown CA: refused in the handshake
]


SOAK_RATE = 10.0  # requests per second per case: 60/s in all, the curl-driven soak's ~60-70/s
LOADGEN = Path(__file__).resolve().parent / "loadgen.py"


def _generator(netns: str | None, cases: list[dict[str, Any]], rate: float) -> subprocess.Popen[str]:
    """tests/faults/loadgen.py `mixed` at `rate` over `cases`, inside `netns` (None: the host, where the
    gateway's outside clients are)."""
    argv = [sys.executable, str(LOADGEN), "mixed", "--cases", json.dumps(cases), "--rate", str(rate),
            "--duration", str(SOAK_SECONDS)]
    return subprocess.Popen(["ip", "netns", "exec", netns, *argv] if netns else argv, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _gateway_case(status: dict[str, Any], client: str) -> dict[str, Any]:
    gw = next(g for g in status["gateways"])
    return {"name": f"gw-{client}", "host": gw["ip"], "port": 443, "path": "/data",
            "host_header": "app-a.example.com",
            "tls": {"ca": str(GW / "server-ca.crt"), "cert": str(GW / "clients" / f"{client}.crt"),
                    "key": str(GW / "clients" / f"{client}.key"), "sni": "app-a.example.com"}}


@pytest.mark.timeout(SOAK_SECONDS + 300)
def test_soak_mixed_traffic_through_the_seed(seed: str, figures: Callable[..., None]) -> None:
    """Sustained mixed traffic at a fixed rate (SOAK_RATE per case, open loop, one new connection per
    request, from load generators in app-b's and app-c's netns and on the host for the gateway) for
    SOAK_SECONDS: every answer as expected, node proxies' RSS and fds flat after warm-up, latency
    stable (last quarter vs second quarter). Latency is from each request's due time, so it is the
    mesh's (a curl process per request added its own start-up, ~30 ms, to every figure)."""
    status = runner.cluster_status(seed)
    b = _pod(status, "namespace-b", "app-b")["netns"]
    c = _pod(status, "namespace-c", "app-c")["netns"]
    app_a = {"host": "app-a.namespace-a", "port": 80, "path": "/data"}
    generators = {
        "app-b": _generator(b, [{"name": "b-get-data", **app_a},
                                {"name": "b-post-data", "method": "POST", **app_a}], 2 * SOAK_RATE),
        "app-c": _generator(c, [{"name": "c-get-data", **app_a}], SOAK_RATE),
        "host": _generator(None, [_gateway_case(status, "partner-a"), _gateway_case(status, "partner-b"),
                                  _gateway_case(status, "stranger")], 3 * SOAK_RATE),
    }
    expected = dict(CASES)
    pids = {n["name"]: int(n["pid"]) for n in status["nodes"]}
    started = time.monotonic()
    samples: list[tuple[float, dict[str, tuple[int, int]]]] = []
    outputs: dict[str, str] = {}
    try:
        while time.monotonic() - started < SOAK_SECONDS:
            samples.append((time.monotonic() - started, {n: _proc_sample(p) for n, p in pids.items()}))
            time.sleep(min(5.0, SOAK_SECONDS / 20))
        samples.append((time.monotonic() - started, {n: _proc_sample(p) for n, p in pids.items()}))
        for name, proc in generators.items():
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"{name} generator: {err[-2000:]}"
            outputs[name] = out
    finally:
        for proc in generators.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    results: list[tuple[float, str, str, float]] = sorted(
        (float(t), str(case), str(got), float(sec))
        for out in outputs.values() for t, case, got, sec in json.loads(out)["records"]
    )  # (due t, case, got, seconds from due)

    wrong = [(t, case, got) for t, case, got, _ in results if got != expected[case]]
    base = next(s for t, s in samples if t >= SOAK_SECONDS * WARMUP)
    end = samples[-1][1]
    rss_growth = {n: end[n][0] - base[n][0] for n in pids}
    fd_growth = {n: end[n][1] - base[n][1] for n in pids}
    allowed = [sec for t, case, got, sec in results if case == "b-get-data"]
    q2 = [sec for t, case, _, sec in results
          if case == "b-get-data" and SOAK_SECONDS / 4 <= t < SOAK_SECONDS / 2]
    q4 = [sec for t, case, _, sec in results if case == "b-get-data" and t >= SOAK_SECONDS * 3 / 4]

    def pct(xs: list[float], q: float) -> float:
        return round(sorted(xs)[min(len(xs) - 1, int(len(xs) * q))] * 1000, 1) if xs else -1.0

    gw_ok = [sec for _, case, _, sec in results if case in ("gw-partner-a", "gw-partner-b")]
    figures(
        seconds=round(samples[-1][0], 1), requests=len(results), offered_rps=6 * SOAK_RATE,
        achieved_rps=round(len(results) / SOAK_SECONDS, 1),
        per_case={case: sum(1 for _, c2, _, _ in results if c2 == case) for case, _ in CASES},
        wrong=len(wrong), wrong_first=wrong[:5],
        rss_kib_base={n: base[n][0] for n in pids}, rss_kib_growth=rss_growth,
        fds_base={n: base[n][1] for n in pids}, fd_growth=fd_growth,
        b_get_ms={"p50": pct(allowed, 0.5), "p99": pct(allowed, 0.99), "max": pct(allowed, 1.0)},
        gateway_ok_ms={"p50": pct(gw_ok, 0.5), "p99": pct(gw_ok, 0.99), "max": pct(gw_ok, 1.0)},
        b_get_p50_ms_q2_q4=[pct(q2, 0.5), pct(q4, 0.5)],
        # ten points over the run: a slow leak climbs steadily, allocator growth levels off
        rss_kib_series={n: [s[n][0] for _, s in samples[:: max(1, len(samples) // 10)]] for n in pids},
    )
    assert len(results) >= SOAK_SECONDS, f"only {len(results)} requests"
    assert len(results) >= 0.95 * 6 * SOAK_RATE * SOAK_SECONDS, f"rate not held: {len(results)} requests"
    assert not wrong, wrong[:10]
    assert all(g < 16 * 1024 for g in rss_growth.values()), rss_growth  # KiB after warm-up
    assert all(g <= 16 for g in fd_growth.values()), fd_growth
    assert statistics.median(q4) < 3 * statistics.median(q2) + 0.05, (q2, q4)
    assert all(runner.cluster_status(seed)["nodes"][i]["restarts"] == 0 for i in range(len(pids)))
