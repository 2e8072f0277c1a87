"""`make bench`: the side-by-side data-plane benchmark of issue 8 (direct, zerotunnel, stunnel, haproxy).

Builds the testbed (bench/setups.py), runs every workload (bench/workloads.py) through every system in
alternation — the order of systems rotates each repetition, so a burst of load from elsewhere on the
machine does not always land on the same one (performance.md §6: ≥3 repetitions, baseline in the same
run) — then prints one table of medians (min–max) with each system's ratio to zerotunnel, the issue-8
targets met or not, writes JSON to bench/out/ and appends both tables to bench/RESULTS.md.

    python -m bench [--quick] [--reps 3] [--duration 10] [--idle 10000] [--systems ...] [--workloads ...]
    python -m bench --cleanup      # remove the namespaces of a bench killed with SIGKILL

Benchmarks never decide whether the test suite passes (DESIGN.md §5); exit status only says the run
completed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from bench import workloads as wl
from bench.setups import BenchError, System, Testbed, progress
from zerotunnel.cluster.network import destroy_network, list_clusters
from zerotunnel.errors import ZerotunnelError

BENCH_DIR = Path(__file__).resolve().parent
SYSTEMS = ("direct", "zerotunnel", "stunnel", "haproxy")
WORKLOADS = ("bulk", "keepalive16", "keepalive64", "churn", "latency", "idle")
_BENCH_CLUSTER = re.compile(r"^zb[0-9a-f]{6}$")

Results = dict[str, dict[str, list[dict[str, float]]]]  # workload → system → one dict per repetition


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: a metric of a workload, and which way is better."""

    label: str
    workload: str
    metric: str
    higher_is_better: bool
    digits: int = 2


ROWS = (
    Row("bulk, 1 TCP stream (Gb/s)", "bulk", "gbps", True),
    Row("keep-alive 16 conns (req/s)", "keepalive16", "rps", True, 0),
    Row("keep-alive 64 conns (req/s)", "keepalive64", "rps", True, 0),
    Row("churn, Connection: close (req/s)", "churn", "rps", True, 0),
    Row("latency p50 @rate (ms)", "latency", "p50_ms", False, 3),
    Row("latency p90 @rate (ms)", "latency", "p90_ms", False, 3),
    Row("latency p99 @rate (ms)", "latency", "p99_ms", False, 3),
    Row("added p50 over direct (ms)", "latency", "added_p50_ms", False, 3),
    Row("added p90 over direct (ms)", "latency", "added_p90_ms", False, 3),
    Row("added p99 over direct (ms)", "latency", "added_p99_ms", False, 3),
    Row("idle conn, client-side proxy (KiB each)", "idle", "kib_per_conn client", False, 1),
    Row("idle conn, server-side proxy (KiB each)", "idle", "kib_per_conn server", False, 1),
    Row("CPU-s per 1k req, client proxy (keep-alive 16)", "keepalive16", "cpu_s_per_1k client", False, 3),
    Row("CPU-s per 1k req, server proxy (keep-alive 16)", "keepalive16", "cpu_s_per_1k server", False, 3),
)


# --- statistics and rendering (no I/O) -------------------------------------------------------------


def add_latency_deltas(results: Results) -> None:
    """Added latency is paired per repetition: system pXX minus direct pXX of the same repetition."""
    lat = results.get("latency", {})
    base = lat.get("direct")
    if not base:
        return
    for reps in lat.values():
        for i, rep in enumerate(reps):
            if i < len(base):
                for p in ("p50", "p90", "p99"):
                    rep[f"added_{p}_ms"] = rep[f"{p}_ms"] - base[i][f"{p}_ms"]


def summarize(results: Results) -> dict[str, dict[str, dict[str, float]]]:
    """metric key `workload/metric` → system → {median, min, max, n}."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in ROWS:
        for system, reps in results.get(row.workload, {}).items():
            values = [r[row.metric] for r in reps if row.metric in r]
            if values:
                out.setdefault(f"{row.workload}/{row.metric}", {})[system] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                    "n": float(len(values)),
                }
    return out


def _fmt(v: float, digits: int) -> str:
    return f"{v:,.{digits}f}"


def render_table(summary: dict[str, dict[str, dict[str, float]]], systems: Sequence[str]) -> str:
    """Markdown: one row per metric, a cell per system: median (min–max), ×ratio to zerotunnel."""
    head = "| workload | " + " | ".join(systems) + " |"
    lines = [head, "|---|" + "---|" * len(systems)]
    for row in ROWS:
        cells = summary.get(f"{row.workload}/{row.metric}")
        if not cells:
            continue
        zt = cells.get("zerotunnel", {}).get("median")
        out = []
        for s in systems:
            c = cells.get(s)
            if c is None:
                out.append("–")
                continue
            text = _fmt(c["median"], row.digits)
            if c["n"] > 1:
                text += f" ({_fmt(c['min'], row.digits)}–{_fmt(c['max'], row.digits)})"
            if s != "zerotunnel" and zt and not row.metric.startswith("added_"):
                text += f" ×{c['median'] / zt:.2f}"
            out.append(text)
        lines.append(f"| {row.label} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def _median(summary: dict[str, dict[str, dict[str, float]]], key: str, system: str) -> float | None:
    cell = summary.get(key, {}).get(system)
    return None if cell is None else cell["median"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def evaluate_targets(summary: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Issue 8's targets, as ratios in this run; `met` is None when a needed figure is missing."""
    m = _median
    out: list[dict[str, Any]] = []

    def add(
        workload: str, target: str, measured: float | None, unit: str, ok: Callable[[float], bool]
    ) -> None:
        out.append(
            {
                "workload": workload,
                "target": target,
                "measured": measured,
                "unit": unit,
                "met": None if measured is None else ok(measured),
            }
        )

    bulk = _ratio(m(summary, "bulk/gbps", "zerotunnel"), m(summary, "bulk/gbps", "stunnel"))
    add("bulk throughput", "≥ 1.0× stunnel (stretch); never < 0.5×", bulk, "× stunnel", lambda r: r >= 0.5)
    for conns in (16, 64):
        key = f"keepalive{conns}/rps"
        add(
            f"keep-alive req/s ({conns} conns)",
            "≥ 1.2× haproxy",
            _ratio(m(summary, key, "zerotunnel"), m(summary, key, "haproxy")),
            "× haproxy",
            lambda r: r >= 1.2,
        )
    add(
        "churn req/s",
        "≥ 10× haproxy",
        _ratio(m(summary, "churn/rps", "zerotunnel"), m(summary, "churn/rps", "haproxy")),
        "× haproxy",
        lambda r: r >= 10,
    )
    add(
        "added p99 latency at the fixed rate",
        "≤ +1 ms over direct",
        m(summary, "latency/added_p99_ms", "zerotunnel"),
        "ms",
        lambda v: v <= 1.0,
    )
    idle = [m(summary, f"idle/kib_per_conn {side}", "zerotunnel") for side in ("client", "server")]
    add(
        "idle tunneled connection",
        "≤ 16 KiB per node proxy",
        max(v for v in idle if v is not None) if any(v is not None for v in idle) else None,
        "KiB (worse side)",
        lambda v: v <= 16,
    )
    cpu = [m(summary, f"keepalive16/cpu_s_per_1k {side}", "zerotunnel") for side in ("client", "server")]
    add(
        "CPU per 1,000 rps per node proxy",
        "≤ 0.15 cores",
        max(v for v in cpu if v is not None) if any(v is not None for v in cpu) else None,
        "cores (worse side)",
        lambda v: v <= 0.15,
    )
    return out


def render_targets(targets: list[dict[str, Any]]) -> str:
    lines = ["| workload | target | measured | met |", "|---|---|---|---|"]
    for t in targets:
        measured = "–" if t["measured"] is None else f"{t['measured']:.3g} {t['unit']}"
        met = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        lines.append(f"| {t['workload']} | {t['target']} | {measured} | {met} |")
    return "\n".join(lines)


def render_profile(profile: dict[str, list[tuple[str, float, float]]], top: int = 8) -> str:
    lines = []
    for label, frames in profile.items():
        lines.append(f"{label} node proxy, top self time (self % / inclusive %, py-spy --gil):")
        for frame, own, incl in frames[:top]:
            lines.append(f"  {own:5.1f} / {incl:5.1f}  {frame}")
    return "\n".join(lines)


# --- the run --------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "arch": platform.machine(),
        "cpu": model,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _run_one(tb: Testbed, system: System, workload: str, args: argparse.Namespace) -> dict[str, float]:
    if workload == "bulk":
        return wl.bulk(tb, system, args.duration)
    if workload == "keepalive16":
        return wl.wrk(tb, system, 16, args.duration)
    if workload == "keepalive64":
        return wl.wrk(tb, system, 64, args.duration)
    if workload == "churn":
        return wl.wrk(tb, system, 16, args.duration, close=True)
    if workload == "latency":
        return wl.latency(tb, system, args.rate, args.duration, args.latency_conns)
    raise BenchError(f"unknown workload {workload}")


def _tool_missing(workload: str) -> str | None:
    tool = {"bulk": "iperf3", "keepalive16": "wrk", "keepalive64": "wrk", "churn": "wrk"}.get(workload)
    return tool if tool and shutil.which(tool) is None else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: Results = {}
    profile: dict[str, list[tuple[str, float, float]]] = {}
    outdir: Path = args.out
    outdir.mkdir(parents=True, exist_ok=True)
    peers = [s for s in args.systems if s in ("stunnel", "haproxy")]
    tb = Testbed(args.workdir, server=args.server, peers=peers)
    try:
        tb.start()
        systems = [s for s in args.systems if s in tb.systems]
        timed = [w for w in args.workloads if w != "idle"]
        for rep in range(args.reps):
            order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
            for workload in timed:
                missing = _tool_missing(workload)
                if missing:
                    if rep == 0:
                        progress(f"{workload}: {missing} not installed, skipped (scripts/bench-deps.sh)")
                    continue
                for name in order:
                    system = tb.activate(name)
                    progress(f"rep {rep + 1}/{args.reps} {workload:<11} {name}")
                    r = _run_one(tb, system, workload, args)
                    results.setdefault(workload, {}).setdefault(name, []).append(r)
                    progress("    " + ", ".join(f"{k}={v:.4g}" for k, v in r.items() if "rss" not in k))
        if "idle" in args.workloads:
            for name in (s for s in args.idle_systems if s in tb.systems):
                system = tb.activate(name)
                count = min(args.idle, system.max_conns or args.idle)
                progress(f"idle: {count} connections through {name}")
                r = wl.idle_memory(tb, system, count)
                results.setdefault("idle", {}).setdefault(name, []).append(r)
                progress("    " + ", ".join(f"{k}={v:.4g}" for k, v in r.items()))
        if args.profile and "zerotunnel" in tb.systems and shutil.which("wrk"):
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            if Path(py_spy).exists():
                zt = tb.activate("zerotunnel")
                for kind, conns, close in (("keep-alive 64", 64, False), ("churn", 16, True)):
                    progress(f"profiling the zerotunnel node proxies (py-spy) during {kind}")
                    tops = wl.profile(tb, zt, conns, args.duration, outdir, py_spy, close=close)
                    profile.update({f"{kind}, {side}": frames for side, frames in tops.items()})
            else:
                progress("py-spy not installed: no profile (scripts/bench-deps.sh installs it)")
        server = tb.server_kind
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # a second Ctrl-C must not cut the teardown short
        tb.close()
    add_latency_deltas(results)
    summary = summarize(results)
    return {
        "machine": machine(),
        "config": {
            "reps": args.reps,
            "duration_s": args.duration,
            "rate_rps": args.rate,
            "latency_conns": args.latency_conns,
            "idle_conns": args.idle,
            "systems": list(args.systems),
            "workloads": list(args.workloads),
            "server": server,
            "quick": args.quick,
        },
        "results": results,
        "summary": summary,
        "targets": evaluate_targets(summary),
        "profile": {k: [list(f) for f in v] for k, v in profile.items()},
    }


def report_markdown(report: dict[str, Any]) -> str:
    mc, cfg = report["machine"], report["config"]
    systems = [s for s in SYSTEMS if s in cfg["systems"]]
    text = [
        f"## Side-by-side data plane, `make bench` ({mc['date']}{', --quick' if cfg['quick'] else ''})",
        "",
        f'Machine: `uname -m` {mc["arch"]}, CPU "{mc["cpu"]}", {mc["cores"]} cores (shared with other jobs; '
        f"load average at the end {mc['loadavg']}), kernel {mc['kernel']}, Python {mc['python']}. Two nodes, "
        f"client pod → server pod ({cfg['server']} serving 1 KiB, iperf3 -s) across nodes; "
        f"{cfg['reps']} repetition(s) of {cfg['duration_s']:g} s per workload and system, systems "
        f"alternated; latency open-loop at {cfg['rate_rps']:g} req/s over {cfg['latency_conns']} "
        "connections; "
        f"{cfg['idle_conns']} idle connections. Cells: median (min–max) ×ratio to zerotunnel.",
        "",
        render_table(report["summary"], systems),
        "",
        "Issue 8 targets (ratios from this run):",
        "",
        render_targets(report["targets"]),
    ]
    if report["profile"]:
        text += [
            "",
            "```",
            render_profile({k: [tuple(f) for f in v] for k, v in report["profile"].items()}),
            "```",
        ]
    return "\n".join(text) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="1 repetition of 3 s, 2,000 idle connections")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3; 1 with --quick)")
    p.add_argument(
        "--duration", type=float, default=None, help="seconds per run (default 10; 3 with --quick)"
    )
    p.add_argument("--rate", type=float, default=1000.0, help="fixed rate of the latency workload")
    p.add_argument(
        "--latency-conns", type=int, default=16, help="keep-alive connections of the latency workload (16)"
    )
    p.add_argument("--idle", type=int, default=None, help="idle connections (default 10,000; 2,000 --quick)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of " + ",".join(SYSTEMS))
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of " + ",".join(WORKLOADS))
    p.add_argument("--idle-systems", default="zerotunnel,haproxy", help="systems measured for idle memory")
    p.add_argument("--server", choices=("auto", "nginx", "demo-app"), default="auto")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the py-spy profile")
    p.add_argument("--no-record", dest="record", action="store_false", help="do not append to RESULTS.md")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="directory for the JSON and profiles")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/zt-bench"), help="configs, certs and logs")
    p.add_argument("--cleanup", action="store_true", help="only remove leftovers of killed bench runs")
    args = p.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.idle = args.idle or (2000 if args.quick else 10000)
    args.systems = [s for s in args.systems.split(",") if s]
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.idle_systems = [s for s in args.idle_systems.split(",") if s]
    for s in (*args.systems, *args.idle_systems):
        if s not in SYSTEMS:
            p.error(f"unknown system {s!r}")
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}")
    if "zerotunnel" not in args.systems:
        p.error("zerotunnel must be one of the systems: ratios are to it")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    if args.cleanup:
        for cluster in list_clusters():
            if _BENCH_CLUSTER.match(cluster):
                destroy_network(cluster)
                progress(f"removed leftovers of {cluster}")
        return 0
    # also SIGINT: a shell starting us in the background leaves it ignored, and Ctrl-C must still clean up
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _terminate)
    started = time.monotonic()
    try:
        report = run(args)
    except KeyboardInterrupt:
        progress("interrupted; everything stopped and removed")
        return 130
    except ZerotunnelError as exc:
        progress(f"failed: {exc}")
        return 1
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    json_path = args.out / f"bench-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2, sort_keys=True))
    md = report_markdown(report)
    print(md)
    if args.record:
        with (BENCH_DIR / "RESULTS.md").open("a") as f:
            f.write("\n" + md)
    progress(
        f"done in {time.monotonic() - started:.0f} s; JSON {json_path}"
        + ("; appended to bench/RESULTS.md" if args.record else "")
    )
    return 0
