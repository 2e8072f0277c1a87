"""Processes the supervisor keeps running: start, restart with backoff, stop.

Issue 5: a crashed pod command is restarted with backoff and the restart is visible in `status`.
We follow the kubelet's CrashLoopBackOff shape with the brief's bounds: the first restart after 1 s,
doubling up to 30 s, back to 1 s once a run has lasted `RESET_AFTER` (the kubelet waits 10 minutes;
a local cluster is restarted far more often, so one minute of good running is enough). Any exit is a
crash here, as under `restartPolicy: Always`, the Pod default.

Every process runs in a session of its own (`start_new_session`), so stopping it signals its whole
process group: a shell script's children go with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("zerotunnel.cluster")

BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 30.0
RESET_AFTER = 60.0
STOP_GRACE = 3.0


def next_backoff(current: float) -> float:
    """1 s, 2 s, 4 s … capped at 30 s."""
    return min(current * 2, BACKOFF_MAX)


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """What to run: argv, environment, working directory, and the log file output is appended to."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: Path
    log_file: Path
    label: str


class Managed:
    """One supervised process: runs `spec` until `stop()`, restarting it whenever it exits."""

    def __init__(
        self,
        spec: ProcessSpec,
        on_change: Callable[[], None],
        on_start: Callable[[Managed], None] | None = None,
        *,
        backoff_initial: float = BACKOFF_INITIAL,
    ) -> None:
        self.spec = spec
        self.on_change = on_change
        self.on_start = on_start
        self.backoff_initial = backoff_initial
        self.proc: asyncio.subprocess.Process | None = None
        self.state = "pending"
        self.restarts = 0
        self.starts = 0
        self.last_exit: int | None = None
        self.last_error: str | None = None
        self.started_at: float | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.state == "running" else None

    @property
    def running(self) -> bool:
        return self.state == "running"

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"proc {self.spec.label}")

    def _note(self, text: str) -> None:
        """A line in the process's own log, so `zerotunnel logs` shows restarts between its output."""
        with contextlib.suppress(OSError), self.spec.log_file.open("a") as f:
            f.write(f"--- zerotunnel {time.strftime('%H:%M:%S')}: {text}\n")

    async def _spawn(self) -> asyncio.subprocess.Process:
        with self.spec.log_file.open("ab") as out:
            return await asyncio.create_subprocess_exec(
                *self.spec.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                cwd=self.spec.cwd, env=dict(self.spec.env), start_new_session=True,
            )

    async def _loop(self) -> None:
        delay = self.backoff_initial
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            started = loop.time()
            try:
                self.proc = await self._spawn()
            except OSError as exc:
                self.last_error = f"cannot start {self.spec.argv[0]}: {exc.strerror or exc}"
                self._note(self.last_error)
                log.error("%s: %s", self.spec.label, self.last_error)
                self.proc = None
                rc: int | None = None
            else:
                self.starts += 1
                self.state = "running"
                self.started_at = time.time()
                self.on_change()
                if self.on_start is not None:
                    self.on_start(self)
                rc = await self.proc.wait()
                self.last_exit = rc
            if self._stopping.is_set():
                break
            if loop.time() - started >= RESET_AFTER:
                delay = self.backoff_initial
            self.restarts += 1
            self.state = "backoff"
            why = f"exited with status {rc}" if rc is not None and rc >= 0 else (
                f"killed by signal {-rc}" if rc is not None else "did not start")
            self._note(f"{why}; restart {self.restarts} in {delay:.0f} s")
            log.warning("%s %s; restart %d in %.0f s", self.spec.label, why, self.restarts, delay)
            self.on_change()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = next_backoff(delay)
        self.state = "stopped"

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM the process group, SIGKILL after `grace`, and end the restart loop."""
        self._stopping.set()
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if proc is not None:
            # the leader is gone; anything left in its group (a daemonized child) goes too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.state = "stopped"


def argv_in_netns(netns: str | None, argv: Sequence[str]) -> tuple[str, ...]:
    """`ip netns exec NETNS argv…`: enters the netns and bind-mounts /etc/netns/NETNS/* (hosts)."""
    if netns is None:
        return tuple(argv)
    return ("ip", "netns", "exec", netns, *argv)
