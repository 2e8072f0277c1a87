"""The seed's external-clients case end to end (issue 7): real network namespaces, node proxies, the
waypoint and `zerotunnel gateway` each in its own pod, and real curl on the host with the example's
certificates from two external CAs (examples/seed/gateway).

host → gateway (MUTUAL, ca.crt = partner-a + partner-b, ca.crl) → HBONE with the gateway's identity →
app-a's waypoint (L7 policy admits the gateway for GET /data) → HBONE with the waypoint's identity →
node-1's proxy → app-a, which sees the XFCC describing the external client.
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
SEED = Path(__file__).resolve().parents[2] / "examples" / "seed"
GATEWAY_ID = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"

POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: app-a-only-through-waypoint, namespace: namespace-a}
spec:
  selector: {matchLabels: {app: app-a}}
  action: ALLOW
  rules: [{from: [{source: {principals: ["cluster.local/ns/namespace-a/sa/waypoint"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: app-a-allow-ingress, namespace: namespace-a}
spec:
  targetRefs: [{kind: Service, group: "", name: app-a}]
  action: ALLOW
  rules:
    - from:
        - source: {principals: ["cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"]}
      to: [{operation: {methods: [GET], paths: [/data]}}]
"""

PODS = [
    PodSpec("app-a", "namespace-a", "node-1"),
    PodSpec("waypoint", "namespace-a", "node-1"),
    PodSpec("istio-ingressgateway", "istio-system", "node-1"),
]


@dataclass
class Cluster:
    plan: NetworkPlan
    tmp: Path

    def curl(self, client: str, path: str = "/data") -> subprocess.CompletedProcess[str]:
        ip = self.plan.pod("istio-system", "istio-ingressgateway").ip
        gw = SEED / "gateway"
        return subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "15",
                "--cacert",
                str(gw / "server-ca.crt"),
                "--cert",
                str(gw / "clients" / f"{client}.crt"),
                "--key",
                str(gw / "clients" / f"{client}.key"),
                "--resolve",
                f"app-a.example.com:443:{ip}",
                f"https://app-a.example.com{path}",
            ],
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
    name = "g" + uuid.uuid4().hex[:6]
    tmp = tmp_path_factory.mktemp("gw")
    plan = plan_network(
        name,
        ["node-1"],
        PODS,
        [ServiceSpec("app-a", "namespace-a")],
        pod_cidr="10.255.0.0/16",
        node_cidr="10.254.0.0/24",
        service_cidr="10.99.0.0/16",
        host_access=True,
    )
    create_network(plan)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        config = tmp / "config"
        config.mkdir()
        mesh = (
            (SEED / "mesh.yaml")
            .read_text()
            .replace(
                "  name: namespace-a\n  labels:\n",
                "  name: namespace-a\n  labels:\n    istio.io/use-waypoint: waypoint\n",
            )
        )
        (config / "mesh.yaml").write_text(mesh)
        (config / "waypoint.yaml").write_text((SEED / "waypoint.yaml").read_text())
        (config / "gateway.yaml").write_text((SEED / "gateway" / "gateway.yaml").read_text())
        (config / "secret.yaml").write_text((SEED / "gateway" / "secret.yaml").read_text())
        (config / "policies.yaml").write_text(POLICIES)
        addresses = {
            "pod_ips": {f"{p.namespace}/{p.name}": str(p.ip) for p in plan.pods},
            "service_vips": {f"{s.namespace}/{s.name}": str(s.vip) for s in plan.services},
        }
        (tmp / "addresses.json").write_text(json.dumps(addresses))
        init_root(tmp / "ca", "cluster.local", datetime.now(UTC))
        for pod in plan.pods:
            write_hosts_file(pod.netns, pod_hosts(pod, plan.services))
        install_capture(plan.pod("namespace-a", "app-a").netns)
        common = ["-f", str(config), "--ca-dir", str(tmp / "ca"), "--addresses", str(tmp / "addresses.json")]
        procs.append(
            _spawn(
                [
                    "ip",
                    "netns",
                    "exec",
                    plan.node("node-1").netns,
                    *ZT,
                    "node",
                    "--node",
                    "node-1",
                    *common,
                    "--pod-api",
                    str(tmp / "node-1.sock"),
                    "--drain",
                    "0.5",
                ],
                tmp / "node-1.log",
            )
        )
        procs.append(
            _spawn(
                [
                    "ip",
                    "netns",
                    "exec",
                    plan.pod("namespace-a", "waypoint").netns,
                    *ZT,
                    "waypoint",
                    "--gateway",
                    "namespace-a/waypoint",
                    *common,
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
                    plan.pod("istio-system", "istio-ingressgateway").netns,
                    *ZT,
                    "gateway",
                    "--gateway",
                    "istio-system/app-a-gateway",
                    *common,
                ],
                tmp / "gateway.log",
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
        while not (tmp / "node-1.sock").exists():
            assert time.monotonic() < deadline, "node-1 did not start"
            time.sleep(0.05)
        app_a = plan.pod("namespace-a", "app-a")
        reply = _podapi(
            tmp / "node-1.sock",
            {
                "op": "add",
                "uid": "namespace-a/app-a",
                "netns": f"/run/netns/{app_a.netns}",
                "ip": str(app_a.ip),
            },
        )
        assert reply.get("ok") is True, reply
        for log, ready in (("waypoint", "listening on"), ("gateway", "ready on ports")):
            while ready not in (tmp / f"{log}.log").read_text():
                assert time.monotonic() < deadline, (tmp / f"{log}.log").read_text()[-2000:]
                time.sleep(0.1)
        yield Cluster(plan, tmp)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        destroy_network(name)


def test_clients_of_both_external_cas_reach_app_a(cluster: Cluster) -> None:
    for client, cn in (("partner-a", "partner-a-client"), ("partner-b", "partner-b-client")):
        result = cluster.curl(client)
        assert result.returncode == 0, result.stderr
        echo = json.loads(result.stdout)
        assert echo["name"] == "app-a" and echo["path"] == "/data"
        xfcc = echo["headers"]["x-forwarded-client-cert"]
        assert echo["headers"]["x-forwarded-proto"] == "https"
        assert xfcc.startswith(f"By={GATEWAY_ID};Hash=") and f"CN={cn}" in xfcc
    waypoint = [x for x in cluster.log("waypoint") if x.get("message") == "request complete"]
    assert {x["src_identity"] for x in waypoint} == {GATEWAY_ID}


def test_unknown_ca_and_revoked_clients_refused(cluster: Cluster) -> None:
    for client in ("stranger", "revoked"):
        result = cluster.curl(client)
        assert result.returncode != 0, result.stdout
    refusals = [
        str(x["error"])
        for x in cluster.log("gateway")
        if x.get("message") in ("tls handshake failed", "client certificate refused")
    ]
    assert any("unable to get local issuer certificate" in r for r in refusals), refusals
    assert any("is revoked by" in r for r in refusals), refusals


def test_waypoint_policy_still_applies_to_gateway_traffic(cluster: Cluster) -> None:
    result = cluster.curl("partner-a", "/other")
    assert result.stdout == "RBAC: access denied"
