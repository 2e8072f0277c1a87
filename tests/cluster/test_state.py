"""The cluster's state directory, atomic status files and process liveness."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from zerotunnel.cluster.state import (
    STATE_ENV,
    ClusterDir,
    config_files,
    pid_alive,
    read_json,
    state_root,
    write_json,
)


def test_state_root_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(STATE_ENV, str(tmp_path))
    assert state_root() == tmp_path
    monkeypatch.delenv(STATE_ENV)
    expected = Path("/run/zerotunnel") if os.geteuid() == 0 else None
    if expected is not None:
        assert state_root() == expected


def test_cluster_dir_layout(tmp_path: Path) -> None:
    cdir = ClusterDir.for_cluster("c1", tmp_path)
    cdir.create()
    assert cdir.root == tmp_path / "c1" and cdir.exists()
    assert (cdir.root.stat().st_mode & 0o777) == 0o700
    assert cdir.node_log("n1").name == "node-n1.log" and cdir.node_log("n1").parent.is_dir()
    assert cdir.pod_log("ns", "p").name == "pod-ns.p.log"
    assert cdir.node_socket("n1") == cdir.root / "node-n1.sock"
    assert cdir.supervisor_pid() is None
    cdir.pid_file.write_text(f"{os.getpid()}\n")
    assert cdir.supervisor_pid() == os.getpid()
    cdir.pid_file.write_text("garbage")
    assert cdir.supervisor_pid() is None


def test_json_round_trip_and_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    write_json(path, {"a": [1, 2], "b": None})
    assert read_json(path) == {"a": [1, 2], "b": None}
    assert not list(tmp_path.glob(".*tmp"))
    path.write_text("{half")
    assert read_json(path) is None
    path.write_text("[1]")
    assert read_json(path) is None
    assert read_json(tmp_path / "missing.json") is None


def test_recorded_pids(tmp_path: Path) -> None:
    cdir = ClusterDir.for_cluster("c2", tmp_path)
    cdir.create()
    write_json(cdir.status_file, {"pods": [{"pid": 11}, {"pid": None}], "nodes": [{"pid": 12}]})
    assert cdir.recorded_pids() == [11, 12]


def test_pid_alive_sees_zombies_as_gone() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(0)
    proc = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while pid_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pid_alive(proc.pid)  # exited but not yet reaped: a zombie
    proc.wait()
    assert not pid_alive(proc.pid)


def test_config_files_reads_a_directory_like_kubectl_without_recursion(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text("")
    (tmp_path / "a.yml").write_text("")
    (tmp_path / "c.json").write_text("")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / ".hidden.yaml").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.yaml").write_text("")
    explicit = tmp_path / "sub" / "x.yaml"
    got = config_files([str(tmp_path), str(explicit)])
    assert got == [str(tmp_path / n) for n in ("a.yml", "b.yaml", "c.json")] + [str(explicit)]
