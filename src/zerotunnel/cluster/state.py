"""Where a running local cluster keeps its files, and the status the supervisor publishes.

One directory per cluster (issue 5: one cluster per name), `/run/zerotunnel/<cluster>/` as root — a
tmpfs, so a reboot (which also drops every network namespace) leaves no stale state behind — or
`$XDG_RUNTIME_DIR/zerotunnel/<cluster>/` (else `/tmp/zerotunnel-<uid>/<cluster>/`) for `--no-netns`
without root. `ZEROTUNNEL_STATE_DIR` overrides the parent directory (tests, several users).

```
<state>/supervisor.pid     the supervisor daemon's pid (`down` signals it)
<state>/cluster.json       what `up` was asked for: name, config paths, mode
<state>/status.json        what runs now (the supervisor rewrites it atomically on every change)
<state>/addresses.json     every pod IP and service VIP, for the node proxies (`--addresses`)
<state>/ca/                the mesh CA (Istio `cacerts` layout), created once per cluster
<state>/node-<node>.sock   each node proxy's pod API (`--pod-api`)
<state>/logs/              control.log (the supervisor), node-<node>.log, pod-<ns>.<pod>.log
<state>/pods/<ns>.<pod>/   each pod's working directory
```

Files that another process reads while they change are written to a temporary name and renamed, so
a reader sees the old or the new content, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_CLUSTER = "zerotunnel"
STATE_ENV = "ZEROTUNNEL_STATE_DIR"

# status.json "phase" values
PHASE_STARTING = "starting"
PHASE_READY = "ready"
PHASE_FAILED = "failed"
PHASE_STOPPING = "stopping"
PHASE_STOPPED = "stopped"
TERMINAL_PHASES = frozenset({PHASE_READY, PHASE_FAILED, PHASE_STOPPED})


def state_root() -> Path:
    """The parent of every cluster's state directory (see the module docstring)."""
    override = os.environ.get(STATE_ENV)
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/run/zerotunnel")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "zerotunnel"
    return Path(f"/tmp/zerotunnel-{os.getuid()}")  # noqa: S108 - per-user, created 0700 below


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write `text` to `path` through a temporary file and a rename (readers never see half)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    tmp.replace(path)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when the file is missing or (mid-crash) unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as gone: it will never do anything again)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@dataclass(frozen=True, slots=True)
class ClusterDir:
    """The paths of one cluster's state directory."""

    cluster: str
    root: Path

    @classmethod
    def for_cluster(cls, cluster: str, root: Path | None = None) -> ClusterDir:
        return cls(cluster, (root or state_root()) / cluster)

    @property
    def pid_file(self) -> Path:
        return self.root / "supervisor.pid"

    @property
    def cluster_file(self) -> Path:
        return self.root / "cluster.json"

    @property
    def status_file(self) -> Path:
        return self.root / "status.json"

    @property
    def addresses_file(self) -> Path:
        return self.root / "addresses.json"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def control_log(self) -> Path:
        return self.log_dir / "control.log"

    def node_log(self, node: str) -> Path:
        return self.log_dir / f"node-{node}.log"

    def pod_log(self, namespace: str, name: str) -> Path:
        return self.log_dir / f"pod-{namespace}.{name}.log"

    def pod_dir(self, namespace: str, name: str) -> Path:
        return self.root / "pods" / f"{namespace}.{name}"

    def node_socket(self, node: str) -> Path:
        return self.root / f"node-{node}.sock"

    def create(self) -> None:
        self.root.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.root.mkdir(mode=0o700, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        (self.root / "pods").mkdir(exist_ok=True)

    def exists(self) -> bool:
        return self.root.is_dir()

    def supervisor_pid(self) -> int | None:
        """The recorded supervisor pid if that process still runs, else None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def status(self) -> dict[str, Any] | None:
        return read_json(self.status_file)

    def settings(self) -> dict[str, Any] | None:
        return read_json(self.cluster_file)

    def recorded_pids(self) -> list[int]:
        """Every process the last status lists (pods and node proxies), for cleanup after a crash."""
        status = self.status() or {}
        pids = [int(p["pid"]) for p in status.get("pods", []) if p.get("pid")]
        pids += [int(n["pid"]) for n in status.get("nodes", []) if n.get("pid")]
        return pids


def kill_process_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal the process group `pid` leads (every child runs in its own group), else the process."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            os.kill(pid, sig)


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def config_files(paths: list[str]) -> list[str]:
    """The files `up` loads: each file given, and the top-level config files of each directory.

    Like `kubectl apply -f DIR` (without `-R`), subdirectories are not read: examples keep variants
    that must not be applied together there (examples/seed/l7/ holds the seed's L7 policy as written,
    which `analyze` explains). Sorted by name, hidden files skipped, as `read_config_paths` does.
    """
    out: list[str] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            out += sorted(str(p) for p in path.iterdir() if p.is_file()
                          and p.suffix.lower() in CONFIG_SUFFIXES and not p.name.startswith("."))
        else:
            out.append(str(path))
    return out
