"""Time for `zerotunnel up examples/seed` to return with every pod ready (issue 5: target < 10 s).

Runs the real command (console script, as a user would) several times from a clean state, each under
its own cluster name, and splits the wall time with the supervisor's event timestamps: CLI start and
config check, supervisor start, network, capture, node proxies ready, pods ready. `down` is timed too.

Run (root): .venv/bin/python bench/bench_up.py [--runs 3] [--example examples/seed]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZT = str(Path(sys.executable).parent / "zerotunnel")
MILESTONES = [
    ("config loaded", "supervisor up, config loaded"),
    ("network created", "network created"),
    ("control plane ready", "control plane ready"),
    ("capture installed", "capture/DNAT installed"),
    ("node proxies ready", "node proxies ready"),
    ("started", "pods registered + started"),
    (" ready", "every pod ready"),
]


def one(example: str, control_plane: bool) -> dict[str, float]:
    name = "b" + secrets.token_hex(4)
    t0 = time.time()
    flags = ["--control-plane"] if control_plane else ["--standalone"]
    up = subprocess.run([ZT, "up", "--name", name, "-o", "json", *flags, example], capture_output=True,
                        text=True, timeout=120, check=False)
    t_up = time.time() - t0
    if up.returncode != 0:
        subprocess.run([ZT, "down", "--name", name], capture_output=True, check=False)
        raise SystemExit(f"up failed: {up.stderr}")
    status = json.loads(up.stdout)
    out = {"up (wall)": t_up}
    for key, label in MILESTONES:
        ev = next((e for e in status["events"] if key in e["message"]
                   and (key != " ready" or e["message"] == f"cluster {name} ready")), None)
        if ev is not None:
            out[label] = datetime.fromisoformat(ev["time"]).timestamp() - t0
    t1 = time.time()
    subprocess.run([ZT, "down", "--name", name], capture_output=True, check=True, timeout=60)
    out["down (wall)"] = time.time() - t1
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--example", default=str(ROOT / "examples" / "seed"))
    parser.add_argument("--control-plane", action="store_true", help="up --control-plane")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_up needs root (network namespaces)")
    runs = [one(args.example, args.control_plane) for _ in range(args.runs)]
    mode = " --control-plane" if args.control_plane else ""
    print(f"# zerotunnel up{mode} {Path(args.example).name}: {args.runs} runs, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print("| milestone (s since `up` started) | median | min | max |")
    print("|---|---|---|---|")
    keys = [label for _, label in MILESTONES] + ["up (wall)", "down (wall)"]
    for k in keys:
        vals = [r[k] for r in runs if k in r]
        if vals:
            print(f"| {k} | {statistics.median(vals):.2f} | {min(vals):.2f} | {max(vals):.2f} |")


if __name__ == "__main__":
    main()
