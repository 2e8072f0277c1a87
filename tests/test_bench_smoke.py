"""`make bench` smoke test: the harness builds its testbed, measures through zerotunnel, and leaves nothing.

Benchmarks never decide whether the suite passes (DESIGN.md §5), so this asserts no performance: only
that a one-second run of the fixed-rate latency workload through two node proxies yields numbers, and
that every network namespace and process of the run is gone afterwards. It uses our demo app as the
server and bench/loadgen.py as the client, so it needs none of the packages scripts/bench-deps.sh adds.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nft"),
]

ROOT = Path(__file__).resolve().parents[1]


def _bench_netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith("zt-zb")}


def _procs_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(cmdline)
    return found


def test_one_second_latency_run_through_zerotunnel_gives_numbers_and_cleans_up(tmp_path: Path) -> None:
    before = _bench_netns()
    out_dir, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(
        [
            sys.executable, "-m", "bench", "--systems", "zerotunnel", "--workloads", "latency",
            "--reps", "1", "--duration", "1", "--rate", "200", "--server", "demo-app",
            "--no-profile", "--no-record", "--out", str(out_dir), "--workdir", str(work),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report_path,) = out_dir.glob("bench-*.json")
    report = json.loads(report_path.read_text())
    (rep,) = report["results"]["latency"]["zerotunnel"]
    assert rep["requests"] > 0
    assert all(math.isfinite(rep[k]) and rep[k] > 0 for k in ("p50_ms", "p90_ms", "p99_ms"))
    assert report["summary"]["latency/p99_ms"]["zerotunnel"]["median"] == rep["p99_ms"]
    assert "| latency p99 @rate (ms) |" in proc.stdout
    assert _bench_netns() <= before, "bench left network namespaces behind"
    assert not _procs_mentioning(str(work)), "bench left processes behind"
