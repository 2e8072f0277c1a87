"""Named network namespaces and the `ip` commands run in them.

DESIGN.md §4: the local cluster's nodes and pods are named network namespaces (`ip netns add`, files
under /run/netns), so users can step into them with `ip netns exec` and other tools see them. All
configuration goes through `ip -batch`, one process per namespace, which keeps `up` fast on a small
machine (a process per command would cost tens of milliseconds per pod).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from zerotunnel.errors import ZerotunnelError
from zerotunnel.node.capture import in_netns

NETNS_RUN_DIR = Path("/run/netns")
ETC_NETNS_DIR = Path("/etc/netns")
_TIMEOUT = 60.0


class NetworkSetupError(ZerotunnelError):
    """An `ip` command (or a sysctl) the network plan needs failed."""


def _run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=_TIMEOUT, check=False
        )
    except FileNotFoundError as exc:
        raise NetworkSetupError(f"{argv[0]} not found: install iproute2 (scripts/setup.sh)") from exc


def ip_batch(netns: str | None, commands: Sequence[str], *, force: bool = False) -> None:
    """Run `ip` commands (one per line, without the leading `ip`) in `netns`, None = root.

    `force` keeps going past failing lines (teardown); otherwise the first failure raises with the
    line `ip` reports.
    """
    if not commands:
        return
    argv = ["ip"]
    if netns is not None:
        argv += ["-n", netns]
    if force:
        argv.append("-force")
    argv += ["-batch", "-"]
    proc = _run(argv, "\n".join(commands) + "\n")
    if proc.returncode != 0 and not force:
        where = f" in netns {netns}" if netns else ""
        raise NetworkSetupError(f"ip failed{where}: {proc.stderr.strip()}")


def list_netns() -> list[str]:
    """Names of the named network namespaces (the files `ip netns add` made)."""
    try:
        return sorted(p.name for p in NETNS_RUN_DIR.iterdir())
    except FileNotFoundError:
        return []


def netns_exists(name: str) -> bool:
    return (NETNS_RUN_DIR / name).exists()


def add_netns(names: Sequence[str]) -> None:
    ip_batch(None, [f"netns add {n}" for n in names])


def netns_pids(name: str) -> list[int]:
    proc = _run(["ip", "netns", "pids", name])
    return [int(x) for x in proc.stdout.split()] if proc.returncode == 0 else []


def delete_netns(name: str, *, kill_processes: bool = True) -> None:
    """Delete a named netns; with `kill_processes`, first SIGKILL what still runs in it.

    A namespace lives as long as a process is inside it: deleting only the name would leave its
    links and addresses behind, invisible, after a crash. Missing namespaces are not an error.
    """
    if kill_processes:
        for pid in netns_pids(name):
            if pid != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    proc = _run(["ip", "netns", "delete", name])
    if proc.returncode != 0 and netns_exists(name):
        raise NetworkSetupError(f"cannot delete netns {name}: {proc.stderr.strip()}")


def list_links(netns: str | None = None) -> list[str]:
    """Interface names in `netns` (None = root), without the `@peer` suffix."""
    argv = ["ip", "-o", "link", "show"] if netns is None else ["ip", "-n", netns, "-o", "link", "show"]
    proc = _run(argv)
    if proc.returncode != 0:
        raise NetworkSetupError(f"ip link show failed: {proc.stderr.strip()}")
    names = []
    for line in proc.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def set_sysctl(netns: str, key: str, value: str) -> None:
    """Write a net.* sysctl inside `netns` (/proc/sys/net follows the calling thread's namespace)."""
    path = Path("/proc/sys") / key.replace(".", "/")
    try:
        with in_netns(netns):
            path.write_text(value)
    except OSError as exc:
        raise NetworkSetupError(f"cannot set {key}={value} in {netns}: {exc.strerror}") from exc


def exec_in_netns(
    name: str, argv: Sequence[str], *, timeout: float | None = _TIMEOUT, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`ip netns exec NAME argv…`, which also bind-mounts /etc/netns/NAME/* (the pod's hosts file)."""
    return subprocess.run(
        ["ip", "netns", "exec", name, *argv], input=stdin, capture_output=True, text=True,
        timeout=timeout, check=False,
    )
