"""Certificate lifetime and process lifetime faults on the two-node mesh (issue 9; security.md §4 items
25 and 27).

- The control plane stays down longer than the workload certificate TTL (one minute here, the mesh of
  tests/node/test_node_e2e.py as it is): certificates cannot be renewed and expire; from then on the
  node proxies refuse, with the reason, every tunnel that needs them — no expired certificate is
  offered and nothing is let through — they neither crash nor retry in a tight loop, and once the control
  plane is back they recover by themselves (figures: requests sent/failed per phase, recovery time).
- Drain under load (ghostunnel's shutdown-drains-under-load, ztunnel's 5 s drain deadline): a node
  proxy gets SIGTERM while long transfers are running and new connections keep arriving; new ones are
  refused at once, running ones finish within the drain period with intact data, the one that outlasts
  it is cut at the deadline, and the process exits 0 saying how many were drained and how many cut.

Address ranges and netns prefix are this module's own (`l…`, 10.246/10.247/10.92: not the ranges of
`zerotunnel up`'s defaults, 10.243/10.244, nor of the other e2e modules), so it can run next to them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
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
URL = "http://app-a.namespace-a/data"
SINK_PORT = 9000
DRAIN_SECONDS = 5.0  # the node proxy's default, ztunnel's CONNECTION_TERMINATION_DEADLINE

SINK = r"""
import hashlib, socket, sys, threading
def serve(conn):
    with conn:
        head = b""
        while len(head) < 8:
            part = conn.recv(8 - len(head))
            if not part:
                return
            head += part
        left, digest = int.from_bytes(head, "big"), hashlib.sha256()
        while left:
            part = conn.recv(min(left, 1 << 16))
            if not part:
                return
            digest.update(part)
            left -= len(part)
        conn.sendall(digest.hexdigest().encode())
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=256)
print("listening", flush=True)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

PUMPS = r"""
import hashlib, json, os, socket, sys, threading, time
host, port = sys.argv[1], int(sys.argv[2])
spec = json.loads(sys.argv[3])
CHUNK = 1 << 16
results, sent = {}, {}
def pump(name, size, interval):
    data = os.urandom(CHUNK)
    digest = hashlib.sha256()
    out = {"size": size, "sent": 0}
    try:
        s = socket.create_connection((host, port), timeout=5)
        s.settimeout(30)
        s.sendall(size.to_bytes(8, "big"))
        while out["sent"] < size:
            n = min(CHUNK, size - out["sent"])
            s.sendall(data[:n]); digest.update(data[:n]); out["sent"] += n; sent[name] = out["sent"]
            time.sleep(interval)
        answer = b""
        while len(answer) < 64:
            part = s.recv(64 - len(answer))
            if not part:
                break
            answer += part
        good = answer.decode() == digest.hexdigest()
        out["result"] = "complete" if good else ("cut" if not answer else "corrupt")
    except OSError as exc:
        out["result"], out["error"] = "cut", f"{type(exc).__name__}: {exc}"
    out["ended"] = time.time()
    results[name] = out
threads = [threading.Thread(target=pump, args=(n, p["size"], p["interval"])) for n, p in spec.items()]
for t in threads: t.start()
fast = [n for n in spec if n.startswith("pump")]
while any(sent.get(n, 0) < (1 << 20) for n in fast) and any(t.is_alive() for t in threads):
    time.sleep(0.01)
print("one MiB each", flush=True)
sys.stdin.readline()  # the test sent SIGTERM: probe with new connections while the drain runs
probes, until = [], time.time() + float(sys.argv[4])
while time.time() < until:
    t0 = time.time()
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            s.settimeout(3)
            s.sendall((4).to_bytes(8, "big") + b"ping")
            probe = "served" if s.recv(64) else "closed"
    except ConnectionRefusedError:
        probe = "refused"
    except (ConnectionResetError, BrokenPipeError):
        probe = "closed"
    except TimeoutError:
        probe = "hung"
    except OSError as exc:
        probe = f"error {exc}"
    probes.append({"at": t0, "outcome": probe, "took": round(time.time() - t0, 3)})
    time.sleep(0.1)
for t in threads: t.join(60)
print(json.dumps({"pumps": results, "probes": probes}), flush=True)
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """test_node_e2e's control-mode mesh with its one-minute workload certificates, app-a's demo app
    on 8080 and a hashing sink on `SINK_PORT`."""
    cluster = "l" + uuid.uuid4().hex[:6]
    tmp = tmp_path_factory.mktemp("lifecycle")
    plan = plan_network(
        cluster,
        ["node-1", "node-2"],
        E2E.PODS,
        [ServiceSpec("app-a", "namespace-a")],
        pod_cidr="10.247.0.0/16",
        node_cidr="10.246.0.0/24",
        service_cidr="10.92.0.0/16",
        host_access=True,
    )
    (tmp / "control").mkdir(mode=0o700)
    create_network(plan)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        config_dir = tmp / "config"
        config_dir.mkdir()
        assert "workloadCertTTL: 1m" in E2E.MESH
        (config_dir / "mesh.yaml").write_text(E2E.MESH)
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
            procs[node] = E2E._spawn(_node_argv(plan, node, tmp, config_dir), logs[node])
        for node in ("node-1", "node-2"):
            E2E._wait_for(tmp / f"{node}.sock")
        m = E2E.Mesh(plan, config_dir, tmp / "control" / "ca", logs, procs, "control", tmp)
        for node in ("node-1", "node-2"):
            E2E._register_pods(m, node)
        a_netns = plan.pod("namespace-a", "app-a").netns
        procs["app-a"] = E2E._spawn(
            ["ip", "netns", "exec", a_netns, *E2E.ZT, "demo-app", "--port", "8080", "--name", "app-a"],
            tmp / "app-a.log",
        )
        (tmp / "sink.py").write_text(SINK)
        procs["sink"] = E2E._spawn(["ip", "netns", "exec", a_netns, sys.executable, str(tmp / "sink.py"),
                                    str(SINK_PORT)], tmp / "sink.log")
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


def _node_argv(plan: Any, node: str, tmp: Path, config_dir: Path, drain: float = 0.5,
               extra: tuple[str, ...] = ()) -> list[str]:
    argv: list[str] = E2E._node_command("control", plan, node, tmp, config_dir)
    i = argv.index("--drain")
    argv[i + 1] = f"{drain:g}"
    return [*argv, *extra]


def _restart_node(mesh: Any, node: str, drain: float = 0.5, extra: tuple[str, ...] = ()) -> None:
    proc = mesh.procs[node]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    (mesh.tmp / f"{node}.sock").unlink(missing_ok=True)
    with mesh.logs[node].open("a") as f:
        f.write(f"--- restarted (drain {drain:g}s)\n")
    argv = _node_argv(mesh.plan, node, mesh.tmp, mesh.config_dir, drain, extra)
    mesh.procs[node] = E2E._spawn(argv, mesh.logs[node])
    E2E._wait_for(mesh.tmp / f"{node}.sock")
    deadline = time.monotonic() + 20
    while True:  # the socket file appears at bind(), a moment before listen()
        try:
            E2E._register_pods(mesh, node)
            return
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, f"{node}'s pod API never answered"
            time.sleep(0.1)


def _curl_ok(mesh: Any, path: str = "/data", timeout: float = 3) -> bool:
    out = mesh.run_in("namespace-b", "app-b", "curl", "-sS", "--max-time", f"{timeout:g}",
                      f"http://app-a.namespace-a{path}", timeout=timeout + 10)
    return bool(out.returncode == 0)


def _certs(mesh: Any, node: str) -> list[dict[str, Any]]:
    certs: list[dict[str, Any]] = json.loads(mesh.node_get(node, 15000, "/certs"))
    return certs


def _presented_cert(mesh: Any) -> str:
    """What app-a's 15008 shows a client with no certificate of its own (TLS 1.3 sends the server's
    certificate before asking for the client's): `notAfter=…` or the handshake's failure."""
    ip = mesh.pod_ip("namespace-a", "app-a")
    out = subprocess.run(
        ["ip", "netns", "exec", mesh.netns("default", "legacy"), "sh", "-c",
         f"openssl s_client -connect {ip}:15008 -tls1_3 -alpn h2 </dev/null 2>&1 | "
         "openssl x509 -noout -enddate 2>&1"],
        capture_output=True, text=True, timeout=20, check=False,
    )
    return out.stdout.strip()


def _expired_presented(presented: str, now: datetime) -> bool:
    if not presented.startswith("notAfter="):
        return False
    when = datetime.strptime(presented.removeprefix("notAfter="), "%b %d %H:%M:%S %Y %Z").replace(tzinfo=UTC)
    return when < now


def _retries_logged(log: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for match in re.finditer(r"certificate for (\S+): .*; retrying in", log):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


@pytest.mark.parametrize("node", ["node-2", "node-1"])
def test_drain_under_load(mesh: Any, figures: Callable[..., None], node: str) -> None:
    """SIGTERM to app-b's node proxy (node-2, the client side: app-b's outbound tunnels through 15001)
    or app-a's (node-1, the server side: inbound tunnels on 15008) with 5 transfers of 8 MiB and one
    that would take ~30 s in flight, once each sent 1 MiB; new connections probed every 0.1 s meanwhile.
    Was (node-2): every transfer cut 0.2 s after the signal — outbound connections got no drain."""
    _restart_node(mesh, node, drain=DRAIN_SECONDS)
    assert _curl_ok(mesh)
    spec = {f"pump-{i}": {"size": 8 << 20, "interval": 0.03} for i in range(5)}
    spec["slow"] = {"size": 8 << 20, "interval": 0.25}
    (mesh.tmp / "pumps.py").write_text(PUMPS)
    client = subprocess.Popen(
        ["ip", "netns", "exec", mesh.netns("namespace-b", "app-b"), sys.executable,
         str(mesh.tmp / "pumps.py"), mesh.pod_ip("namespace-a", "app-a"), str(SINK_PORT), json.dumps(spec),
         str(DRAIN_SECONDS + 2)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    proxy = mesh.procs[node]
    try:
        assert client.stdin is not None and client.stdout is not None
        line = client.stdout.readline()
        assert line.strip() == "one MiB each", line
        signalled = time.time()
        proxy.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5  # probe once the proxy has taken the signal
        marker = "--- restarted (drain 5s)"
        while "listeners closed; draining" not in mesh.logs[node].read_text().split(marker)[-1]:
            assert time.monotonic() < deadline, "the node proxy did not start draining"
            time.sleep(0.02)
        client.stdin.write("go\n")
        client.stdin.flush()
        code = proxy.wait(DRAIN_SECONDS + 10)
        exited = time.time() - signalled
        out, _ = client.communicate(timeout=90)
    finally:
        if client.poll() is None:
            client.kill()
        _restart_node(mesh, node)
    report = json.loads(out.strip().splitlines()[-1])
    pumps, probes = report["pumps"], report["probes"]
    log = mesh.logs[node].read_text().split("--- restarted (drain 5s)")[-1]
    outcomes = {name: p["result"] for name, p in pumps.items()}
    probe_outcomes: dict[str, int] = {}
    for probe in probes:
        probe_outcomes[probe["outcome"]] = probe_outcomes.get(probe["outcome"], 0) + 1
    slow_cut_after = round(pumps["slow"]["ended"] - signalled, 2)
    drain_line = next((ln for ln in log.splitlines() if "drain" in ln and "cut" in ln), "")
    figures(node=node, drain_s=DRAIN_SECONDS, pumps=outcomes, slow_cut_after_s=slow_cut_after,
            exit_code=code, exited_after_s=round(exited, 2), probes=probe_outcomes,
            probe_max_s=max((p["took"] for p in probes), default=None), drain_log=drain_line[-200:])
    assert code == 0, log[-3000:]
    assert all(outcomes[f"pump-{i}"] == "complete" for i in range(5)), (outcomes, pumps)
    assert outcomes["slow"] == "cut", pumps["slow"]
    assert DRAIN_SECONDS - 0.5 <= slow_cut_after <= DRAIN_SECONDS + 2, slow_cut_after
    assert exited <= DRAIN_SECONDS + 3, exited
    assert probes and set(probe_outcomes) <= {"refused", "closed"}, probe_outcomes
    assert max(p["took"] for p in probes) < 2, probes
    assert "5 connection(s) finished, 1 cut" in drain_line, drain_line or log[-2000:]


def test_control_plane_down_longer_than_the_certificate_ttl(mesh: Any, figures: Callable[..., None]) -> None:
    """Control plane SIGKILLed and kept down until every workload certificate has been expired for 15 s
    (one-minute TTL: ~75 s); app-b → app-a every 0.5 s throughout; then restarted. While the
    certificates app-b → app-a needs are valid every request passes; from a second after the first of
    them expires every request fails. Was: they kept passing on a pooled HBONE connection authenticated
    by the expired certificates, 15008 presented its expired certificate, and recovery took 42 s."""
    assert _curl_ok(mesh)
    mesh.procs["control"].kill()
    mesh.procs["control"].wait(10)
    killed, killed_at = time.monotonic(), datetime.now(UTC)
    log_marks = {node: len(mesh.logs[node].read_text()) for node in ("node-1", "node-2")}
    certs = {n: _certs(mesh, n) for n in ("node-1", "node-2")}
    expiry = max(datetime.fromisoformat(c["not_after"]) for cs in certs.values() for c in cs)
    by_id = {c["identity"]: datetime.fromisoformat(c["not_after"]) for cs in certs.values() for c in cs}
    a_expiry, b_expiry = by_id[E2E.A_ID], by_id[E2E.B_ID]
    needed = min(a_expiry, b_expiry)  # from then on app-b → app-a needs an expired certificate
    samples: list[tuple[datetime, bool]] = []  # (started, ok)
    presented: list[str] = []
    try:
        while True:
            now = datetime.now(UTC)
            samples.append((now, _curl_ok(mesh, "/outage")))
            if (now - expiry).total_seconds() > 15:
                break
            assert time.monotonic() - killed < 180, "certificates did not expire within 3 min"
            if now > a_expiry + timedelta(seconds=1) and not presented:
                presented.append(_presented_cert(mesh))
            time.sleep(0.5)
        presented.append(_presented_cert(mesh))
        down_for = time.monotonic() - killed
        for node in ("node-1", "node-2"):
            assert mesh.procs[node].poll() is None, f"{node} died while the control plane was down"
        c_ok = sum(mesh.curl("namespace-c", "app-c", URL).returncode == 0 for _ in range(3))
        logs = {node: mesh.logs[node].read_text()[log_marks[node]:] for node in ("node-1", "node-2")}
        status = {node: _certs(mesh, node) for node in ("node-1", "node-2")}
    finally:
        mesh.procs["control"] = E2E._start_control_plane(mesh.plan, mesh.tmp, mesh.config_dir)
    restarted = time.monotonic()
    failed_after = 0
    while not _curl_ok(mesh, "/recovered"):
        failed_after += 1
        assert time.monotonic() - restarted < 180, "no recovery within 180 s of the control plane's return"
        time.sleep(0.25)
    recovery = time.monotonic() - restarted
    steady = sum(_curl_ok(mesh, "/after") for _ in range(10))

    margin = timedelta(seconds=1)
    before = [ok for started, ok in samples if started < needed - margin]
    after = [ok for started, ok in samples if started > needed + margin]
    retries = {node: _retries_logged(text) for node, text in logs.items()}
    now = datetime.now(UTC)
    figures(ttl_s=60, control_down_s=round(down_for, 1),
            needed_certs_valid_for_s=round((needed - killed_at).total_seconds(), 1),
            while_valid={"sent": len(before), "failed": before.count(False)},
            after_expiry={"sent": len(after), "failed": after.count(False)},
            presented_15008=[p if p.startswith("notAfter=") else "no certificate" for p in presented],
            app_c_ok=c_ok, csr_retries_logged=retries,
            recovery_s=round(recovery, 2), failed_after_restart=failed_after, steady_ok=steady,
            last_errors={n: sorted({str(c["last_error"])[:120] for c in s}) for n, s in status.items()})
    assert c_ok == 0
    assert before and all(before), f"requests failed while the certificates were still valid: {before}"
    assert after and not any(after), f"requests passed on expired certificates: {after}"
    assert not any(_expired_presented(p, now) for p in presented), f"expired cert offered: {presented}"
    reasons = logs["node-2"] + logs["node-1"]
    assert "expired" in reasons and "no valid certificate" in reasons, reasons[-3000:]
    for node, counts in retries.items():
        assert counts and max(counts.values()) <= 20, f"{node} retried too often: {counts}"
    assert recovery < 20, f"recovered only {recovery:.1f}s after the control plane returned"
    assert steady == 10


OVERLOAD_CLIENT = r"""
import json, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
req = f"GET /data HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
held = []
for _ in range(2):
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(req)
    held.append(s)
time.sleep(0.5)  # both are now in setup on the stopped peer
t0 = time.monotonic()
third = socket.create_connection((host, port), timeout=5)
try:
    third.sendall(req)
    got = third.recv(100)
    outcome = "eof" if not got else "answered"
except ConnectionResetError:
    outcome = "reset"
except TimeoutError:
    outcome = "hung"
print(json.dumps({"third": outcome, "took": round(time.monotonic() - t0, 3)}), flush=True)
sys.stdin.readline()  # the test resumes the peer
answers = []
for s in held:
    s.settimeout(20)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except OSError as exc:
        data += str(exc).encode()
    answers.append(data.split(b"\r\n", 1)[0].decode(errors="replace"))
print(json.dumps({"held": answers}), flush=True)
"""


def test_overload_sheds_new_outbound_connections(mesh: Any, figures: Callable[..., None]) -> None:
    """Open finding 16: past `--max-setting-up` tunnels in setup, a new outbound connection is reset
    at once (the app sees ECONNRESET, not a hang), while the admitted ones still complete. The setups
    are held open by stopping the server-side node proxy (SIGSTOP) so the CONNECTs get no answer."""
    _restart_node(mesh, "node-2", extra=("--max-setting-up", "2"))
    server = mesh.procs["node-1"]
    try:
        assert _curl_ok(mesh)
        (mesh.tmp / "overload.py").write_text(OVERLOAD_CLIENT)
        client = subprocess.Popen(
            ["ip", "netns", "exec", mesh.netns("namespace-b", "app-b"), sys.executable,
             str(mesh.tmp / "overload.py"), mesh.pod_ip("namespace-a", "app-a"), "8080"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert client.stdin is not None and client.stdout is not None
        server.send_signal(signal.SIGSTOP)
        try:
            third = json.loads(client.stdout.readline())
        finally:
            server.send_signal(signal.SIGCONT)
        client.stdin.write("go\n")
        client.stdin.flush()
        held = json.loads(client.stdout.readline())["held"]
        client.wait(30)
        shed = [line for line in mesh.node_get("node-2", 15020, "/metrics").splitlines()
                if line.startswith("zerotunnel_connections_shed_total")]
        figures(scenario="overload-shed", third=third, held=held, shed_metric=shed)
        assert third["third"] in ("reset", "eof") and third["took"] < 1.0, third
        assert held == ["HTTP/1.1 200 OK"] * 2, held
        assert shed and float(shed[0].split()[-1]) >= 1, shed
    finally:
        server.send_signal(signal.SIGCONT)
        _restart_node(mesh, "node-2")
    assert _curl_ok(mesh)
