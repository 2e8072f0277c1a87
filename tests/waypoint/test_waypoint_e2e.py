"""The seed's first policy end to end (issue 7): real network namespaces and nftables capture, two
`zerotunnel node` processes, `zerotunnel waypoint` in its own pod, real curl in app-b and app-c.

app-b's `curl http://app-a.namespace-a/data` is captured by node-2's proxy, sent over HBONE to the
waypoint (the Service has one), decided at L7, and sent over HBONE again — with the waypoint's identity
— to node-1's proxy in front of app-a, whose L4 policy admits only the waypoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from zerotunnel.cluster.network import create_network, destroy_network, write_hosts_file
from zerotunnel.cluster.topology import NetworkPlan, PodSpec, ServiceSpec, plan_network, pod_hosts
from zerotunnel.control.castore import init_root
from zerotunnel.node.capture import install_capture

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nft"),
]

ZT = [sys.executable, "-m", "zerotunnel"]
ROOT = Path(__file__).resolve().parents[2]
WAYPOINT_ID = "spiffe://cluster.local/ns/namespace-a/sa/waypoint"

L4_POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: app-a-only-through-waypoint, namespace: namespace-a}
spec:
  selector: {matchLabels: {app: app-a}}
  action: ALLOW
  rules: [{from: [{source: {principals: ["cluster.local/ns/namespace-a/sa/waypoint"]}}]}]
"""

PODS = [
    PodSpec("app-a", "namespace-a", "node-1"),
    PodSpec("waypoint", "namespace-a", "node-1"),
    PodSpec("app-b", "namespace-b", "node-2"),
    PodSpec("app-c", "namespace-c", "node-2"),
]
CAPTURED = [p for p in PODS if p.name != "waypoint"]


@dataclass
class Cluster:
    plan: NetworkPlan
    tmp: Path

    def curl(self, ns: str, name: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.plan.pod(ns, name).netns, "curl", "-sS", "--max-time", "8", *args],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )

    def log(self, name: str) -> list[dict[str, object]]:
        return [
            json.loads(x) for x in (self.tmp / f"{name}.log").read_text().splitlines() if x.startswith("{")
        ]


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _podapi(sock: Path, request: dict[str, object]) -> dict[str, object]:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(sock))
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    assert isinstance(reply, dict)
    return reply


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    name = "w" + uuid.uuid4().hex[:6]
    tmp = tmp_path_factory.mktemp("wp")
    plan = plan_network(
        name,
        ["node-1", "node-2"],
        PODS,
        [ServiceSpec("app-a", "namespace-a")],
        pod_cidr="10.253.0.0/16",
        node_cidr="10.252.0.0/24",
        service_cidr="10.98.0.0/16",
    )
    create_network(plan)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        config = tmp / "config"
        config.mkdir()
        mesh = (
            (ROOT / "examples" / "seed" / "mesh.yaml")
            .read_text()
            .replace(
                "  name: namespace-a\n  labels:\n",
                "  name: namespace-a\n  labels:\n    istio.io/use-waypoint: waypoint\n",
            )
        )
        (config / "mesh.yaml").write_text(mesh)
        (config / "waypoint.yaml").write_text((ROOT / "examples" / "seed" / "waypoint.yaml").read_text())
        (config / "l4.yaml").write_text(L4_POLICY)
        addresses = {
            "pod_ips": {f"{p.namespace}/{p.name}": str(p.ip) for p in plan.pods},
            "service_vips": {f"{s.namespace}/{s.name}": str(s.vip) for s in plan.services},
        }
        (tmp / "addresses.json").write_text(json.dumps(addresses))
        init_root(tmp / "ca", "cluster.local", datetime.now(UTC))
        for pod in plan.pods:
            write_hosts_file(pod.netns, pod_hosts(pod, plan.services))
        for spec in CAPTURED:
            install_capture(plan.pod(spec.namespace, spec.name).netns)
        for node in ("node-1", "node-2"):
            procs.append(
                _spawn(
                    [
                        "ip",
                        "netns",
                        "exec",
                        plan.node(node).netns,
                        *ZT,
                        "node",
                        "--node",
                        node,
                        "-f",
                        str(config),
                        "--ca-dir",
                        str(tmp / "ca"),
                        "--addresses",
                        str(tmp / "addresses.json"),
                        "--pod-api",
                        str(tmp / f"{node}.sock"),
                        "--drain",
                        "0.5",
                    ],
                    tmp / f"{node}.log",
                )
            )
        wp = plan.pod("namespace-a", "waypoint")
        procs.append(
            _spawn(
                [
                    "ip",
                    "netns",
                    "exec",
                    wp.netns,
                    *ZT,
                    "waypoint",
                    "--gateway",
                    "namespace-a/waypoint",
                    "-f",
                    str(config),
                    "--ca-dir",
                    str(tmp / "ca"),
                    "--addresses",
                    str(tmp / "addresses.json"),
                    "--drain",
                    "0.5",
                ],
                tmp / "waypoint.log",
            )
        )
        procs.append(
            _spawn(
                [
                    "ip",
                    "netns",
                    "exec",
                    plan.pod("namespace-a", "app-a").netns,
                    *ZT,
                    "demo-app",
                    "--port",
                    "8080",
                    "--name",
                    "app-a",
                ],
                tmp / "app-a.log",
            )
        )
        deadline = time.monotonic() + 30
        for node in ("node-1", "node-2"):
            while not (tmp / f"{node}.sock").exists():
                assert time.monotonic() < deadline, f"{node} did not start"
                time.sleep(0.05)
        for spec in CAPTURED:
            pod = plan.pod(spec.namespace, spec.name)
            reply = _podapi(
                tmp / f"{spec.node}.sock",
                {
                    "op": "add",
                    "uid": f"{spec.namespace}/{spec.name}",
                    "netns": f"/run/netns/{pod.netns}",
                    "ip": str(pod.ip),
                },
            )
            assert reply.get("ok") is True, reply
        c = Cluster(plan, tmp)
        while "waypoint namespace-a/waypoint" not in (tmp / "waypoint.log").read_text():
            assert time.monotonic() < deadline, (tmp / "waypoint.log").read_text()[-2000:]
            time.sleep(0.1)
        yield c
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        destroy_network(name)


def test_seed_first_policy_through_the_waypoint(cluster: Cluster) -> None:
    url = "http://app-a.namespace-a/data"
    ok = cluster.curl("namespace-b", "app-b", url)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["path"] == "/data"
    post = cluster.curl("namespace-b", "app-b", "-X", "POST", url)
    assert post.stdout == "RBAC: access denied"
    other = cluster.curl("namespace-c", "app-c", url)
    assert other.stdout == "RBAC: access denied"
    bypass = cluster.curl("namespace-b", "app-b", "--path-as-is", "http://app-a.namespace-a/data/../admin")
    assert bypass.stdout == "RBAC: access denied"
    requests = [x for x in cluster.log("waypoint") if x.get("message") == "request complete"]
    assert [(x["method"], x["response_code"], x["src_identity"]) for x in requests[:3]] == [
        ("GET", 200, "spiffe://cluster.local/ns/namespace-b/sa/service-account-b"),
        ("POST", 403, "spiffe://cluster.local/ns/namespace-b/sa/service-account-b"),
        ("GET", 403, "spiffe://cluster.local/ns/namespace-c/sa/service-account-c"),
    ]
    # app-a's node proxy admitted the waypoint's identity (its L4 policy allows nothing else); the
    # upstream connection is kept alive, so its metrics show it before any access-log line does
    metrics = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            cluster.plan.node("node-1").netns,
            "curl",
            "-sS",
            "http://127.0.0.1:15020/metrics",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    opened = [
        line
        for line in metrics.splitlines()
        if line.startswith("istio_tcp_connections_opened_total{")
        and 'reporter="destination"' in line
        and 'destination_workload="app-a"' in line
    ]
    assert opened and all(f'source_principal="{WAYPOINT_ID}"' in line for line in opened), opened


def test_direct_pod_access_bypassing_the_waypoint_is_denied(cluster: Cluster) -> None:
    """app-b dialling app-a's pod IP directly skips the (service) waypoint: app-a's L4 policy, which
    admits only the waypoint, refuses it (istio-ambient.md §6.1: waypoint + L4 allow-waypoint)."""
    ip = cluster.plan.pod("namespace-a", "app-a").ip
    direct = cluster.curl("namespace-b", "app-b", f"http://{ip}:8080/data")
    assert direct.returncode != 0
