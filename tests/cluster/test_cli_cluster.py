"""`zerotunnel up/down/status/exec/logs` as a user runs them: the console script, in a subprocess.

The loopback mode (`--no-netns`) works without network namespaces, so these run anywhere; the
namespace mode is driven by test_runner.py and tests/test_demo.py.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from zerotunnel.cli.cluster import render_status
from zerotunnel.cluster.state import STATE_ENV

BIN = Path(sys.executable).parent
ZT = str(BIN / "zerotunnel")


def run(env: dict[str, str], *args: str, stdin: str | None = None,
        timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ZT, *args], input=stdin, capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, STATE_ENV: str(tmp_path / "state")}


def test_render_status() -> None:
    status: dict[str, Any] = {
        "cluster": "c", "phase": "ready", "mode": "netns", "proxies": True, "config_error": "bad field",
        "nodes": [{"name": "n1", "ip": "10.243.0.2", "pod_cidr": "10.244.0.0/24", "state": "running",
                   "pid": 42, "ready": True, "restarts": 1, "served_pods": 2}],
        "pods": [
            {"namespace": "a", "name": "web", "node": "n1", "ip": "10.244.0.2", "ambient": True,
             "identity": "spiffe://cluster.local/ns/a/sa/web", "ready": True, "state": "running",
             "restarts": 3, "cert_expiry": "2026-11-26T16:01:03+00:00"},
            {"namespace": "a", "name": "wp", "node": "n1", "ip": "10.244.0.3", "ambient": False,
             "waypoint_of": "a/wp", "identity": "spiffe://cluster.local/ns/a/sa/wp", "ready": False,
             "state": "backoff", "restarts": 0},
            {"namespace": "b", "name": "old", "node": "n1", "ip": "10.244.0.4", "ambient": False,
             "identity": "spiffe://cluster.local/ns/b/sa/default", "ready": True, "state": "running"},
        ],
        "services": [{"namespace": "a", "name": "web", "vip": "10.96.0.10"}],
    }
    text = render_status(status)
    lines = text.splitlines()
    assert lines[0] == "cluster c: ready"
    assert "config change rejected (previous config in force): bad field" in lines[1]
    node = next(line for line in lines if line.startswith("n1 "))
    assert node.split() == ["n1", "10.243.0.2", "10.244.0.0/24", "running", "pid", "42", "yes", "1", "2"]
    web = next(line for line in lines if line.startswith("a/web"))
    assert web.split() == ["a/web", "n1", "10.244.0.2", "ambient", "spiffe://cluster.local/ns/a/sa/web",
                           "yes", "running", "3", "2026-11-26", "16:01:03"]
    wp = next(line for line in lines if line.startswith("a/wp"))
    assert wp.split()[3:6] == ["waypoint", "spiffe://cluster.local/ns/a/sa/wp", "no"]
    old = next(line for line in lines if line.startswith("b/old"))
    assert old.split()[3:5] == ["none", "-"]
    assert lines[-1].split() == ["a/web", "10.96.0.10"]
    loop = render_status({**status, "mode": "loopback", "config_error": None})
    assert "loopback mode: no capture" in loop.splitlines()[0]


@pytest.mark.slow
def test_loopback_cluster_through_the_cli(env: dict[str, str], tmp_path: Path) -> None:
    port = random.randint(20000, 40000)
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "pods.yaml").write_text(f"""
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: default}}
spec:
  containers:
    - name: c
      command: ["sh", "-c", "exec zerotunnel demo-app --host 127.0.0.1 --port {port} --name web"]
      ports: [{{containerPort: {port}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: shell, namespace: tools}}
spec:
  containers: [{{name: c, command: ["sleep", "infinity"], env: [{{name: GREETING, value: hi}}]}}]
""")
    name = ["--name", "cli" + str(random.randint(0, 99999))]
    try:
        up = run(env, "up", "--no-netns", *name, str(conf))
        assert up.returncode == 0, up.stderr
        assert "does NOT capture or encrypt" in up.stderr and "ready in" in up.stderr
        assert "loopback mode" in up.stdout and "default/web" in up.stdout
        st = json.loads(run(env, "status", *name, "-o", "json").stdout)
        assert st["phase"] == "ready" and st["mode"] == "loopback" and st["supervisor_running"]
        assert {p["name"]: p["ready"] for p in st["pods"]} == {"web": True, "shell": True}
        again = run(env, "up", "--no-netns", *name, str(conf))
        assert again.returncode == 2 and "already up" in again.stderr
        # exec: env, stdin and exit status pass through; the namespace is optional when unambiguous
        script = 'read x; echo "$x $GREETING $POD_NAMESPACE"; exit 5'
        ex = run(env, "exec", *name, "shell", "--", "sh", "-c", script, stdin="hello\n")
        assert ex.returncode == 5 and ex.stdout == "hello hi tools\n"
        curl = run(env, "exec", *name, "-n", "tools", "shell", "--", "curl", "-s", f"http://127.0.0.1:{port}/x")
        assert curl.returncode == 0 and json.loads(curl.stdout)["name"] == "web"
        assert run(env, "exec", *name, "-n", "nope", "shell", "--", "true").returncode == 2
        logs = run(env, "logs", *name, "web")
        assert logs.returncode == 0 and "GET /x 200" in logs.stdout
        assert "ready" in run(env, "logs", *name, "control").stdout
        # logs -f follows new lines, and ends when the cluster goes down
        follow = subprocess.Popen([ZT, "logs", *name, "-f", "web"], stdout=subprocess.PIPE, text=True,
                                  env=env)
        run(env, "exec", *name, "shell", "--", "curl", "-s", f"http://127.0.0.1:{port}/followed")
    finally:
        down = run(env, "down", *name)
    followed, _ = follow.communicate(timeout=15)
    assert "GET /x 200" in followed and "GET /followed 200" in followed
    assert down.returncode == 0 and "removed" in down.stderr
    assert not (tmp_path / "state" / name[1]).exists()
    second = run(env, "down", *name)
    assert second.returncode == 0 and "nothing to remove" in second.stderr
    status = run(env, "status", *name)
    assert status.returncode == 1 and "is not up" in status.stderr


def test_invalid_config_lists_every_problem_and_exits_2(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("""
apiVersion: v1
kind: Pod
metadata: {name: Bad_Name, namespace: default}
spec:
  containers: [{name: c, comand: ["x"]}]
---
apiVersion: v1
kind: Nonsense
metadata: {name: x}
""")
    res = run(env, "up", "--no-netns", "--name", "bad", str(tmp_path))
    assert res.returncode == 2
    assert "invalid configuration (2 problems)" in res.stderr, res.stderr
    assert "comand" in res.stderr and "Nonsense" in res.stderr
    assert not (tmp_path / "state" / "bad").exists()
    name = run(env, "up", "--no-netns", "--name", "Bad-Name", str(tmp_path))
    assert name.returncode == 2 and "1-12 lowercase letters or digits" in name.stderr


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) runs the CLI as nobody")
def test_without_root_up_names_what_it_needs() -> None:
    where = Path(tempfile.mkdtemp(prefix="zt-noroot-"))
    where.chmod(0o755)
    conf = where / "c.yaml"
    conf.write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n")
    conf.chmod(0o644)
    env = {**os.environ, STATE_ENV: "/nonexistent-zerotunnel-state"}
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", ZT, "up", str(conf)],
                         capture_output=True, text=True, env=env, timeout=60, check=False)
    assert res.returncode == 2, res.stderr
    shutil.rmtree(where)
    assert "needs root" in res.stderr and "CAP_NET_ADMIN" in res.stderr and "--no-netns" in res.stderr


def test_traffic_command_reports_a_missing_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from zerotunnel.cli.cluster import traffic

    monkeypatch.setenv(STATE_ENV, str(tmp_path))
    res = CliRunner().invoke(traffic, ["--name", "nosuch", "a/b=http://x/"])
    assert res.exit_code == 2 and "cluster 'nosuch' is not up" in res.output
    bad = CliRunner().invoke(traffic, ["--name", "nosuch", "no-slash=http://x/"])
    assert bad.exit_code == 2
