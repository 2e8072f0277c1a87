"""Supervised processes: real child processes, restarted with backoff, stopped with their group."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from zerotunnel.cluster.procs import (
    BACKOFF_INITIAL,
    BACKOFF_MAX,
    Managed,
    ProcessSpec,
    argv_in_netns,
    next_backoff,
)
from zerotunnel.cluster.state import pid_alive


def _spec(tmp_path: Path, *argv: str) -> ProcessSpec:
    return ProcessSpec(tuple(argv), {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, tmp_path,
                       tmp_path / "out.log", "test")


async def _until(pred: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def test_backoff_doubles_to_the_cap() -> None:
    seq = [BACKOFF_INITIAL]
    while seq[-1] < BACKOFF_MAX:
        seq.append(next_backoff(seq[-1]))
    assert seq == [1, 2, 4, 8, 16, 30]
    assert next_backoff(BACKOFF_MAX) == BACKOFF_MAX


def test_argv_in_netns() -> None:
    assert argv_in_netns("zt-a-pod-x.y", ["sleep", "1"]) == (
        "ip", "netns", "exec", "zt-a-pod-x.y", "sleep", "1")
    assert argv_in_netns(None, ["sleep", "1"]) == ("sleep", "1")


async def test_crashing_command_is_restarted_and_counted(tmp_path: Path) -> None:
    changes: list[int] = []
    m = Managed(_spec(tmp_path, "sh", "-c", "echo run; exit 3"), lambda: changes.append(1),
                backoff_initial=0.05)
    m.start()
    await _until(lambda: m.restarts >= 3)
    await m.stop()
    assert m.state == "stopped" and m.last_exit == 3 and m.starts >= 3
    log = (tmp_path / "out.log").read_text()
    assert log.count("run\n") >= 3
    assert "exited with status 3; restart 1 in 0 s" in log
    assert changes


async def test_backoff_grows_between_restarts(tmp_path: Path) -> None:
    m = Managed(_spec(tmp_path, "false"), lambda: None, backoff_initial=0.2)
    m.start()
    t0 = time.monotonic()
    await _until(lambda: m.restarts >= 3)
    # 0.2 + 0.4 before the third exit is counted (the third run itself is instant)
    assert time.monotonic() - t0 >= 0.55
    await m.stop()


async def test_missing_program_is_reported_and_retried(tmp_path: Path) -> None:
    m = Managed(_spec(tmp_path, "/nonexistent/program"), lambda: None, backoff_initial=0.05)
    m.start()
    await _until(lambda: m.restarts >= 2)
    await m.stop()
    assert m.starts == 0 and m.last_error is not None and "cannot start" in m.last_error


async def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    # the shell ignores SIGTERM and has a background child: both must be gone after stop()
    script = "trap '' TERM; sleep 60 & echo $! > child.pid; wait"
    m = Managed(_spec(tmp_path, "sh", "-c", script), lambda: None)
    m.start()
    await _until(lambda: (tmp_path / "child.pid").exists() and (tmp_path / "child.pid").read_text().strip())
    child = int((tmp_path / "child.pid").read_text())
    leader = m.pid
    assert leader is not None and pid_alive(child)
    t0 = time.monotonic()
    await m.stop(grace=0.3)
    assert time.monotonic() - t0 < 5
    await _until(lambda: not pid_alive(child))
    assert not pid_alive(leader) and m.pid is None and m.restarts == 0


async def test_on_start_hook_sees_every_start(tmp_path: Path) -> None:
    seen: list[int] = []
    m = Managed(_spec(tmp_path, sys.executable, "-c", "pass"), lambda: None,
                on_start=lambda mm: seen.append(mm.starts), backoff_initial=0.05)
    m.start()
    await _until(lambda: len(seen) >= 2)
    await m.stop()
    assert seen[:2] == [1, 2]
