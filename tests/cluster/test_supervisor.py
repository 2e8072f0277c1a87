"""The supervisor in loopback mode (no root needed): start, readiness, restarts, live config, stop.

The network-namespace mode is driven end to end in test_runner.py (e2e).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from zerotunnel.cluster.state import PHASE_FAILED, PHASE_READY, PHASE_STOPPED, ClusterDir
from zerotunnel.cluster.supervisor import Supervisor, listening_ports, tail

BIN = Path(sys.executable).parent


def _pod(name: str, command: list[str], port: int | None = None, ns: str = "default") -> str:
    ports = f"\n      ports: [{{containerPort: {port}}}]" if port else ""
    return f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}}}
spec:
  containers:
    - name: c
      command: {json.dumps(command)}{ports}
"""


async def _until(pred: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def _status(cdir: ClusterDir) -> dict[str, Any]:
    return cdir.status() or {}


def _pods(cdir: ClusterDir) -> dict[str, dict[str, Any]]:
    return {f"{p['namespace']}/{p['name']}": p for p in _status(cdir).get("pods", [])}


def test_listening_ports_in_this_namespace() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port in listening_ports(None)
    assert port not in listening_ports(None)


def test_tail(tmp_path: Path) -> None:
    f = tmp_path / "x.log"
    f.write_text("".join(f"line {i}\n" for i in range(30)))
    assert tail(f, 2) == "line 28\nline 29"
    assert tail(tmp_path / "none") == ""


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_loopback_cluster_lifecycle(tmp_path: Path) -> None:
    port = random.randint(20000, 40000)
    conf = tmp_path / "conf"
    conf.mkdir()
    server = [str(BIN / "zerotunnel"), "demo-app", "--host", "127.0.0.1", "--port", str(port),
              "--name", "web"]
    (conf / "pods.yaml").write_text(
        _pod("web", server, port) + _pod("idle", []) + _pod("flaky", ["sh", "-c", "sleep 0.3; exit 4"]))
    cdir = ClusterDir.for_cluster("loop", tmp_path / "state")
    cdir.create()
    sup = Supervisor(cdir, [str(conf)], netns=False)
    task = asyncio.create_task(sup.run(ready_timeout=5.0))
    # flaky never stays up long enough to count as ready after two crashes: startup fails cleanly
    await _until(lambda: _status(cdir).get("phase") in (PHASE_READY, PHASE_FAILED))
    assert await task == 1
    st = _status(cdir)
    assert st["phase"] == PHASE_FAILED and "default/flaky" in st["reason"] and "keep crashing" in st["reason"]
    assert not cdir.pid_file.exists()

    (conf / "pods.yaml").write_text(_pod("web", server, port) + _pod("idle", []))
    sup = Supervisor(cdir, [str(conf)], netns=False)
    task = asyncio.create_task(sup.run(ready_timeout=20.0))
    await _until(lambda: _status(cdir).get("phase") == PHASE_READY)
    pods = _pods(cdir)
    assert set(pods) == {"default/web", "default/idle"}
    assert all(p["ready"] and p["state"] == "running" for p in pods.values())
    assert _status(cdir)["mode"] == "loopback" and not _status(cdir)["proxies"]
    assert int(cdir.pid_file.read_text()) == os.getpid()
    ips = {p["ip"] for p in pods.values()}
    assert len(ips) == 2 and all(ip.startswith("127.0.0.") for ip in ips)
    # the idle container (no command) sleeps; the server answers
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /hello HTTP/1.0\r\n\r\n")
    body = await reader.read()
    writer.close()
    assert b" 200 " in body.split(b"\r\n", 1)[0] and b'"name": "web"' in body

    # a crash is restarted and counted
    os.kill(pods["default/web"]["pid"], 9)
    await _until(lambda: _pods(cdir)["default/web"]["restarts"] == 1 and _pods(cdir)["default/web"]["ready"])
    assert "restart 1" in cdir.pod_log("default", "web").read_text()

    # live config: a new pod starts, a removed one stops, a bad change is rejected and kept out
    (conf / "more.yaml").write_text(_pod("extra", ["sleep", "30"], ns="other"))
    await _until(lambda: "other/extra" in _pods(cdir) and _pods(cdir)["other/extra"]["ready"])
    idle_pid = _pods(cdir)["default/idle"]["pid"]
    (conf / "pods.yaml").write_text(_pod("web", server, port))
    await _until(lambda: "default/idle" not in _pods(cdir))
    await _until(lambda: not Path(f"/proc/{idle_pid}").exists())
    (conf / "more.yaml").write_text("kind: Nonsense\n")
    await _until(lambda: _status(cdir).get("config_error"))
    assert "other/extra" in _pods(cdir)

    sup.stop_event.set()
    assert await task == 0
    st = _status(cdir)
    assert st["phase"] == PHASE_STOPPED and not cdir.pid_file.exists()
    for p in pods.values():
        assert not Path(f"/proc/{p['pid']}").exists() or p["pid"] == os.getpid()
    events = [e["message"] for e in st["events"]]
    assert any("loopback mode" in e for e in events)
    assert any("pods +other/extra" in e for e in events)
