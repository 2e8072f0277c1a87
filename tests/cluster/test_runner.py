"""`up`/`status`/`exec`/`logs`/`down` of real clusters (e2e: root, network namespaces, node proxies).

Each test uses its own cluster name and state directory and checks that `down` leaves no namespace,
link, /etc/netns directory, nftables table, process or state file behind.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
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

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "seed"
THREE = ROOT / "examples" / "three-nodes"
ZT = [sys.executable, "-m", "zerotunnel.cli.main"]

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


def traffic(cluster: str, *cases: str) -> list[dict[str, Any]]:
    argv = [sys.executable, "-m", "zerotunnel.cluster.traffic", "--name", cluster, "-o", "json", *cases]
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
    if "namespace-a/waypoint" in every:  # examples/seed/waypoint.yaml (issue 7): run as a pod of its own
        assert every["namespace-a/waypoint"]["waypoint_of"] == "namespace-a/waypoint"
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
    denied = zt(cluster, "exec", "app-c", "--", "curl", "-s", "--max-time", "5", "http://app-a.namespace-a/data")
    assert denied.returncode in (52, 56), denied
    assert zt(cluster, "exec", "app-b", "--", "sh", "-c", "exit 7").returncode == 7
    echo = zt(cluster, "exec", "app-b", "--", "sh", "-c", "cat; echo $POD_NAMESPACE", stdin="hello\n")
    assert echo.stdout == "hello\nnamespace-b\n"
    missing = zt(cluster, "exec", "nope", "--", "true")
    assert missing.returncode == 2 and "pod 'nope' not found" in missing.stderr

    m = traffic(cluster, "namespace-b/app-b=http://app-a.namespace-a/data",
                "namespace-c/app-c=http://app-a.namespace-a/data")
    assert [r["decision"] for r in m] == ["ALLOW", "DENY"]
    assert m[0]["client_identity"] == "spiffe://cluster.local/ns/namespace-b/sa/service-account-b"
    assert m[0]["server_identity"] == "spiffe://cluster.local/ns/namespace-a/sa/service-account-a"
    assert m[0]["reason"] == "allowed by: namespace-a/app-a-allow-app-b-only" and m[0]["http"] == "200"
    assert m[1]["reason"] == ("connection closed due to policy rejection: explicitly denied by: "
                              "namespace-a/app-a-deny-app-c")

    assert "GET /data 200" in zt(cluster, "logs", "-n", "namespace-a", "app-a").stdout
    node_log = zt(cluster, "logs", "node/node-1").stdout
    assert "explicitly denied by: namespace-a/app-a-deny-app-c" in node_log
    assert "cluster " + cluster + " ready" in zt(cluster, "logs", "control").stdout
    assert zt(cluster, "logs", "node/nope").returncode == 2

    table = zt(cluster, "status")
    assert table.returncode == 0 and "namespace-a/app-a" in table.stdout and "ambient" in table.stdout
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
    conf.mkdir()
    for f in ("mesh.yaml", "policies.yaml"):
        shutil.copy(SEED / f, conf / f)
    runner.up([str(conf)], cluster)
    case_c = "namespace-c/app-c=http://app-a.namespace-a/data"
    assert traffic(cluster, case_c)[0]["decision"] == "DENY"
    # policies: the node proxies apply them without a restart
    (conf / "policies.yaml").write_text((SEED / "policies.yaml").read_text().split("---")[0].replace(
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


def test_seed_through_its_waypoint_enforces_the_l7_rule(cluster: str, tmp_path: Path) -> None:
    """With namespace-a using the seed's waypoint (the two changes waypoint.yaml names), GET /data is
    the only thing app-b may do, and the waypoint's 403 is reported as its decision."""
    if not (SEED / "waypoint.yaml").exists():
        pytest.fail("examples/seed/waypoint.yaml is gone: update this test")
    conf = tmp_path / "seed"
    conf.mkdir()
    for f in SEED.glob("*.yaml"):
        shutil.copy(f, conf / f.name)
    mesh = (conf / "mesh.yaml").read_text()
    if "istio.io/use-waypoint" not in mesh:
        mesh = mesh.replace("  name: namespace-a\n  labels:\n",
                            "  name: namespace-a\n  labels:\n    istio.io/use-waypoint: waypoint\n")
        (conf / "mesh.yaml").write_text(mesh)
    pol = (conf / "policies.yaml").read_text()
    if "sa/waypoint" not in pol:
        (conf / "policies.yaml").write_text(pol.replace(
            'principals: ["cluster.local/ns/namespace-b/sa/service-account-b"]',
            'principals: ["cluster.local/ns/namespace-b/sa/service-account-b", '
            '"cluster.local/ns/namespace-a/sa/waypoint"]', 1))
    runner.up([str(conf)], cluster)
    m = traffic(cluster, "namespace-b/app-b=http://app-a.namespace-a/data",
                "namespace-b/app-b=http://app-a.namespace-a/other",
                "namespace-c/app-c=http://app-a.namespace-a/data")
    assert [(r["decision"], r["http"]) for r in m] == [("ALLOW", "200"), ("DENY", "403"), ("DENY", "403")]
    assert all(r["enforced_by"] == "waypoint namespace-a/waypoint" for r in m)
    assert m[0]["reason"] == "allowed by: namespace-a/app-a-allow-get-data"
    assert m[0]["server_identity"] == "spiffe://cluster.local/ns/namespace-a/sa/service-account-a"
    assert m[2]["client_identity"] == "spiffe://cluster.local/ns/namespace-c/sa/service-account-c"


def test_control_plane_mode(cluster: str, tmp_path: Path) -> None:
    """`up --control-plane`: node proxies enrol with join tokens and get certificates and config from
    `zerotunnel control`; a restarted node proxy comes back with its stored identity."""
    conf = tmp_path / "seed"
    conf.mkdir()
    for f in ("mesh.yaml", "policies.yaml"):
        shutil.copy(SEED / f, conf / f)
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
    (conf / "policies.yaml").write_text((SEED / "policies.yaml").read_text().split("---")[0].replace(
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
