"""`up`/`status`/`exec`/`logs`/`down` of real clusters (e2e: root, network namespaces, node proxies).

Each test uses its own cluster name and state directory and checks that `down` leaves no namespace,
link, /etc/netns directory, nftables table, process or state file behind.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from zerotunnel.cluster import netns, network, runner
from zerotunnel.cluster.state import STATE_ENV, ClusterDir, pid_alive
from zerotunnel.cluster.topology import cluster_link_prefix

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "seed"
THREE = ROOT / "examples" / "three-nodes"
ZT = [sys.executable, "-m", "zerotunnel.cli.main"]
GW = SEED / "gateway"
SA = "spiffe://cluster.local/ns/{}/sa/{}"
# The seed without its waypoint: the node proxies alone enforce identities (what the tests of live
# changes and of the control plane exercise; the waypoint has tests of its own).
L4_POLICIES = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: app-a-allow-app-b-only, namespace: namespace-a}
spec:
  selector: {matchLabels: {app: app-a}}
  action: ALLOW
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/namespace-b/sa/service-account-b"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: app-a-deny-app-c, namespace: namespace-a}
spec:
  selector: {matchLabels: {app: app-a}}
  action: DENY
  rules: [{from: [{source: {principals: ["cluster.local/ns/namespace-c/sa/service-account-c"]}}]}]
"""


def seed_without_waypoint(conf: Path) -> None:
    conf.mkdir()
    mesh = (SEED / "mesh.yaml").read_text()
    assert "    istio.io/use-waypoint: waypoint\n" in mesh
    (conf / "mesh.yaml").write_text(mesh.replace("    istio.io/use-waypoint: waypoint\n", ""))
    (conf / "policies.yaml").write_text(L4_POLICIES)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
]


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = "t" + secrets.token_hex(4)
    monkeypatch.setenv(STATE_ENV, str(tmp_path / "state"))
    try:
        yield name
    finally:
        runner.down(name)


def zt(
    cluster: str, *args: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    cmd, *rest = args
    return subprocess.run([*ZT, cmd, "--name", cluster, *rest], input=stdin, capture_output=True, text=True,
                          timeout=timeout, check=False)


def traffic(cluster: str, *cases: str, module: str = "traffic") -> list[dict[str, Any]]:
    argv = [sys.executable, "-m", f"zerotunnel.cluster.{module}", "--name", cluster, "-o", "json", *cases]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    out: list[dict[str, Any]] = json.loads(proc.stdout)
    return out


def all_pids(status: dict[str, Any]) -> list[int]:
    pods = [p["pid"] for p in status["pods"] if p.get("pid")]
    return pods + [n["pid"] for n in status["nodes"] if n.get("pid")]


def assert_nothing_left(cluster: str, pids: list[int]) -> None:
    left = network.find_leftovers(cluster)
    assert left.empty, left
    assert not [p for p in pids if pid_alive(p)], "processes left behind"
    assert not ClusterDir.for_cluster(cluster).exists()
    assert not [n for n in netns.list_netns() if n.startswith(f"zt-{cluster}-")]
    assert not any(cluster in t for t in network.nft_tables(None))
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True,
                            check=True).stdout
    assert cluster_link_prefix(cluster) not in routes, "host routes left behind"


def test_seed_up_status_exec_logs_down(cluster: str) -> None:
    progress: list[str] = []
    result = runner.up([str(SEED)], cluster, progress=progress.append)
    assert result.status["phase"] == "ready"
    assert any("node proxies ready" in m for m in progress)
    st = runner.cluster_status(cluster)
    assert [n["name"] for n in st["nodes"]] == ["node-1", "node-2"]
    assert all(n["ready"] and n["state"] == "running" for n in st["nodes"])
    every = {f"{p['namespace']}/{p['name']}": p for p in st["pods"]}
    assert all(p["ready"] for p in every.values())
    apps = ("namespace-a/app-a", "namespace-b/app-b", "namespace-c/app-c")
    pods = {uid: every[uid] for uid in apps}
    # app-a's waypoint and the ingress gateway run as pods of their own, outside in-pod capture
    assert set(every) == {*apps, "namespace-a/waypoint", "istio-system/istio-ingressgateway"}
    assert every["namespace-a/waypoint"]["waypoint_of"] == "namespace-a/waypoint"
    assert not every["namespace-a/waypoint"]["ambient"]
    gateway = every["istio-system/istio-ingressgateway"]
    assert not gateway["ambient"] and gateway["ready"]
    assert st["gateways"] == [{"namespace": "istio-system", "pod": "istio-ingressgateway",
                               "gateway": "istio-system/app-a-gateway", "ip": gateway["ip"], "ports": [443],
                               "hosts": ["app-a.example.com"]}]
    assert st["host_access"]["host_ip"] == "10.243.0.1"
    assert any(f"reachable from the host at {gateway['ip']} port 443" in m for m in progress)
    for uid, p in pods.items():
        ns, name = uid.split("/")
        assert p["ready"] and p["ambient"] and p["registered"] and p["restarts"] == 0
        assert p["identity"] == f"spiffe://cluster.local/ns/{ns}/sa/service-account-{name[-1]}"
        assert p["cert_expiry"], "the node proxy reports the pod's certificate"
    assert pods["namespace-a/app-a"]["node"] == "node-1" and pods["namespace-b/app-b"]["node"] == "node-2"
    # capture is in every ambient pod; hosts file names the service
    for p in pods.values():
        assert "inet zerotunnel" in network.nft_tables(p["netns"])
    hosts = (Path("/etc/netns") / pods["namespace-b/app-b"]["netns"] / "hosts").read_text()
    vip = st["services"][0]["vip"]
    assert f"{vip}\tapp-a.namespace-a.svc.cluster.local app-a.namespace-a" in hosts

    # exec: through the mesh; exit status and stdin pass through
    ok = zt(cluster, "exec", "-n", "namespace-b", "app-b", "--", "curl", "-s", "--max-time", "5",
            "http://app-a.namespace-a/data")
    assert ok.returncode == 0 and json.loads(ok.stdout)["name"] == "app-a"
    # through the waypoint, app-c gets its 403; dialling app-a's pod IP bypasses no policy: app-a's node
    # proxy admits only the waypoint (app-b is refused too) and denies app-c explicitly
    refused = zt(cluster, "exec", "app-c", "--", "curl", "-s", "--max-time", "5", "http://app-a.namespace-a/data")
    assert refused.returncode == 0 and refused.stdout == "RBAC: access denied", refused
    pod_a = f"http://{pods['namespace-a/app-a']['ip']}:8080/data"
    for client in ("app-b", "app-c"):
        denied = zt(cluster, "exec", client, "--", "curl", "-s", "--max-time", "5", pod_a)
        assert denied.returncode in (52, 56), denied
    assert zt(cluster, "exec", "app-b", "--", "sh", "-c", "exit 7").returncode == 7
    echo = zt(cluster, "exec", "app-b", "--", "sh", "-c", "cat; echo $POD_NAMESPACE", stdin="hello\n")
    assert echo.stdout == "hello\nnamespace-b\n"
    missing = zt(cluster, "exec", "nope", "--", "true")
    assert missing.returncode == 2 and "pod 'nope' not found" in missing.stderr

    m = traffic(cluster, "namespace-b/app-b=http://app-a.namespace-a/data", f"namespace-c/app-c={pod_a}",
                f"namespace-b/app-b={pod_a}")
    assert [r["decision"] for r in m] == ["ALLOW", "DENY", "DENY"]
    assert m[0]["client_identity"] == SA.format("namespace-b", "service-account-b")
    assert m[0]["server_identity"] == SA.format("namespace-a", "service-account-a")
    assert m[0]["reason"] == "allowed by: namespace-a/app-a-allow-get-data" and m[0]["http"] == "200"
    assert m[0]["enforced_by"] == "waypoint namespace-a/waypoint"
    assert m[1]["reason"] == ("connection closed due to policy rejection: explicitly denied by: "
                              "namespace-a/app-a-deny-app-c")
    assert m[2]["reason"].endswith("allow policies exist, but none allowed")
    assert m[2]["enforced_by"] == "node proxy node-1 (inbound)"

    assert "GET /data 200" in zt(cluster, "logs", "-n", "namespace-a", "app-a").stdout
    node_log = zt(cluster, "logs", "node/node-1").stdout
    assert "explicitly denied by: namespace-a/app-a-deny-app-c" in node_log
    assert "cluster " + cluster + " ready" in zt(cluster, "logs", "control").stdout
    assert zt(cluster, "logs", "node/nope").returncode == 2

    table = zt(cluster, "status")
    assert table.returncode == 0 and "namespace-a/app-a" in table.stdout and "ambient" in table.stdout
    assert (f"istio-system/istio-ingressgateway  {gateway['ip']}:443           istio-system/app-a-gateway  "
            "app-a.example.com") in table.stdout, table.stdout
    pids = all_pids(st)
    assert len(pids) == len(every) + 2
    first = runner.down(cluster)
    assert "supervisor" in first
    assert_nothing_left(cluster, pids)
    assert runner.down(cluster) == []
    assert zt(cluster, "status").returncode == 1


def test_three_nodes_with_an_out_of_mesh_client(cluster: str) -> None:
    runner.up([str(THREE)], cluster)
    st = runner.cluster_status(cluster)
    assert [n["name"] for n in st["nodes"]] == ["node-a", "node-b", "node-c"]
    pods = {f"{p['namespace']}/{p['name']}": p for p in st["pods"]}
    legacy = pods["legacy/legacy-client"]
    assert not legacy["ambient"] and legacy["ready"] and "cert_expiry" not in legacy
    assert network.nft_tables(legacy["netns"]) == [f"ip {network.SERVICE_TABLE}"]
    assert network.nft_tables(pods["shop/backend"]["netns"]) == ["inet zerotunnel"]
    m = traffic(cluster, "shop/frontend=http://backend.shop/", "shop/orders=http://backend.shop/",
                "legacy/legacy-client=http://frontend.shop/", "legacy/legacy-client=http://backend.shop/",
                "shop/orders=http://frontend/")
    assert [r["decision"] for r in m] == ["ALLOW", "DENY", "ALLOW", "DENY", "ALLOW"]
    assert m[1]["reason"].endswith("allow policies exist, but none allowed")
    assert m[2]["client_identity"].startswith("none (plaintext")
    assert m[2]["server_identity"] == "spiffe://cluster.local/ns/shop/sa/frontend"
    assert "policy rejection" in m[3]["reason"]
    # a pod's env reaches its command (backend's HOSTNAME), and the named targetPort is followed
    body = zt(cluster, "exec", "-n", "shop", "frontend", "--", "curl", "-s", "--max-time", "5", "http://backend.shop/")
    assert json.loads(body.stdout)["name"] == "backend"
    pids = all_pids(st)
    runner.down(cluster)
    assert_nothing_left(cluster, pids)


def _wait(pred: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.2)


def test_changed_yaml_is_applied_while_running(cluster: str, tmp_path: Path) -> None:
    conf = tmp_path / "seed"
    seed_without_waypoint(conf)
    runner.up([str(conf)], cluster)
    case_c = "namespace-c/app-c=http://app-a.namespace-a/data"
    assert traffic(cluster, case_c)[0]["decision"] == "DENY"
    # policies: the node proxies apply them without a restart
    (conf / "policies.yaml").write_text(L4_POLICIES.split("---", maxsplit=1)[0].replace(
        '["cluster.local/ns/namespace-b/sa/service-account-b"]',
        '["cluster.local/ns/namespace-b/sa/service-account-b",'
        ' "cluster.local/ns/namespace-c/sa/service-account-c"]'))
    _wait(lambda: traffic(cluster, case_c)[0]["decision"] == "ALLOW", 30)
    # a new pod is started (netns, capture, node registration, command); removing it stops it
    (conf / "extra.yaml").write_text("""
apiVersion: v1
kind: Pod
metadata: {name: app-d, namespace: namespace-b}
spec:
  serviceAccountName: service-account-b
  nodeName: node-1
  containers: [{name: c, command: ["sleep", "infinity"]}]
""")

    def pod_d() -> dict[str, Any] | None:
        return next((p for p in runner.cluster_status(cluster)["pods"] if p["name"] == "app-d"), None)

    _wait(lambda: (p := pod_d()) is not None and p["ready"] and p.get("cert_expiry"))
    d = pod_d()
    assert d is not None and d["ambient"] and d["ip"].startswith("10.244.0.")
    r = traffic(cluster, "namespace-b/app-d=http://app-a.namespace-a/data")[0]
    assert r["decision"] == "ALLOW" and r["client_identity"].endswith("/sa/service-account-b")
    (conf / "extra.yaml").unlink()
    _wait(lambda: pod_d() is None)
    assert not Path("/run/netns", d["netns"]).exists()
    assert not pid_alive(d["pid"])
    # a broken change is reported and the running config stays
    (conf / "policies.yaml").write_text(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nspec: 3\n")
    _wait(lambda: runner.cluster_status(cluster).get("config_error"))
    assert "config change rejected" in zt(cluster, "status").stdout
    assert traffic(cluster, case_c)[0]["decision"] == "ALLOW"


def test_up_after_a_crash_cleans_leftovers_first(cluster: str) -> None:
    runner.up([str(THREE)], cluster)
    cdir = ClusterDir.for_cluster(cluster)
    st = runner.cluster_status(cluster, live=False)
    sup = cdir.supervisor_pid()
    assert sup is not None
    os.kill(sup, signal.SIGKILL)
    _wait(lambda: not pid_alive(sup))
    orphans = all_pids(st)
    assert any(pid_alive(p) for p in orphans)
    assert runner.cluster_status(cluster, live=False)["phase"] == "supervisor-gone"
    progress: list[str] = []
    runner.up([str(THREE)], cluster, progress=progress.append)
    assert any("leftovers" in m for m in progress)
    assert not [p for p in orphans if pid_alive(p)]
    new = runner.cluster_status(cluster)
    assert all(p["ready"] for p in new["pods"])
    runner.down(cluster)
    assert_nothing_left(cluster, orphans + all_pids(new))


def test_failed_up_says_why_and_leaves_nothing(cluster: str, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("""
apiVersion: v1
kind: Pod
metadata: {name: crasher, namespace: default}
spec:
  containers: [{name: c, command: ["sh", "-c", "echo boom >&2; exit 3"]}]
""")
    with pytest.raises(runner.ClusterError, match=r"keep crashing: default/crasher .*last exit 3.*boom"):
        runner.up([str(tmp_path / "bad.yaml")], cluster, timeout=30)
    assert_nothing_left(cluster, [])
    # the same name is usable again at once
    (tmp_path / "bad.yaml").write_text((tmp_path / "bad.yaml").read_text().replace(
        '["sh", "-c", "echo boom >&2; exit 3"]', '["sleep", "30"]'))
    runner.up([str(tmp_path / "bad.yaml")], cluster)
    with pytest.raises(Exception, match="already up"):
        runner.up([str(tmp_path / "bad.yaml")], cluster)


def test_seed_through_its_waypoint_and_ingress_gateway(cluster: str) -> None:
    """The seed as shipped: app-a's waypoint enforces the seed's first policy as written in intent, and
    clients on the host with certificates of the two external CAs reach app-a through the gateway."""
    runner.up([str(SEED)], cluster)
    m = traffic(cluster, "namespace-b/app-b=http://app-a.namespace-a/data",
                "namespace-b/app-b=POST http://app-a.namespace-a/data",
                "namespace-b/app-b=http://app-a.namespace-a/other",
                "namespace-c/app-c=http://app-a.namespace-a/data")
    assert [(r["decision"], r["http"], r["method"]) for r in m] == [
        ("ALLOW", "200", "GET"), ("DENY", "403", "POST"), ("DENY", "403", "GET"), ("DENY", "403", "GET")]
    assert all(r["enforced_by"] == "waypoint namespace-a/waypoint" for r in m)
    assert m[0]["reason"] == "allowed by: namespace-a/app-a-allow-get-data"
    assert all(r["reason"].startswith("RBAC: access denied") for r in m[1:])
    assert m[3]["client_identity"] == SA.format("namespace-c", "service-account-c")
    gw = [f"--cacert={GW / 'server-ca.crt'}"]
    cases = [f"{GW / 'clients' / c}=https://app-a.example.com{path}" for c, path in
             (("partner-a", "/data"), ("partner-b", "/data"), ("stranger", "/data"), ("revoked", "/data"),
              ("partner-a", "/other"))]
    r = traffic(cluster, *gw, *cases, module="ingress")
    assert [(x["decision"], x["http"][:3]) for x in r] == [
        ("ALLOW", "200"), ("ALLOW", "200"), ("DENY", "no "), ("DENY", "no "), ("DENY", "403")]
    gateway_id = SA.format("istio-system", "istio-ingressgateway-service-account")
    for x, cn in zip(r[:2], ("partner-a-client", "partner-b-client"), strict=True):
        assert x["reason"] == "allowed by: namespace-a/app-a-allow-ingress-get-data"
        assert x["xfcc"].startswith(f"By={gateway_id};Hash=") and f"CN={cn}" in x["xfcc"]
        assert f"waypoint namespace-a/waypoint (saw {gateway_id})" in x["path"]
    assert r[2]["reason"] == "client certificate refused: unable to get local issuer certificate"
    assert "is revoked by CN=partner-a root CA" in r[3]["reason"]
    assert r[4]["reason"].startswith("RBAC: access denied")
    # a second cluster with host access on the same ranges is refused, naming the first; nothing is left
    other = "t" + secrets.token_hex(4)
    try:
        with pytest.raises(runner.ClusterError, match=rf"already routes 10\.24.*'{cluster}', which is up"):
            runner.up([str(SEED)], other)
        assert_nothing_left(other, [])
    finally:
        runner.down(other)


def test_control_plane_mode(cluster: str, tmp_path: Path) -> None:
    """`up --control-plane`: node proxies enrol with join tokens and get certificates and config from
    `zerotunnel control`; a restarted node proxy comes back with its stored identity."""
    conf = tmp_path / "seed"
    seed_without_waypoint(conf)
    runner.up([str(conf)], cluster, control_plane=True)
    st = runner.cluster_status(cluster)
    cp = st["control_plane"]
    assert cp["state"] == "running" and cp["address"].endswith(":15012")
    assert all(p["cert_expiry"] for p in st["pods"])
    cp_log = ClusterDir.for_cluster(cluster).log_dir / "control-plane.log"
    issued = ("certificate issued for spiffe://cluster.local/ns/namespace-b/sa/service-account-b "
              "to node node-2")
    assert issued in cp_log.read_text()
    assert "control plane" in zt(cluster, "status").stdout
    assert "certificate issued" in zt(cluster, "logs", "control-plane").stdout
    case_b = "namespace-b/app-b=http://app-a.namespace-a/data"
    case_c = "namespace-c/app-c=http://app-a.namespace-a/data"
    assert [r["decision"] for r in traffic(cluster, case_b, case_c)] == ["ALLOW", "DENY"]
    # a policy edit reaches the node proxies through the control plane
    (conf / "policies.yaml").write_text(L4_POLICIES.split("---", maxsplit=1)[0].replace(
        '["cluster.local/ns/namespace-b/sa/service-account-b"]',
        '["cluster.local/ns/namespace-b/sa/service-account-b",'
        ' "cluster.local/ns/namespace-c/sa/service-account-c"]'))
    _wait(lambda: traffic(cluster, case_c)[0]["decision"] == "ALLOW", 30)
    # a node proxy restarts without a token (it kept its node identity) and serves its pods again
    node2 = next(n for n in st["nodes"] if n["name"] == "node-2")
    os.kill(node2["pid"], signal.SIGKILL)

    def node2_restarts() -> int:
        nodes = runner.cluster_status(cluster)["nodes"]
        return int(next(n for n in nodes if n["name"] == "node-2")["restarts"])

    _wait(lambda: node2_restarts() == 1)
    _wait(lambda: all(p["ready"] for p in runner.cluster_status(cluster)["pods"]), 30)
    assert traffic(cluster, case_b)[0]["decision"] == "ALLOW"
    pids = [*all_pids(runner.cluster_status(cluster)), cp["pid"]]
    runner.down(cluster)
    assert_nothing_left(cluster, pids)
