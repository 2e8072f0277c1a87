"""`up`, `down` and `status` of the local cluster: the parts that run in the user's command.

`up` validates the config in-process (so errors are listed at once, exit 2), cleans what a crashed
run left behind, starts the supervisor daemon (supervisor.py) with a double fork and `setsid` — the
daemon belongs to no terminal and outlives the shell — and follows its `status.json` until the
cluster is ready or has failed. A failed `up` leaves nothing behind: the supervisor tears down what
it built, and `up` removes the state directory after printing the reason.

`down` signals the supervisor (which stops every process and removes the network), then removes by
name whatever is still there — namespaces, links, /etc/netns directories, recorded processes, the
state directory — so it also cleans up after a supervisor that was killed, and is safe to run twice.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zerotunnel.cluster import network, podapi
from zerotunnel.cluster.state import (
    PHASE_FAILED,
    PHASE_READY,
    PHASE_STOPPED,
    ClusterDir,
    config_files,
    kill_process_group,
    pid_alive,
    write_json,
)
from zerotunnel.cluster.topology import validate_cluster_name
from zerotunnel.config import Config, load
from zerotunnel.control.files import read_config_paths
from zerotunnel.errors import InputError, ZerotunnelError

DEFAULT_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0

Progress = Callable[[str], None]


class ClusterError(ZerotunnelError):
    """`up` failed, or the cluster is not in a state the command needs."""


def needs_root_message(what: str) -> str:
    return (f"{what} needs root: it creates network namespaces, veth links and nftables rules "
            "(CAP_NET_ADMIN and CAP_SYS_ADMIN). Run it with sudo, or use `zerotunnel up --no-netns DIR` "
            "for the loopback development mode, which does not capture or encrypt traffic.")


def is_root() -> bool:
    return os.geteuid() == 0


def load_config(paths: Sequence[str]) -> Config:
    """Load and validate (every problem listed: `ConfigError`, an InputError, exit 2)."""
    return load(read_config_paths(list(paths)))


@dataclass(frozen=True, slots=True)
class UpResult:
    cluster: str
    status: dict[str, Any]
    seconds: float


def spawn_supervisor(cdir: ClusterDir, *, exec_: bool = True) -> int:
    """Start the supervisor as a daemon: fork, setsid, fork, then exec or run it in place.

    The first child leads a new session and exits at once, so the daemon (its child) is adopted
    by init, can never reacquire a controlling terminal, and is not in the caller's process group
    (a Ctrl-C on `up` does not reach it). Its stdout/stderr go to logs/control.log. Returns the
    daemon's pid (passed back through a pipe), so `up` can tell a slow start from a dead daemon.

    With `exec_` the daemon execs `python -m zerotunnel.cluster.supervisor` (a fresh interpreter:
    right for a caller with threads or foreign state, such as a test process). Without it, the
    daemon runs the supervisor in the forked copy of the `up` command, whose imports (the config
    loader, the CA) are already warm: about a second less to ready on a busy 2-core machine.
    """
    argv = [sys.executable, "-m", "zerotunnel.cluster.supervisor", "--state", str(cdir.root)]
    log_path = cdir.control_log
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # first child
        try:
            os.close(rfd)
            os.setsid()
            daemon = os.fork()
            if daemon != 0:
                os.write(wfd, str(daemon).encode())
                os._exit(0)
            os.close(wfd)
            devnull = os.open(os.devnull, os.O_RDONLY)
            out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(devnull, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.closerange(3, 65536)
            os.chdir(cdir.root)
            os.umask(0o022)
            if not exec_:
                from zerotunnel.cluster import supervisor

                sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the daemon's own stdio, kept for life
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
                os._exit(supervisor.main(["--state", str(cdir.root)]))
            os.execv(argv[0], argv)  # noqa: S606 - our own interpreter and module
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.write(2, f"zerotunnel: cannot start the supervisor: {exc!r}\n".encode())
        finally:
            os._exit(127)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    if not text.isdigit():
        raise ClusterError("could not start the supervisor daemon (fork failed)")
    return int(text)


def _cleanup(cdir: ClusterDir, progress: Progress | None = None) -> list[str]:
    """Remove everything of `cdir.cluster` by name; returns what was removed (for `down`)."""
    removed: list[str] = []
    for pid in cdir.recorded_pids():
        if pid_alive(pid):
            kill_process_group(pid)
            removed.append(f"process {pid}")
    if is_root():
        found = network.destroy_network(cdir.cluster)
        removed += [f"netns {n}" for n in found.netns] + [f"link {n}" for n in found.links]
        removed += [f"/etc/netns/{d}" for d in found.etc_dirs]
    if cdir.exists():
        shutil.rmtree(cdir.root, ignore_errors=True)
        removed.append(f"state {cdir.root}")
    if progress and removed:
        progress(f"removed {len(removed)} leftover object(s)")
    return removed


def up(
    paths: Sequence[str],
    cluster: str,
    *,
    netns: bool = True,
    proxies: bool = True,
    control_plane: bool = False,
    exec_supervisor: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Progress | None = None,
    state_root: Path | None = None,
) -> UpResult:
    """Bring the cluster up and return its status once every pod is ready (ClusterError if not)."""
    say = progress or (lambda _m: None)
    started = time.monotonic()
    validate_cluster_name(cluster)
    if netns and not is_root():
        raise InputError(needs_root_message("zerotunnel up"))
    absolute = [str(Path(p).resolve()) for p in paths]
    config = load_config(config_files(absolute))
    say(f"config valid: {len(config.pods)} pod(s), {len(config.services)} service(s), "
        f"{len(config.authorization_policies)} AuthorizationPolicy(ies)")
    cdir = ClusterDir.for_cluster(cluster, state_root)
    running = cdir.supervisor_pid()
    if running is not None:
        hint = "" if cluster == "zerotunnel" else f" --name {cluster}"
        raise InputError(f"cluster {cluster!r} is already up (supervisor pid {running}); "
                         f"run `zerotunnel down{hint}` first")
    leftovers = cdir.exists() or (is_root() and not network.find_leftovers(cluster).empty)
    if leftovers:
        say(f"cleaning up leftovers of a previous run of {cluster!r}")
        _cleanup(cdir, say)
    cdir.create()
    write_json(cdir.cluster_file, {"cluster": cluster, "paths": absolute, "netns": netns,
                                   "proxies": proxies, "control_plane": control_plane,
                                   "ready_timeout": timeout})
    daemon = spawn_supervisor(cdir, exec_=exec_supervisor)
    say(f"supervisor started (pid {daemon}, state in {cdir.root})")
    try:
        status = follow_until_settled(cdir, timeout + 15.0, say, daemon)
    except KeyboardInterrupt:
        say("interrupted: stopping the cluster and removing what was built")
        stop_supervisor(cdir)
        _cleanup(cdir)
        raise
    if status.get("phase") != PHASE_READY:
        reason = status.get("reason") or "the supervisor stopped without saying why"
        logs = _failure_logs(cdir, status)
        wait_supervisor_exit(cdir, STOP_TIMEOUT)
        _cleanup(cdir)
        raise ClusterError(f"up failed: {reason}" + (f"\n{logs}" if logs else ""))
    return UpResult(cluster, status, time.monotonic() - started)


def _failure_logs(cdir: ClusterDir, status: dict[str, Any]) -> str:
    """The end of the control log when the supervisor died without a reason."""
    if status.get("reason"):
        return ""
    try:
        lines = cdir.control_log.read_text(errors="replace").splitlines()[-20:]
    except OSError:
        return ""
    return "control log:\n" + "\n".join(lines)


def follow_until_settled(cdir: ClusterDir, timeout: float, say: Progress, daemon: int) -> dict[str, Any]:
    """Print the supervisor's events as they come; return the status once ready/failed/stopped."""
    shown = 0
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while True:
        status = cdir.status() or status
        events = status.get("events", [])
        for e in events[shown:]:
            say(str(e.get("message")))
        shown = max(shown, len(events))
        phase = status.get("phase")
        if phase in (PHASE_READY, PHASE_FAILED, PHASE_STOPPED):
            return status
        if not pid_alive(daemon):
            # the daemon is gone without a final status: it crashed
            final = cdir.status() or status
            if final.get("phase") in (PHASE_READY, PHASE_FAILED, PHASE_STOPPED):
                continue
            return {**final, "phase": PHASE_FAILED, "reason": final.get("reason")}
        if time.monotonic() > deadline:
            stop_supervisor(cdir, STOP_TIMEOUT)
            return {**status, "phase": PHASE_FAILED,
                    "reason": f"not ready after {timeout:.0f} s; last event: "
                              f"{events[-1]['message'] if events else 'none'}"}
        time.sleep(0.05)


def wait_supervisor_exit(cdir: ClusterDir, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while cdir.supervisor_pid() is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop_supervisor(cdir: ClusterDir, timeout: float = STOP_TIMEOUT) -> bool:
    """SIGTERM the supervisor and wait for it; SIGKILL it if it does not finish in `timeout`."""
    pid = cdir.supervisor_pid()
    if pid is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_supervisor_exit(cdir, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_supervisor_exit(cdir, 5.0)
    return True


def down(cluster: str, *, state_root: Path | None = None, progress: Progress | None = None) -> list[str]:
    """Stop and remove everything of `cluster`; idempotent. Returns what was found and removed."""
    validate_cluster_name(cluster)
    say = progress or (lambda _m: None)
    cdir = ClusterDir.for_cluster(cluster, state_root)
    settings = cdir.settings() or {}
    ours = cdir.exists() or cluster in network.list_clusters()
    if settings.get("netns", True) and not is_root() and ours:
        raise InputError(needs_root_message("zerotunnel down"))
    removed: list[str] = []
    if stop_supervisor(cdir):
        say(f"stopped the supervisor of {cluster!r} (it stops every process and removes the network)")
        removed.append("supervisor")
    removed += _cleanup(cdir)
    return removed


def cluster_status(cluster: str, *, state_root: Path | None = None, live: bool = True) -> dict[str, Any]:
    """The supervisor's status, with each pod's identity and certificate expiry from its node proxy."""
    validate_cluster_name(cluster)
    cdir = ClusterDir.for_cluster(cluster, state_root)
    status = cdir.status()
    if status is None:
        raise ClusterError(f"cluster {cluster!r} is not up (no {cdir.status_file})")
    pid = cdir.supervisor_pid()
    status["supervisor_running"] = pid is not None
    if pid is None and status.get("phase") == PHASE_READY:
        status["phase"] = "supervisor-gone"
    if live and status.get("proxies"):
        served: dict[str, dict[str, Any]] = {}
        for node in status.get("nodes", []):
            sock = node.get("socket")
            if not sock:
                continue
            try:
                reply = podapi.request_sync(Path(sock), {"op": "list"}, timeout=2.0)
            except podapi.PodApiError as exc:
                node["api_error"] = exc.message
                continue
            node["served_pods"] = len(reply.get("pods", []))
            for p in reply.get("pods", []):
                if isinstance(p, dict) and "uid" in p:
                    served[str(p["uid"])] = p
        for pod in status.get("pods", []):
            entry = served.get(f"{pod['namespace']}/{pod['name']}")
            if entry is not None:
                pod["proxy_ready"] = entry.get("ready")
                pod["cert_expiry"] = entry.get("cert_expiry")
                pod["identity"] = entry.get("identity") or pod.get("identity")
    return status


def find_pod(status: dict[str, Any], name: str, namespace: str | None) -> dict[str, Any]:
    """The pod `namespace/name`; without a namespace, `default/name` or else the only pod so named."""
    pods = status.get("pods", [])
    if namespace is not None:
        for p in pods:
            if p["namespace"] == namespace and p["name"] == name:
                return dict(p)
        raise InputError(f"pod {namespace}/{name} not found")
    matches = [p for p in pods if p["name"] == name]
    default = [p for p in matches if p["namespace"] == "default"]
    if default:
        return dict(default[0])
    if len(matches) == 1:
        return dict(matches[0])
    if not matches:
        raise InputError(f"pod {name!r} not found (pods: "
                         f"{', '.join(p['namespace'] + '/' + p['name'] for p in pods) or 'none'})")
    raise InputError(f"pod name {name!r} is in several namespaces "
                     f"({', '.join(p['namespace'] for p in matches)}): use -n NAMESPACE")
