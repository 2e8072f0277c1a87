"""Faults on the two-node mesh in control-plane mode (issue 9; security.md §4 items 24-29).

The mesh is tests/node/test_node_e2e.py's (real netns, nftables capture, `zerotunnel control` and two
`zerotunnel node` processes), with one difference: the control plane's state directory is a tiny tmpfs
so that it can be filled, and workload certificates keep the default TTL so that a node skewed by
minutes is not judged on one-minute certificates. Each test leaves the mesh as it found it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from zerotunnel.cluster.network import create_network, destroy_network, write_hosts_file
from zerotunnel.cluster.topology import ServiceSpec, plan_network, pod_hosts
from zerotunnel.node.capture import install_capture
from zerotunnel.testing.modules import load_by_path

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nft"),
]



E2E = load_by_path(Path(__file__).resolve().parents[1] / "node" / "test_node_e2e.py", "zt_faults_node_e2e")
Mesh = E2E.Mesh
URL = "http://app-a.namespace-a/data"
TMPFS_SIZE = "512k"
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"
DENY_B = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-b-now, namespace: namespace-a}
spec:
  selector: {matchLabels: {app: app-a}}
  action: DENY
  rules: [{from: [{source: {namespaces: ["namespace-b"]}}]}]
"""


def _mounted(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines())


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The control-mode mesh of test_node_e2e, its control state dir on a `TMPFS_SIZE` tmpfs."""
    cluster = "f" + uuid.uuid4().hex[:6]
    tmp = tmp_path_factory.mktemp("faults")
    plan = plan_network(
        cluster,
        ["node-1", "node-2"],
        E2E.PODS,
        [ServiceSpec("app-a", "namespace-a")],
        pod_cidr="10.249.0.0/16",
        node_cidr="10.248.0.0/24",
        service_cidr="10.95.0.0/16",
        host_access=True,
    )
    state = tmp / "control"
    state.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(state)],
                   check=True)
    create_network(plan)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        config_dir = tmp / "config"
        config_dir.mkdir()
        (config_dir / "mesh.yaml").write_text(E2E.MESH.replace("spec: {workloadCertTTL: 1m}", "spec: {}"))
        (config_dir / "policies.yaml").write_text(E2E.POLICIES)
        addresses = {
            "pod_ips": {f"{p.namespace}/{p.name}": str(p.ip) for p in plan.pods},
            "service_vips": {f"{s.namespace}/{s.name}": str(s.vip) for s in plan.services},
        }
        (tmp / "addresses.json").write_text(json.dumps(addresses))
        procs["control"] = E2E._start_control_plane(plan, tmp, config_dir)
        for pod in plan.pods:
            write_hosts_file(pod.netns, pod_hosts(pod, plan.services))
        for spec in E2E.MESH_PODS:
            install_capture(plan.pod(spec.namespace, spec.name).netns)
        logs: dict[str, Path] = {}
        for node in ("node-1", "node-2"):
            logs[node] = tmp / f"{node}.log"
            procs[node] = E2E._spawn(E2E._node_command("control", plan, node, tmp, config_dir), logs[node])
        for node in ("node-1", "node-2"):
            E2E._wait_for(tmp / f"{node}.sock")
        m = Mesh(plan, config_dir, state / "ca", logs, procs, "control", tmp)
        for node in ("node-1", "node-2"):
            E2E._register_pods(m, node)
        procs["app-a"] = E2E._spawn(
            ["ip", "netns", "exec", plan.pod("namespace-a", "app-a").netns, *E2E.ZT, "demo-app",
             "--port", "8080", "--name", "app-a"],
            tmp / "app-a.log",
        )
        E2E._until_ok(m, URL, 30)
        yield m
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        destroy_network(cluster)
        if _mounted(state):
            subprocess.run(["umount", str(state)], check=False)


def _requests(mesh: Any, ns: str, pod: str, count: int, path: str = "/data") -> tuple[int, int]:
    ok = 0
    for _ in range(count):
        if mesh.curl(ns, pod, f"http://app-a.namespace-a{path}").returncode == 0:
            ok += 1
    return count, count - ok


def _until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"{what} not within {timeout}s"
        time.sleep(0.2)
    return time.monotonic() - started


def _allowed(mesh: Any, ns: str = "namespace-b", pod: str = "app-b") -> bool:
    return bool(mesh.curl(ns, pod, URL).returncode == 0)


def _fill(directory: Path) -> Path:
    """Fill the file system of `directory` to the last byte (ENOSPC is the end condition)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def test_control_plane_state_dir_full(mesh: Any, figures: Callable[..., None]) -> None:
    """Disk full for the CA state dir: issuance goes on (it needs no disk), config edits still reach the
    nodes, status.json writes fail and are reported in the log, and resume when space returns."""
    from zerotunnel.control.client import GrpcCaClient
    from zerotunnel.identity.csr import generate_key, make_csr
    from zerotunnel.identity.spiffe import SpiffeId

    state = mesh.tmp / "control"
    log = mesh.tmp / "control.log"
    filler = _fill(state)
    free = os.statvfs(state)
    assert free.f_bavail == 0, "the tmpfs is not full"
    try:
        # config edits while full: the watch must survive the failed status write and push the change
        deny = mesh.config_dir / "deny-b.yaml"
        deny.write_text(DENY_B)
        applied = _until(lambda: not _allowed(mesh), 20, "DENY for app-b while the disk is full")
        deny.unlink()
        lifted = _until(lambda: _allowed(mesh), 20, "DENY lifted while the disk is full")

        async def sign() -> int:
            client = GrpcCaClient(f"{mesh.plan.host_ip}:15012", mesh.tmp / "node-2-state")
            try:
                issued = 0
                ident = SpiffeId.parse(E2E.B_ID)
                for _ in range(5):
                    chain = await client.sign(ident, make_csr(ident, generate_key()), None)
                    issued += chain.leaf_pem.startswith(b"-----BEGIN CERTIFICATE")
                return issued
            finally:
                await client.close()

        issued = asyncio.run(sign())
        sent, failed = _requests(mesh, "namespace-b", "app-b", 20, "/full")
        denied_c = _requests(mesh, "namespace-c", "app-c", 3)[1]
        assert mesh.procs["control"].poll() is None, "the control plane died on a full disk"
        assert issued == 5, "certificates were not issued while the state dir was full"
        assert failed == 0 and denied_c == 3, (sent, failed, denied_c)
        text = log.read_text()
        assert "status not written" in text and "No space left on device" in text, text[-2000:]
        stale = json.loads((state / "status.json").read_text())
    finally:
        filler.unlink()
    started = time.monotonic()

    def rewritten() -> bool:
        try:
            now = json.loads((state / "status.json").read_text())
        except (OSError, ValueError):
            return False
        return bool(now["config"]["version"] != stale["config"]["version"])

    recovered = _until(rewritten, 15, "status.json rewritten after space returned")
    assert "status written again" in log.read_text()
    assert mesh.procs["control"].poll() is None
    figures(tmpfs=TMPFS_SIZE, deny_applied_s=round(applied, 2), deny_lifted_s=round(lifted, 2),
            certs_issued_while_full=issued, requests_sent=sent, requests_failed=failed,
            status_recovered_s=round(time.monotonic() - started, 2) if recovered >= 0 else None)


def _restart_node_1(mesh: Any, skew: str | None) -> None:
    proc = mesh.procs["node-1"]
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    (mesh.tmp / "node-1.sock").unlink(missing_ok=True)
    argv = E2E._node_command("control", mesh.plan, "node-1", mesh.tmp, mesh.config_dir)
    if skew is not None:
        # after `ip netns exec NETNS`: the node proxy alone runs on the skewed clock; monotonic time
        # stays real so asyncio timers are unaffected, only wall-clock (certificate) time moves
        # (libfaketime preloaded directly: the `faketime` wrapper forks, so a signal would miss the proxy)
        argv = [*argv[:4], "env", f"LD_PRELOAD={LIBFAKETIME}", f"FAKETIME={skew}",
                "FAKETIME_DONT_FAKE_MONOTONIC=1", *argv[4:]]
    with mesh.logs["node-1"].open("a") as f:
        f.write(f"--- restarted with clock skew {skew}\n")
    mesh.procs["node-1"] = E2E._spawn(argv, mesh.logs["node-1"])
    E2E._wait_for(mesh.tmp / "node-1.sock")


def _try_register(mesh: Any, timeout: float) -> bool:
    try:
        E2E._podapi  # noqa: B018 - the helper exists (fails loudly if test_node_e2e changes)
        deadline = time.monotonic() + timeout
        for spec in E2E.MESH_PODS:
            if spec.node != "node-1":
                continue
            pod = mesh.plan.pod(spec.namespace, spec.name)
            add = {"op": "add", "uid": f"{spec.namespace}/{spec.name}", "netns": f"/run/netns/{pod.netns}",
                   "ip": str(pod.ip), "workload_api": str(mesh.tmp / "spiffe" / f"{spec.name}.sock")}
            while E2E._podapi(mesh.tmp / "node-1.sock", add).get("ok") is not True:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.3)
        return True
    except (OSError, ValueError):
        return False


@pytest.mark.skipif(not Path(LIBFAKETIME).exists(), reason="needs faketime (scripts/setup.sh installs it)")
def test_clock_skew_between_nodes(mesh: Any, figures: Callable[..., None]) -> None:
    """node-1's proxy runs 3 min ahead, then 3 min behind the control plane and node-2.

    +3 min: works — every certificate is backdated 2 min and lives 24 h, so a clock ahead by less than
    the TTL sees them all valid. −3 min: certificates issued by the (correct) CA start 2 min before
    *real* now, i.e. 1 min after node-1's clock: node-1 finds its peers' (and its own) certificates
    not yet valid and refuses — it fails closed, never open — and recovers once its clock is right."""
    results: dict[str, Any] = {}
    try:
        _restart_node_1(mesh, "+180")
        registered = _try_register(mesh, 30)
        assert registered, mesh.logs["node-1"].read_text()[-3000:]
        recovery = _until(lambda: _allowed(mesh), 30, "traffic with node-1 3 min ahead")
        sent, failed = _requests(mesh, "namespace-b", "app-b", 20, "/ahead")
        c_denied = _requests(mesh, "namespace-c", "app-c", 3)[1]
        results["ahead_3m"] = {"sent": sent, "failed": failed, "first_ok_s": round(recovery, 2),
                               "app_c_denied": c_denied}
        assert failed == 0 and c_denied == 3, results

        _restart_node_1(mesh, "-180")
        registered = _try_register(mesh, 20)
        sent, failed = _requests(mesh, "namespace-b", "app-b", 10, "/behind")
        c_denied = _requests(mesh, "namespace-c", "app-c", 3)[1]
        log = mesh.logs["node-1"].read_text().split("--- restarted with clock skew -180")[-1]
        reasons = sorted({word for word in ("not yet valid", "not_before", "expired", "certificate")
                          if word in log.lower()})
        results["behind_3m"] = {"sent": sent, "failed": failed, "pods_registered": registered,
                                "app_c_denied": c_denied, "log_mentions": reasons}
        assert c_denied == 3, "a skewed node must never let a denied client through"
        assert failed == sent or not registered or failed == 0, results
    finally:
        _restart_node_1(mesh, None)
        assert _try_register(mesh, 30)
        restored = _until(lambda: _allowed(mesh), 30, "traffic after the clock was fixed")
        results["restored_s"] = round(restored, 2)
        figures(**results)


def _half(text: str) -> str:
    """The first part of a YAML file cut inside a flow mapping: what a crashed non-atomic write leaves."""
    cut = text.index("rules: [{from")
    return text[: cut + len("rules: [{from")]


def _config_status(mesh: Any) -> dict[str, Any]:
    out = subprocess.run(
        [*E2E.ZT, "control", "status", "--json", "--state-dir", str(mesh.tmp / "control")],
        capture_output=True, text=True, timeout=20, check=True,
    )
    status: dict[str, Any] = json.loads(out.stdout)
    return status


def test_half_written_config_file_keeps_the_last_good_config(mesh: Any, figures: Callable[..., None]) -> None:
    """A policy file cut off mid-write is refused whole (not one of its documents applied), the
    previous policies stay in force, and the complete file, once written, applies."""
    version = _config_status(mesh)["config"]["version"]
    half = mesh.config_dir / "zz-deny.yaml"
    half.write_text(_half(E2E.POLICIES + "---" + DENY_B))
    try:
        _until(lambda: _config_status(mesh)["config"]["error"] is not None, 10, "the error reported")
        status = _config_status(mesh)
        assert "zz-deny.yaml" in status["config"]["error"], status["config"]
        assert status["config"]["version"] == version, "a half-written file produced a new version"
        sent, failed = _requests(mesh, "namespace-b", "app-b", 10, "/half")
        c_denied = _requests(mesh, "namespace-c", "app-c", 5)[1]
        assert failed == 0 and c_denied == 5, (sent, failed, c_denied)
        half.write_text(E2E.POLICIES.replace("app-a-", "copy-app-a-") + "---" + DENY_B)
        applied = _until(lambda: not _allowed(mesh), 15, "the completed file applied")
        assert _config_status(mesh)["config"]["error"] is None
    finally:
        half.unlink(missing_ok=True)
    back = _until(lambda: _allowed(mesh), 15, "the completed file removed")
    figures(half_written={"requests_sent": sent, "requests_failed": failed, "app_c_denied": c_denied},
            completed_applied_s=round(applied, 2), removed_applied_s=round(back, 2))


def test_removed_config_file_applies_whole(mesh: Any, figures: Callable[..., None]) -> None:
    """Removing a file is a real change (as `kubectl delete -f`): all of its documents go at once, and an
    editor-style replace (unlink, then write the same file) never lets app-c through in between."""
    policies = mesh.config_dir / "policies.yaml"
    text = policies.read_text()
    probes = c_through = 0
    for _ in range(3):
        policies.unlink()
        time.sleep(0.05)
        policies.write_text(text)
        for _ in range(3):
            probes += 1
            c_through += _allowed(mesh, "namespace-c", "app-c")
    assert c_through == 0, f"app-c got through {c_through} of {probes} probes during editor saves"
    policies.unlink()
    try:
        # both policies leave together: app-c is let in (no DENY) and nothing else changed
        gone = _until(lambda: _allowed(mesh, "namespace-c", "app-c"), 15, "the removal applied")
        assert _allowed(mesh)
        assert _config_status(mesh)["config"]["error"] is None
    finally:
        policies.write_text(text)
    back = _until(lambda: not _allowed(mesh, "namespace-c", "app-c"), 15, "the policies restored")
    assert _allowed(mesh)
    figures(editor_saves=3, probes=probes, app_c_through=c_through, removal_applied_s=round(gone, 2),
            restore_applied_s=round(back, 2))
