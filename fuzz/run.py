"""Coverage-guided fuzzing of fuzz/targets.py with atheris (libFuzzer), security.md §4 item 30.

    .venv/bin/python fuzz/run.py TARGET [SECONDS]      # one target
    make fuzz SECONDS=60 [TARGETS="h2_server csr"]      # each target for SECONDS

The recorded corpus fuzz/corpus/TARGET/ seeds the run (read-only); what libFuzzer finds
interesting goes to fuzz/.work/TARGET/ (not committed), crashes to fuzz/crashes/ — minimize one
with `-minimize_crash=1` and commit it as fuzz/corpus/TARGET/finding-<what>, where
tests/reliability/test_fuzz.py replays it. An input slower than 1 s is a finding (`-timeout=1`).
Prints one JSON line per target: executions, seconds, new coverage features, result.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(target: str, seconds: int) -> None:
    """Runs inside the libFuzzer process."""
    import atheris  # type: ignore[import-untyped]  # no stubs published

    with atheris.instrument_imports(include=["zerotunnel", "h2", "hpack", "hyperframe", "yaml", "targets"]):
        sys.path.insert(0, str(HERE))
        import targets

    fn = targets.TARGETS[target]
    allowed = targets.ALLOWED[target]

    def one_input(data: bytes) -> None:
        with contextlib.suppress(*allowed):
            fn(data)

    work = HERE / ".work" / target
    work.mkdir(parents=True, exist_ok=True)
    (HERE / "crashes").mkdir(exist_ok=True)
    args = [sys.argv[0], str(work), str(HERE / "corpus" / target), f"-max_total_time={seconds}",
            "-timeout=1", "-rss_limit_mb=2048", "-print_final_stats=1",
            f"-artifact_prefix={HERE / 'crashes'}/{target}-", "-max_len=4096"]
    atheris.Setup(args, one_input)
    atheris.Fuzz()


def parent(target: str, seconds: int) -> dict[str, object]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, "--child", target, str(seconds)],
                          capture_output=True, text=True, check=False)
    log = proc.stdout + proc.stderr
    (HERE / ".work").mkdir(exist_ok=True)
    (HERE / ".work" / f"{target}.log").write_text(log)
    execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
    cov = re.findall(r"cov: (\d+) ft: (\d+)", log)
    crashed = proc.returncode != 0
    result = "crash" if crashed else "clean"
    artifact = re.search(r"Test unit written to (\S+)", log)
    replay_ms = None
    if crashed and "libFuzzer: timeout" in log and artifact:
        # libFuzzer's alarm fires on wall time; on a shared, loaded machine an input can stall without
        # being slow. Replay it uninstrumented: only a reproducible > 1 s input is a finding.
        replay_ms = replay(target, Path(artifact.group(1)))
        result = "timeout" if replay_ms >= 1000 else "timeout-not-reproduced"
    return {
        "target": target, "seconds": round(time.monotonic() - t0, 1),
        "execs": int(execs[-1]) if execs else None,
        "coverage_edges": int(cov[-1][0]) if cov else None,
        "features": int(cov[-1][1]) if cov else None,
        "result": result,
        "artifact": artifact.group(1) if artifact else None,
        "replay_ms": replay_ms,
        "detail": log.strip().splitlines()[-25:] if crashed else None,
    }


def replay(target: str, path: Path) -> float:
    """Best of three uninstrumented runs of one input, in milliseconds."""
    code = (f"import sys, time, contextlib; sys.path.insert(0, {str(HERE)!r}); import targets\n"
            f"data = open({str(path)!r}, 'rb').read(); best = 1e9\n"
            "for _ in range(3):\n"
            "    t = time.perf_counter()\n"
            f"    with contextlib.suppress(*targets.ALLOWED[{target!r}]): targets.TARGETS[{target!r}](data)\n"
            "    best = min(best, time.perf_counter() - t)\n"
            "print(best * 1000)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    try:
        return round(float(out.stdout.strip().splitlines()[-1]), 1)
    except (ValueError, IndexError):
        return float("inf")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]))
        return 0
    sys.path.insert(0, str(HERE))
    import targets

    seconds = int(os.environ.get("SECONDS_PER_TARGET") or (sys.argv[2] if len(sys.argv) > 2 else 10))
    names = sys.argv[1].split() if len(sys.argv) > 1 and sys.argv[1] else list(targets.TARGETS)
    failed = 0
    for name in names:
        result = parent(name, seconds)
        print(json.dumps(result), flush=True)
        failed += result["result"] not in ("clean", "timeout-not-reproduced")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
