"""The bench's testbed and the four data paths it compares (issue 8, "The benchmark").

One local-cluster network (cluster/topology + cluster/network, DESIGN.md §4) with two nodes, a client
pod on node-2 and a server pod on node-1. Everything is started once and left idle when not measured,
so that the systems can be run *in alternation* (performance.md §6) without rebuilding anything:

- server pod: nginx (or our demo app) on 8080 serving a 1 KiB body at /1k, and `iperf3 -s` on 5201;
- two `zerotunnel node` processes, one per node netns, with both pods added over the pod API;
- a stunnel pair and a haproxy pair, client side in the client pod on 127.0.0.1, server side in the
  server pod on the pod IP, mTLS (TLS 1.3 only) with certificates from the same mesh CA.

Switching system only toggles the in-pod capture (node/capture.install_capture): on for zerotunnel, off
for the others, whose traffic then goes straight over the pod network. The tests' `mesh` fixture in
tests/node/test_node_e2e.py is the model for the wiring.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from zerotunnel.cluster.netns import set_sysctl
from zerotunnel.cluster.network import create_network, destroy_network, write_hosts_file
from zerotunnel.cluster.podapi import request_sync
from zerotunnel.cluster.topology import NetworkPlan, PodSpec, plan_network
from zerotunnel.control.castore import init_root
from zerotunnel.errors import ZerotunnelError
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.node.capture import install_capture, remove_capture

TRUST_DOMAIN = "cluster.local"
CLIENT = ("bench-client", "client")
SERVER = ("bench-server", "server")
HTTP_PORT = 8080
IPERF_PORT = 5201
BODY_1K = b"z" * 1024

# (server-side TLS port in the server pod, client-side plaintext port on 127.0.0.1 in the client pod)
STUNNEL_PORTS = {"http": (9443, 18080), "iperf": (9453, 18201)}
HAPROXY_PORTS = {"http": (9444, 18081), "iperf": (9454, 18202)}

MESH_YAML = """\
apiVersion: v1
kind: Namespace
metadata: {name: bench-client, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: bench-server, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench-server, labels: {app: server}}
spec:
  serviceAccountName: server
  nodeName: node-1
  containers: [{name: app, ports: [{name: http, containerPort: 8080}, {name: iperf, containerPort: 5201}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench-client}
spec: {serviceAccountName: client, nodeName: node-2, containers: [{name: c}]}
"""


class BenchError(ZerotunnelError):
    """The testbed could not be built or a tool misbehaved; the run stops and cleans up."""


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _raise_nofile() -> None:
    """10,000 idle connections need ~10k fds in each proxy (issue 8 workload 5); children inherit this."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Target:
    """Where the client pod connects for one kind of traffic, as the app would dial it."""

    host: str
    port: int


@dataclass
class System:
    """One data path: what to dial from the client pod, and the proxy processes on the path."""

    name: str
    http: Target
    iperf: Target
    proxy_pids: dict[str, int] = field(default_factory=dict)  # "client"/"server" side → pid
    captured: bool = False
    max_conns: int | None = None  # the peer's own connection limit (haproxy: fds = 2 × maxconn)


def _nginx_conf(tmp: Path) -> str:
    root = tmp / "www"
    root.mkdir(exist_ok=True)
    (root / "1k").write_bytes(BODY_1K)
    return f"""\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 19000; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_timeout 600s;
    keepalive_requests 100000000;
    client_header_timeout 600s;
    tcp_nodelay on;
    default_type application/octet-stream;
    server {{
        listen {HTTP_PORT} backlog=4096 reuseport;
        root {root};
    }}
}}
"""


def _stunnel_conf(tmp: Path, side: str, server_ip: str) -> str:
    """stunnel 5 with TLS 1.3 only, peer chain verified against the mesh root, TCP_NODELAY both legs."""
    lines = [
        "foreground = yes",
        f"pid = {tmp}/stunnel-{side}.pid",
        "debug = 3",
        f"output = {tmp}/stunnel-{side}.log",
        "socket = l:TCP_NODELAY=1",
        "socket = r:TCP_NODELAY=1",
        f"cert = {tmp}/pki/{side}.pem",
        f"key = {tmp}/pki/{side}.key",
        f"CAfile = {tmp}/pki/root.pem",
        "verifyChain = yes",
        "sslVersionMin = TLSv1.3",
        "sslVersionMax = TLSv1.3",
    ]
    for name, (tls_port, local_port) in STUNNEL_PORTS.items():
        upstream = HTTP_PORT if name == "http" else IPERF_PORT
        lines.append(f"[{name}]")
        if side == "client":
            lines += ["client = yes", f"accept = 127.0.0.1:{local_port}", f"connect = {server_ip}:{tls_port}"]
        else:
            lines += [f"accept = {server_ip}:{tls_port}", f"connect = 127.0.0.1:{upstream}"]
    return "\n".join(lines) + "\n"


def _haproxy_conf(tmp: Path, side: str, server_ip: str) -> str:
    """haproxy in TCP mode (L4, like the node proxy), mTLS TLS 1.3 only, chain verified, defaults kept."""
    pki = tmp / "pki"
    out = [
        "global",
        "    maxconn 9900",
        f"    pidfile {tmp}/haproxy-{side}.pid",
        "    ssl-default-bind-options ssl-min-ver TLSv1.3",
        "    ssl-default-server-options ssl-min-ver TLSv1.3",
        "defaults",
        "    mode tcp",
        "    maxconn 9900",
        "    timeout connect 5s",
        "    timeout client 600s",
        "    timeout server 600s",
    ]
    for name, (tls_port, local_port) in HAPROXY_PORTS.items():
        upstream = HTTP_PORT if name == "http" else IPERF_PORT
        if side == "client":
            out += [
                f"listen {name}",
                f"    bind 127.0.0.1:{local_port}",
                f"    server s {server_ip}:{tls_port} ssl crt {pki}/client.crtkey ca-file {pki}/root.pem "
                "verify required ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3",
            ]
        else:
            out += [
                f"listen {name}",
                f"    bind {server_ip}:{tls_port} ssl crt {pki}/server.crtkey ca-file {pki}/root.pem "
                "verify required ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3",
                f"    server app 127.0.0.1:{upstream}",
            ]
    return "\n".join(out) + "\n"


class Testbed:
    """Builds, runs and tears down everything; `close()` is idempotent and safe after a partial start."""

    def __init__(self, workdir: Path, *, server: str = "auto", peers: Sequence[str] = ("stunnel", "haproxy")):
        self.cluster = "zb" + uuid.uuid4().hex[:6]
        self.tmp = workdir / self.cluster
        self.server_kind = server
        self.peers = tuple(peers)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.plan: NetworkPlan | None = None
        self.systems: dict[str, System] = {}
        self._captured = False

    # --- addresses ---------------------------------------------------------------------------------

    @property
    def client_netns(self) -> str:
        assert self.plan is not None
        return self.plan.pod(*CLIENT).netns

    @property
    def server_netns(self) -> str:
        assert self.plan is not None
        return self.plan.pod(*SERVER).netns

    @property
    def server_ip(self) -> str:
        assert self.plan is not None
        return str(self.plan.pod(*SERVER).ip)

    def in_client(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.client_netns, *argv]

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        _raise_nofile()
        self.tmp.mkdir(parents=True, exist_ok=True)
        progress(f"building network {self.cluster} (2 nodes, client + server pods)")
        self.plan = plan_network(
            self.cluster,
            ["node-1", "node-2"],
            [PodSpec(CLIENT[1], CLIENT[0], "node-2"), PodSpec(SERVER[1], SERVER[0], "node-1")],
            pod_cidr="10.236.0.0/16",
            node_cidr="10.235.0.0/24",
            service_cidr="10.99.0.0/16",
        )
        create_network(self.plan)
        for netns in (*[p.netns for p in self.plan.pods], *[n.netns for n in self.plan.nodes]):
            # connection churn at tens of thousands per second must not run out of ports (TIME_WAIT)
            set_sysctl(netns, "net.ipv4.tcp_tw_reuse", "1")
            set_sysctl(netns, "net.ipv4.ip_local_port_range", "1024 65000")
            set_sysctl(netns, "net.core.somaxconn", "4096")
        for pod in self.plan.pods:
            write_hosts_file(pod.netns, {})
        self._write_pki()
        self._start_server()
        self._start_zerotunnel()
        if "stunnel" in self.peers:
            self._start_stunnel()
        if "haproxy" in self.peers:
            self._start_haproxy()
        self.systems["direct"] = System(
            "direct", Target(self.server_ip, HTTP_PORT), Target(self.server_ip, IPERF_PORT)
        )
        self._wait_http("direct", self.systems["direct"].http)
        for name in self.peers:
            self._wait_http(name, self.systems[name].http)
        self.activate("zerotunnel")
        self._wait_http("zerotunnel", self.systems["zerotunnel"].http)
        self.activate("direct")

    def _spawn(self, name: str, argv: list[str], netns: str | None = None) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("wb")
        full = ["ip", "netns", "exec", netns, *argv] if netns else argv
        # own session: Ctrl-C reaches only the harness, which then stops everything in order
        proc = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def _write_pki(self) -> None:
        now = datetime.now(UTC)
        ca = init_root(self.tmp / "ca", TRUST_DOMAIN, now - timedelta(minutes=5))
        pki = self.tmp / "pki"
        pki.mkdir(exist_ok=True)
        (pki / "root.pem").write_bytes(ca.root_bundle_pem)
        for side, (ns, sa) in (("client", CLIENT), ("server", SERVER)):
            chain, key = ca.issue_with_key(
                SpiffeId.istio(TRUST_DOMAIN, ns, sa), now - timedelta(minutes=1), timedelta(hours=12)
            )
            (pki / f"{side}.pem").write_bytes(chain.chain_pem)
            (pki / f"{side}.key").write_bytes(key)
            (pki / f"{side}.crtkey").write_bytes(chain.chain_pem + key)
            for f in (pki / f"{side}.key", pki / f"{side}.crtkey"):
                f.chmod(0o600)

    def _start_server(self) -> None:
        kind = self.server_kind
        if kind == "auto":
            kind = "nginx" if shutil.which("nginx") or Path("/usr/sbin/nginx").exists() else "demo-app"
        self.server_kind = kind
        if kind == "nginx":
            conf = self.tmp / "nginx.conf"
            conf.write_text(_nginx_conf(self.tmp))
            nginx = shutil.which("nginx") or "/usr/sbin/nginx"
            self._spawn(
                "nginx",
                [nginx, "-c", str(conf), "-p", str(self.tmp), "-e", str(self.tmp / "nginx-error.log")],
                self.server_netns,
            )
        else:
            self._spawn(
                "demo-app",
                [
                    sys.executable,
                    "-m",
                    "zerotunnel",
                    "demo-app",
                    "--port",
                    str(HTTP_PORT),
                    "--quiet",
                    "--name",
                    "server",
                ],
                self.server_netns,
            )
        if shutil.which("iperf3"):
            self._spawn("iperf3", ["iperf3", "-s", "-p", str(IPERF_PORT)], self.server_netns)
        progress(f"server pod {self.server_ip}: {kind} on {HTTP_PORT}, iperf3 on {IPERF_PORT}")

    def _start_zerotunnel(self) -> None:
        assert self.plan is not None
        config = self.tmp / "config"
        config.mkdir(exist_ok=True)
        (config / "mesh.yaml").write_text(MESH_YAML)
        addresses = {
            "pod_ips": {f"{p.namespace}/{p.name}": str(p.ip) for p in self.plan.pods},
            "service_vips": {},
        }
        (self.tmp / "addresses.json").write_text(json.dumps(addresses))
        pids: dict[str, int] = {}
        for node, side in (("node-2", "client"), ("node-1", "server")):
            sock = self.tmp / f"{node}.sock"
            proc = self._spawn(
                f"zerotunnel-{node}",
                [
                    sys.executable,
                    "-m",
                    "zerotunnel",
                    "node",
                    "--node",
                    node,
                    "-f",
                    str(config),
                    "--ca-dir",
                    str(self.tmp / "ca"),
                    "--addresses",
                    str(self.tmp / "addresses.json"),
                    "--pod-api",
                    str(sock),
                    "--drain",
                    "0.5",
                ],
                self.plan.node(node).netns,
            )
            pids[side] = proc.pid
        for node in ("node-1", "node-2"):
            self._wait_file(self.tmp / f"{node}.sock", f"zerotunnel-{node}")
        for pod in self.plan.pods:
            request_sync(
                self.tmp / f"{pod.node}.sock",
                {
                    "op": "add",
                    "uid": f"{pod.namespace}/{pod.name}",
                    "netns": f"/run/netns/{pod.netns}",
                    "ip": str(pod.ip),
                },
                timeout=60,
            )
        self.systems["zerotunnel"] = System(
            "zerotunnel",
            Target(self.server_ip, HTTP_PORT),
            Target(self.server_ip, IPERF_PORT),
            pids,
            captured=True,
        )
        progress("zerotunnel node proxies up, pods added")

    def _start_stunnel(self) -> None:
        stunnel = shutil.which("stunnel") or shutil.which("stunnel4")
        if stunnel is None:
            progress("stunnel not installed: skipping the stunnel pair")
            return
        pids: dict[str, int] = {}
        for side, netns in (("server", self.server_netns), ("client", self.client_netns)):
            conf = self.tmp / f"stunnel-{side}.conf"
            conf.write_text(_stunnel_conf(self.tmp, side, self.server_ip))
            pids[side] = self._spawn(f"stunnel-{side}", [stunnel, str(conf)], netns).pid
        self.systems["stunnel"] = System(
            "stunnel",
            Target("127.0.0.1", STUNNEL_PORTS["http"][1]),
            Target("127.0.0.1", STUNNEL_PORTS["iperf"][1]),
            pids,
        )

    def _start_haproxy(self) -> None:
        haproxy = shutil.which("haproxy") or (
            "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
        )
        if haproxy is None:
            progress("haproxy not installed: skipping the haproxy pair")
            return
        pids: dict[str, int] = {}
        for side, netns in (("server", self.server_netns), ("client", self.client_netns)):
            conf = self.tmp / f"haproxy-{side}.cfg"
            conf.write_text(_haproxy_conf(self.tmp, side, self.server_ip))
            pids[side] = self._spawn(f"haproxy-{side}", [haproxy, "-db", "-f", str(conf)], netns).pid
        self.systems["haproxy"] = System(
            "haproxy",
            Target("127.0.0.1", HAPROXY_PORTS["http"][1]),
            Target("127.0.0.1", HAPROXY_PORTS["iperf"][1]),
            pids,
            max_conns=9000,
        )

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.tmp / f"{name}.log").read_text(errors="replace")[-2000:]
                raise BenchError(f"{name} exited with status {proc.returncode}:\n{tail}")

    def _wait_file(self, path: Path, name: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{name}: {path} did not appear in {timeout:.0f} s")
            time.sleep(0.05)

    def _wait_http(self, name: str, target: Target, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{target.host}:{target.port}/1k"
        while True:
            self._check_alive()
            out = subprocess.run(
                self.in_client(
                    "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "3", url
                ),
                capture_output=True,
                text=True,
                check=False,
                timeout=10,
            )
            if out.stdout.strip() == "200":
                return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{name}: {url} from the client pod answered {out.stdout!r} {out.stderr.strip()}"
                )
            time.sleep(0.2)

    # --- switching ---------------------------------------------------------------------------------

    def activate(self, name: str) -> System:
        """Make `name`'s path the one the client pod's traffic takes (capture on only for zerotunnel)."""
        system = self.systems[name]
        if system.captured != self._captured:
            for netns in (self.client_netns, self.server_netns):
                if system.captured:
                    install_capture(netns)
                else:
                    remove_capture(netns)
            self._captured = system.captured
        self._check_alive()
        return system

    def close(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                progress(f"{name} did not stop on SIGTERM: killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.procs.clear()
        if self.plan is not None:
            destroy_network(self.cluster)
            self.plan = None
            progress(f"network {self.cluster} removed")
