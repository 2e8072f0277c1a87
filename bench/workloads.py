"""The workloads of issue 8 ("The benchmark"), each run from the client pod against one `System`.

Every function returns a flat dict of numbers for one repetition; `run.py` alternates systems and
repetitions and takes medians. Proxy costs are read from /proc, not from the proxies themselves, so
the same measurement applies to zerotunnel, stunnel and haproxy alike (performance.md §6: CPU-seconds
per 1,000 requests, RSS per idle connection).
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.setups import BenchError, System, Testbed

LOADGEN = str(Path(__file__).with_name("loadgen.py"))
CLK_TCK = os.sysconf("SC_CLK_TCK")

_WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(ms|s|m)")
_WRK_SOCKERR = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and all its threads (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def _run(tb: Testbed, argv: list[str], timeout: float) -> str:
    out = subprocess.run(tb.in_client(*argv), capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise BenchError(f"{argv[0]} failed ({out.returncode}): {out.stderr.strip()[-1500:]}")
    return out.stdout


def bulk(tb: Testbed, system: System, duration: float) -> dict[str, float]:
    """Workload 1: one TCP stream for `duration` seconds (iperf3), Gb/s received."""
    t = system.iperf
    secs = max(1, round(duration))
    out = _run(tb, ["iperf3", "-c", t.host, "-p", str(t.port), "-t", str(secs), "-J"], timeout=secs + 60)
    report = json.loads(out)
    if "error" in report:
        raise BenchError(f"iperf3: {report['error']}")
    return {"gbps": report["end"]["sum_received"]["bits_per_second"] / 1e9}


def wrk(tb: Testbed, system: System, conns: int, duration: float, *, close: bool = False) -> dict[str, float]:
    """Workloads 2 and 3: small requests (GET of 1 KiB) with `conns` keep-alive connections, or with
    `Connection: close` (a new connection per request); also CPU-s per 1,000 requests per proxy (6)."""
    t = system.http
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{t.host}:{t.port}/1k")
    before = {label: cpu_seconds(pid) for label, pid in system.proxy_pids.items()}
    out = _run(tb, argv, timeout=duration + 60)
    after = {label: cpu_seconds(pid) for label, pid in system.proxy_pids.items()}
    rps = _WRK_RPS.search(out)
    total = _WRK_TOTAL.search(out)
    if rps is None or total is None:
        raise BenchError(f"unexpected wrk output: {out[-800:]}")
    requests = int(total.group(1))
    result: dict[str, float] = {"rps": float(rps.group(1)), "requests": float(requests)}
    sockerr = _WRK_SOCKERR.search(out)
    non2xx = _WRK_NON2XX.search(out)
    result["errors"] = float(
        (sum(int(g) for g in sockerr.groups()) if sockerr else 0) + (int(non2xx.group(1)) if non2xx else 0)
    )
    for label in system.proxy_pids:
        result[f"cpu_s_per_1k {label}"] = (after[label] - before[label]) / max(requests, 1) * 1000.0
    return result


def latency(tb: Testbed, system: System, rate: float, duration: float, conns: int = 4) -> dict[str, float]:
    """Workload 4: open-loop fixed rate (bench/loadgen.py), percentiles in ms."""
    t = system.http
    out = _run(
        tb,
        [
            sys.executable,
            LOADGEN,
            "latency",
            "--host",
            t.host,
            "--port",
            str(t.port),
            "--rate",
            str(rate),
            "--duration",
            str(duration),
            "--conns",
            str(conns),
        ],
        timeout=duration + 60,
    )
    result: dict[str, float] = json.loads(out)
    return result


def idle_memory(tb: Testbed, system: System, count: int, settle: float = 2.0) -> dict[str, float]:
    """Workload 5: hold `count` idle connections through the system; KiB of proxy RSS per connection."""
    t = system.http
    before = {label: rss_kib(pid) for label, pid in system.proxy_pids.items()}
    proc = subprocess.Popen(
        tb.in_client(
            sys.executable, LOADGEN, "hold", "--host", t.host, "--port", str(t.port), "--count", str(count)
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        deadline = time.monotonic() + 120 + count / 50
        line = ""
        while not line.startswith("ready"):
            if time.monotonic() > deadline:
                raise BenchError(f"{system.name}: {count} idle connections not open in time")
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                if not line:
                    err = proc.stderr.read() if proc.stderr else ""
                    raise BenchError(f"{system.name}: holder failed: {err.strip()[-800:]}")
        time.sleep(settle)
        after = {label: rss_kib(pid) for label, pid in system.proxy_pids.items()}
        proc.stdin.close()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    result = {f"kib_per_conn {label}": (after[label] - before[label]) / count for label in before}
    result.update({f"rss_mib_after {label}": after[label] / 1024 for label in after})
    return result


def profile(
    tb: Testbed,
    system: System,
    conns: int,
    duration: float,
    outdir: Path,
    py_spy: str,
    *,
    close: bool = False,
) -> dict[str, list[tuple[str, float, float]]]:
    """py-spy every proxy of `system` during a wrk run (issue 8: profile before optimizing).

    `--gil` keeps only samples holding the GIL, so idle waits (epoll, the config watcher's thread)
    do not dilute the shares; native time inside a C call shows as its calling Python line.

    Returns, per proxy, the top functions as (frame, self %, inclusive %). Not part of the figures:
    sampling slows the proxy down.
    """
    spies: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    secs = max(1, round(duration))
    for label, pid in system.proxy_pids.items():
        kind = "churn" if close else f"keepalive{conns}"
        raw = outdir / f"profile-{system.name}-{kind}-{label.replace(' ', '-')}.txt"
        spies[label] = (
            subprocess.Popen(
                [
                    py_spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(secs + 1),
                    "--rate",
                    "200",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--nonblocking",
                    "--gil",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            ),
            raw,
        )
    time.sleep(0.5)
    wrk(tb, system, conns, duration, close=close)
    tops: dict[str, list[tuple[str, float, float]]] = {}
    for label, (spy, raw) in spies.items():
        _, err = spy.communicate(timeout=60)
        if not raw.exists():
            tops[label] = [(f"py-spy failed: {err.decode(errors='replace').strip()[:200]}", 0.0, 0.0)]
            continue
        tops[label] = summarize_profile(raw.read_text())
    return tops


def summarize_profile(raw: str, top: int = 15) -> list[tuple[str, float, float]]:
    """Self and inclusive sample shares per frame from py-spy's collapsed ("raw") output."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [
            f for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")
        ]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    if total == 0:
        return []
    return [(frame, 100.0 * n / total, 100.0 * incl[frame] / total) for frame, n in own.most_common(top)]
