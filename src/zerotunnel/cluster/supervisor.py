"""The local cluster's supervisor daemon: builds the cluster, keeps it running, tears it down.

`zerotunnel up` starts this as a daemon (runner.spawn_supervisor) and returns once `status.json` says
`ready` (or `failed`: then everything was already torn down). Issue 5 / DESIGN.md §1, §4, in order:
1. load the config (a bad config fails `up` before anything is built);
2. plan and create the network (nodes and pods as netns), write each pod's hosts file;
3. create the mesh CA (once per cluster) and `addresses.json`;
4. install capture in every ambient pod (spec istio-ambient.md §2.3) and service DNAT in the others
   (what kube-proxy would do: only pods without a node proxy resolve VIPs in the kernel);
5. start one node proxy per node inside its node netns and wait for its readiness endpoint;
6. register each ambient pod with its node proxy (pod API `add`, answered once the pod's listeners
   and certificate are ready), and only then start the pod's commands — as the CNI plugin does,
   so no connection of the app ever leaves the pod uncaptured.
Then it watches the YAML: pods added or removed are started or stopped, hosts files, DNAT rules and
addresses follow; policies are applied by the node proxies themselves, which watch the same files.

On SIGTERM (`zerotunnel down`) it stops every process and removes the network.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import watchfiles

from zerotunnel.cluster import netns as ns
from zerotunnel.cluster import network, podapi
from zerotunnel.cluster.desired import (
    Desired,
    IngressAddress,
    PodWant,
    addresses_document,
    container_argv,
    container_env,
    desired_state,
    ingress_addresses,
    loopback_ips,
    needs_host_access,
    pod_specs,
    service_endpoints,
    with_mesh_options,
)
from zerotunnel.cluster.procs import Managed, ProcessSpec, argv_in_netns
from zerotunnel.cluster.state import (
    PHASE_FAILED,
    PHASE_READY,
    PHASE_STARTING,
    PHASE_STOPPED,
    PHASE_STOPPING,
    ClusterDir,
    config_files,
    write_atomic,
    write_json,
)
from zerotunnel.cluster.topology import NetworkPlan, cluster_link_prefix, plan_network, pod_hosts
from zerotunnel.config import Config, ConfigError, load
from zerotunnel.control import castore
from zerotunnel.control.files import read_config_paths
from zerotunnel.control.tokens import TokenStore
from zerotunnel.errors import InputError, ZerotunnelError
from zerotunnel.node.capture import connect_in_netns, in_netns, install_capture

log = logging.getLogger("zerotunnel.cluster")

READINESS_PORT = 15021
NODE_READY_TIMEOUT = 30.0
_MAX_EVENTS = 200
CRASHES_AT_START = 2
CONTROL_PORT = 15012
MIN_UP = 0.5


class StartupError(ZerotunnelError):
    """The cluster could not be brought up; the message is what `up` prints."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def listening_ports(netns: str | None) -> set[int]:
    """TCP ports in LISTEN state in `netns` (None: this namespace), from /proc/…/net/tcp{,6}.

    /proc/thread-self/net shows the calling thread's namespace, so this runs in a worker thread.
    """
    ports: set[int] = set()

    def read() -> None:
        for name in ("tcp", "tcp6"):
            try:
                lines = Path(f"/proc/thread-self/net/{name}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                if len(fields) > 3 and fields[3] == "0A":
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))

    if netns is None:
        read()
    else:
        with in_netns(netns):
            read()
    return ports


def node_ready(netns: str, port: int = READINESS_PORT) -> bool:
    """`GET /healthz/ready` on the node proxy's readiness port inside the node netns → 200?"""
    try:
        sock = connect_in_netns(netns, ("127.0.0.1", port), mark=None, timeout=1.0)
    except OSError:
        return False
    with sock:
        try:
            sock.sendall(b"GET /healthz/ready HTTP/1.0\r\nHost: localhost\r\n\r\n")
            head = sock.recv(64)
        except OSError:
            return False
    parts = head.split(None, 2)
    return len(parts) >= 2 and parts[1] == b"200"


def _accepts(netns: str, host: str, port: int) -> bool:
    try:
        connect_in_netns(netns, (host, port), mark=None, timeout=1.0).close()
    except OSError:
        return False
    return True


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class PodRun:
    """A running pod: its containers' processes and its registration with the node proxy."""

    def __init__(self, want: PodWant, ip: str, netns: str | None) -> None:
        self.want = want
        self.ip = ip
        self.netns = netns
        self.procs: list[tuple[str, Managed]] = []
        self.registered = False
        self.listening: set[int] = set()
        self.error: str | None = None

    @property
    def running(self) -> bool:
        return bool(self.procs) and all(m.running for _, m in self.procs)

    @property
    def ready(self) -> bool:
        """Node ack (ambient pods), every container running, and every declared containerPort
        listening (like a tcpSocket probe); a pod without ports must have stayed up `MIN_UP`, so a
        command that dies at once is not reported ready."""
        if not self.running or (self.want.ambient and not self.registered):
            return False
        if self.want.ports:
            return set(self.want.ports) <= self.listening
        now = time.time()
        return all(m.started_at is not None and now - m.started_at >= MIN_UP for _, m in self.procs)

    def to_json(self, cdir: ClusterDir, *, node_up: bool = True) -> dict[str, Any]:
        """`node_up`: the node proxy serving an ambient pod is running. A dead one took the pod's
        listeners with it, so the pod is not ready until the restarted proxy has it registered again
        (its `registered` flag only drops when the restart is noticed)."""
        w = self.want
        pids = [m.pid for _, m in self.procs if m.pid]
        return {
            "namespace": w.namespace, "name": w.name, "node": w.node, "ip": self.ip, "netns": self.netns,
            "ambient": w.ambient, "identity": w.identity, "waypoint_of": w.waypoint_of,
            "registered": self.registered,
            "ready": self.ready and node_up, "restarts": sum(m.restarts for _, m in self.procs),
            "state": "running" if self.running else next(
                (m.state for _, m in self.procs if not m.running), "pending"),
            "pid": pids[0] if pids else None, "ports": list(w.ports), "error": self.error,
            "log": str(cdir.pod_log(w.namespace, w.name)),
            "containers": [{"name": name, "pid": m.pid, "state": m.state, "restarts": m.restarts,
                            "last_exit": m.last_exit} for name, m in self.procs],
        }


class Supervisor:
    def __init__(
        self, cdir: ClusterDir, paths: list[str], *, netns: bool = True, proxies: bool = True,
        control_plane: bool = False,
    ) -> None:
        self.cdir = cdir
        self.cluster = cdir.cluster
        self.paths = paths
        self.use_netns = netns
        self.proxies = proxies and netns
        self.control_plane = control_plane and self.proxies
        self.control: Managed | None = None
        self.tokens: dict[str, str] = {}
        self.version = 0
        self._digest = ""
        self.config: Config | None = None
        self.desired: Desired | None = None
        self.plan: NetworkPlan | None = None
        self.network_built = False
        self.nodes: dict[str, Managed] = {}
        self.node_ready: dict[str, bool] = {}
        self.pods: dict[str, PodRun] = {}
        self.phase = PHASE_STARTING
        self.reason: str | None = None
        self.config_error: str | None = None
        self.events: list[dict[str, str]] = []
        self.stop_event = asyncio.Event()
        self._dirty = True
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lock = asyncio.Lock()

    # --- status ---------------------------------------------------------------------------------

    def event(self, message: str) -> None:
        log.info("%s", message)
        self.events.append({"time": _now(), "message": message})
        del self.events[:-_MAX_EVENTS]
        self.publish()

    def changed(self) -> None:
        self._dirty = True

    def publish(self) -> None:
        plan = self.plan
        nodes = []
        for name in (self.desired.nodes if self.desired else ()):
            m = self.nodes.get(name)
            node_plan = plan.node(name) if plan is not None else None
            nodes.append({
                "name": name, "netns": node_plan.netns if node_plan else None,
                "ip": str(node_plan.ip) if node_plan else None,
                "pod_cidr": str(node_plan.pod_cidr) if node_plan else None,
                "proxy": self.proxies, "pid": m.pid if m else None,
                "state": m.state if m else ("none" if not self.proxies else "pending"),
                "restarts": m.restarts if m else 0, "ready": self.node_ready.get(name, not self.proxies),
                "socket": str(self.cdir.node_socket(name)) if self.proxies else None,
                "log": str(self.cdir.node_log(name)),
            })
        status = {
            "cluster": self.cluster, "phase": self.phase, "reason": self.reason,
            "mode": "netns" if self.use_netns else "loopback", "proxies": self.proxies,
            "control_plane": self._control_status(),
            "supervisor_pid": os.getpid(), "config_paths": self.paths,
            "config_version": self.version or None,
            "config_error": self.config_error, "updated": _now(), "events": self.events,
            "nodes": nodes,
            "pods": [self.pods[k].to_json(self.cdir, node_up=self._node_up(self.pods[k].want))
                     for k in sorted(self.pods)],
            "services": [{"namespace": s.namespace, "name": s.name, "vip": str(s.vip)}
                         for s in (plan.services if plan else ())],
            "host_access": {"host_ip": str(plan.host_ip), "interface": plan.host_veth}
            if plan is not None and plan.host_access else None,
            "gateways": [a.to_json() for a in self._ingress()],
        }
        write_json(self.cdir.status_file, status)
        self._dirty = False

    # --- build ----------------------------------------------------------------------------------

    def _load_good(self) -> Config:
        """Load the user's files; if they are good and changed, publish them to the node proxies.

        The node proxies read `<state>/config/current.yaml`, a snapshot the supervisor replaces
        (atomically) only with a config that loaded: so a node proxy that restarts while the user's
        files are broken still starts with the last good config, and files added to or removed from
        the user's directory reach the proxies without restarting them. Each file's documents are
        preceded by a `# source:` comment naming it.
        """
        files = read_config_paths(config_files(self.paths))
        digest = hashlib.sha256(repr(files).encode()).hexdigest()
        if digest == self._digest and self.config is not None:
            return self.config
        config = load(files)
        parts = [f"# source: {name}\n{text}" + ("" if text.endswith("\n") else "\n") for name, text in files]
        snapshot = "---\n".join(parts) if parts else "# no configuration files\n"
        load([(str(self.snapshot_file), snapshot)])  # the joined stream must load the same way
        self.snapshot_file.parent.mkdir(exist_ok=True)
        write_atomic(self.snapshot_file, snapshot)
        self._digest = digest
        self.version += 1
        return config

    @property
    def snapshot_file(self) -> Path:
        return self.cdir.root / "config" / "current.yaml"

    def _load(self) -> Config:
        try:
            return self._load_good()
        except (ConfigError, InputError) as exc:
            raise StartupError(exc.message) from exc

    def _plan(self, desired: Desired, config: Config, previous: NetworkPlan | None) -> NetworkPlan:
        """The network plan; with host access when an ingress gateway runs (decided once, at `up`:
        the host's veth and routes are not added to a running cluster)."""
        host_access = previous.host_access if previous is not None else needs_host_access(desired)
        return plan_network(self.cluster, desired.nodes, pod_specs(desired, config), desired.services,
                            host_access=host_access, previous=previous)

    def _node_up(self, want: PodWant) -> bool:
        m = self.nodes.get(want.node)
        return not (want.ambient and self.proxies) or m is None or m.running

    def _ingress(self) -> tuple[IngressAddress, ...]:
        if self.plan is None or self.config is None or self.desired is None:
            return ()
        return ingress_addresses(self.config, self.desired, self.plan)

    def _check_host_routes(self) -> None:
        """Host access adds root-namespace routes for the pod and node ranges: refuse (clearly) when
        the host already routes them — typically another zerotunnel cluster with a gateway."""
        assert self.plan is not None
        clashes = network.root_route_clashes(self.plan)
        if not clashes:
            return
        raise StartupError(
            f"the ingress gateway must be reachable from the host, which needs host routes to "
            f"{self.plan.pod_cidr} and {self.plan.node_cidr}, but this host already routes "
            f"{', '.join(clashes)}{route_owners(clashes)}")

    def _write_addresses(self) -> None:
        assert self.plan is not None
        write_json(self.cdir.addresses_file, addresses_document(self.plan))

    def _write_hosts(self, uids: list[str] | None = None) -> None:
        assert self.plan is not None
        for p in self.plan.pods:
            if uids is None or f"{p.namespace}/{p.name}" in uids:
                network.write_hosts_file(p.netns, pod_hosts(p, self.plan.services))

    def _dnat_for(self, want: PodWant) -> None:
        """Service VIP DNAT in an out-of-mesh pod (its traffic is not captured by any proxy)."""
        assert self.plan is not None and self.config is not None
        rules = [network.ServiceDnat(vip, port, tuple(eps))
                 for entries in service_endpoints(self.config, self.plan).values()
                 for vip, port, eps in entries]
        network.install_service_dnat(self.plan.pod(want.namespace, want.name).netns, rules)

    def _prepare_pod_network(self, want: PodWant) -> None:
        assert self.plan is not None
        netns = self.plan.pod(want.namespace, want.name).netns
        if want.ambient:
            install_capture(netns)
        else:
            self._dnat_for(want)

    def _control_status(self) -> dict[str, Any] | None:
        if self.control is None:
            return None
        return {"address": f"{self.control_address}:{CONTROL_PORT}", "state": self.control.state,
                "pid": self.control.pid, "restarts": self.control.restarts}

    @property
    def control_address(self) -> str:
        """The control plane's address: the last usable node-network IP, on the bridge itself."""
        assert self.plan is not None
        return str(self.plan.node_cidr.broadcast_address - 1)

    def _control_spec(self) -> ProcessSpec:
        """`zerotunnel control serve` in the bridge netns (every node reaches it on the node network),
        with the cluster's CA as its plug-in CA and the last good config snapshot as its config."""
        assert self.plan is not None
        argv = [sys.executable, "-m", "zerotunnel.cli.main", "control", "serve",
                "-c", str(self.snapshot_file.parent),
                "--state-dir", str(self.cdir.root / "control"), "--ca-dir", str(self.cdir.ca_dir),
                "--listen", f"{self.control_address}:{CONTROL_PORT}", "--metrics-listen", "off"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return ProcessSpec(argv_in_netns(self.plan.bridge_netns, argv), env, self.cdir.root,
                           self.cdir.log_dir / "control-plane.log", "control-plane")

    async def _start_control_plane(self) -> None:
        """Start the control plane, mint one join token per node, wait until it accepts connections."""
        assert self.plan is not None and self.desired is not None
        prefix = self.plan.node_cidr.prefixlen
        bridge = self.plan.bridge
        ns.ip_batch(self.plan.bridge_netns, [f"addr add {self.control_address}/{prefix} dev {bridge}"])
        store = TokenStore(self.cdir.root / "control")
        now = datetime.now(UTC)
        self.tokens = {n: store.create(n, now)[0] for n in self.desired.nodes}
        self.control = Managed(self._control_spec(), self.changed)
        self.control.start()
        self.event(f"starting the control plane on {self.control_address}:{CONTROL_PORT}")
        deadline = time.monotonic() + NODE_READY_TIMEOUT
        where = (self.plan.bridge_netns, self.control_address, CONTROL_PORT)
        while not await asyncio.to_thread(_accepts, *where):
            if self.control.state == "backoff" or time.monotonic() > deadline:
                raise StartupError("control plane did not start:\n"
                                   f"{tail(self.cdir.log_dir / 'control-plane.log')}")
            await asyncio.sleep(0.1)
        self.event("control plane ready")

    def _node_spec(self, node: str) -> ProcessSpec:
        assert self.plan is not None
        argv = [sys.executable, "-m", "zerotunnel.cli.main", "node", "--node", node]
        if self.control_plane:
            # enrol once with the join token; later restarts reuse the identity kept in --state-dir
            argv += ["--control", f"{self.control_address}:{CONTROL_PORT}",
                     "--ca-root", str(self.cdir.ca_dir / "root-cert.pem"),
                     "--state-dir", str(self.cdir.root / f"node-{node}")]
            if not (self.cdir.root / f"node-{node}" / "node").exists():
                argv += ["--join-token", self.tokens[node]]
        else:
            argv += ["-f", str(self.snapshot_file.parent), "--ca-dir", str(self.cdir.ca_dir)]
        argv += ["--addresses", str(self.cdir.addresses_file), "--pod-api", str(self.cdir.node_socket(node))]
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        return ProcessSpec(argv_in_netns(self.plan.node(node).netns, argv), env, self.cdir.root,
                           self.cdir.node_log(node), f"node/{node}")

    async def _wait_node_ready(self, node: str, m: Managed, timeout: float = NODE_READY_TIMEOUT) -> None:
        assert self.plan is not None
        netns = self.plan.node(node).netns
        sock = self.cdir.node_socket(node)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m.state == "backoff" and m.starts == 1 and self.phase == PHASE_STARTING:
                raise StartupError(f"node proxy {node} exited with status {m.last_exit}:\n"
                                   f"{tail(self.cdir.node_log(node))}")
            if sock.exists() and await asyncio.to_thread(node_ready, netns):
                return
            await asyncio.sleep(0.1)
        raise StartupError(f"node proxy {node} not ready after {timeout:.0f} s:\n"
                           f"{tail(self.cdir.node_log(node))}")

    def _on_node_start(self, node: str) -> Any:
        def started(m: Managed) -> None:
            if m.starts > 1:
                self._spawn(self._reregister(node, m))
        return started

    async def _reregister(self, node: str, m: Managed) -> None:
        """A restarted node proxy knows no pods: wait for it, then add its pods again."""
        self.node_ready[node] = False
        for run in self.pods.values():
            if run.want.node == node:
                run.registered = False
        self.changed()
        try:
            await self._wait_node_ready(node, m)
        except StartupError as exc:
            log.error("%s", exc.message)
            return
        self.node_ready[node] = True
        self.event(f"node proxy {node} restarted (restarts: {m.restarts}); re-registering its pods")
        await asyncio.gather(*(self._register(r) for r in self.pods.values()
                               if r.want.node == node and r.want.ambient), return_exceptions=True)
        self.changed()

    async def _register(self, run: PodRun) -> None:
        assert run.netns is not None
        req = {"op": "add", "uid": run.want.uid, "netns": f"/run/netns/{run.netns}", "ip": run.ip}
        try:
            await podapi.request(self.cdir.node_socket(run.want.node), req)
        except podapi.PodApiError as exc:
            run.error = exc.message
            raise
        run.registered = True
        run.error = None
        self.changed()

    def _pod_procs(self, run: PodRun) -> None:
        want = run.want
        pod_dir = self.cdir.pod_dir(want.namespace, want.name)
        pod_dir.mkdir(parents=True, exist_ok=True)
        logf = self.cdir.pod_log(want.namespace, want.name)
        for c in want.containers:
            cwd = Path(c.working_dir) if c.working_dir and Path(c.working_dir).is_dir() else pod_dir
            env = container_env(os.environ, want, run.ip, c.env)
            env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/local/bin:/usr/bin:/bin')}"
            env["HOME"] = str(pod_dir)
            if c is want.containers[0]:
                write_json(pod_dir / "env.json", env)  # `zerotunnel exec` runs with it, as kubectl exec does
            argv = with_mesh_options(container_argv(c), str(self.snapshot_file.parent), str(self.cdir.ca_dir),
                                     str(self.cdir.addresses_file))
            spec = ProcessSpec(argv_in_netns(run.netns, argv), env, cwd, logf,
                               f"pod/{want.uid}/{c.name}")
            run.procs.append((c.name, Managed(spec, self.changed)))

    async def _register_when_ready(self, run: PodRun, timeout: float = NODE_READY_TIMEOUT) -> None:
        """While running, a node proxy may be restarting: wait for it, and retry a refused add."""
        deadline = time.monotonic() + timeout
        while True:
            if self.node_ready.get(run.want.node):
                try:
                    await self._register(run)
                    return
                except podapi.PodApiError:
                    if time.monotonic() > deadline:
                        raise
            elif time.monotonic() > deadline:
                raise podapi.PodApiError(f"node proxy {run.want.node} not ready after {timeout:.0f} s")
            await asyncio.sleep(0.2)

    async def _start_pod(self, run: PodRun) -> None:
        """Register (ambient pods) before the first process starts, then start the containers."""
        if run.want.ambient and self.proxies:
            if self.phase == PHASE_READY:
                await self._register_when_ready(run)
            else:
                await self._register(run)
        self._pod_procs(run)
        for _, m in run.procs:
            m.start()
        self.changed()

    async def start(self) -> None:
        self.cdir.create()
        config = self._load()
        self.config = config
        self.desired = desired_state(config, mesh=self.proxies)
        for note in self.desired.skipped:
            self.event(note)
        d = self.desired
        self.event(f"config loaded: {len(d.nodes)} node(s), {len(d.pods)} pod(s), "
                   f"{len(d.services)} service(s)")
        if not self.use_netns:
            await self._start_loopback()
            return
        self.plan = self._plan(d, config, None)
        if not network.find_leftovers(self.cluster).empty:
            self.event("removing leftovers of a previous run")
            await asyncio.to_thread(network.destroy_network, self.cluster)
        if self.plan.host_access:
            await asyncio.to_thread(self._check_host_routes)
        self.network_built = True
        await asyncio.to_thread(network.create_network, self.plan, check_routes=False)
        self.event(f"network created: {len(self.plan.all_netns())} namespaces"
                   + (f", host access on {self.plan.host_veth} ({self.plan.host_ip})"
                      if self.plan.host_access else ""))
        self._write_hosts()
        self._write_addresses()
        if not (self.cdir.ca_dir / "root-cert.pem").exists():
            await asyncio.to_thread(castore.init_root, self.cdir.ca_dir, config.mesh.trust_domain,
                                    datetime.now(UTC))
            self.event(f"mesh CA created (trust domain {config.mesh.trust_domain})")
        for want in d.pods:
            pp = self.plan.pod(want.namespace, want.name)
            self.pods[want.uid] = PodRun(want, str(pp.ip), pp.netns)
        runs = list(self.pods.values())
        # Node proxies start first (their Python start-up is the longest step); meanwhile capture and
        # DNAT are installed and the pods outside the mesh, which need no node proxy, are started.
        if self.control_plane:
            await self._start_control_plane()
        if self.proxies:
            for node in d.nodes:
                m = Managed(self._node_spec(node), self.changed, self._on_node_start(node))
                self.nodes[node] = m
                m.start()
            self.event(f"starting {len(d.nodes)} node proxy(ies)")
        await asyncio.gather(*(asyncio.to_thread(self._prepare_pod_network, r.want) for r in runs))
        ambient = [r for r in runs if r.want.ambient]
        self.event(f"capture installed in {len(ambient)} ambient pod(s), "
                   f"service DNAT in {len(runs) - len(ambient)} other(s)")
        for r in runs:
            if not r.want.ambient:
                await self._start_pod(r)
        if self.proxies:
            await asyncio.gather(*(self._wait_node_ready(n, m) for n, m in self.nodes.items()))
            for n in self.nodes:
                self.node_ready[n] = True
            self.event("node proxies ready: " + ", ".join(d.nodes))
        try:
            await asyncio.gather(*(self._start_pod(r) for r in ambient))
        except podapi.PodApiError as exc:
            raise StartupError(exc.message) from exc
        self.event(f"started {len(self.pods)} pod(s)")

    async def _start_loopback(self) -> None:
        """`--no-netns`: pods run in the host's namespace with a 127.0.0.x POD_IP; nothing is captured."""
        assert self.desired is not None
        self.event("loopback mode: no network namespaces, no capture, no node proxies, no mTLS "
                   "(development only)")
        ips = loopback_ips(self.desired)
        for want in self.desired.pods:
            self.pods[want.uid] = PodRun(want, ips[want.uid], None)
        for run in self.pods.values():
            self._pod_procs(run)
            for _, m in run.procs:
                m.start()
        self.event(f"started {len(self.pods)} pod(s)")

    # --- steady state ---------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe_once(self) -> None:
        for run in list(self.pods.values()):
            if run.want.ports and run.running:
                try:
                    ports = await asyncio.to_thread(listening_ports, run.netns)
                except ZerotunnelError:
                    continue
                if ports != run.listening:
                    run.listening = ports
                    self.changed()

    async def _wait_all_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await self._probe_once()
            if all(r.ready for r in self.pods.values()):
                return
            crashing = [u for u, r in self.pods.items()
                        if sum(m.restarts for _, m in r.procs) >= CRASHES_AT_START]
            if crashing:
                raise StartupError("pod(s) keep crashing: " + "; ".join(
                    f"{u} ({self._why_not_ready(self.pods[u])})" for u in crashing))
            await asyncio.sleep(0.05)
        waiting = [f"{u} ({self._why_not_ready(r)})" for u, r in self.pods.items() if not r.ready]
        raise StartupError(f"pods not ready after {timeout:.0f} s: {', '.join(waiting)}")

    def _why_not_ready(self, run: PodRun) -> str:
        if not run.running:
            m = next((m for _, m in run.procs if not m.running), None)
            if m is None:
                return "not started"
            return (f"command {m.state}, {m.restarts} restart(s), last exit {m.last_exit}; "
                    "log: " + tail(m.spec.log_file, 5).replace("\n", " | "))
        if run.want.ambient and not run.registered:
            return f"not registered with node proxy: {run.error}"
        missing = sorted(set(run.want.ports) - run.listening)
        return f"not listening on port(s) {', '.join(map(str, missing))}"

    async def _housekeeping(self) -> None:
        readiness: tuple[bool, ...] = ()
        while not self.stop_event.is_set():
            await self._probe_once()
            now_ready = tuple(r.ready for r in self.pods.values())
            if now_ready != readiness:
                readiness = now_ready
                self.changed()
            for name, m in self.nodes.items():
                if not m.running and self.node_ready.get(name):
                    self.node_ready[name] = False
                    self.changed()
            if self._dirty:
                self.publish()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), 0.5)

    async def _apply(self, config: Config, version: int) -> None:
        """A good new config: start added pods, stop removed ones, refresh names and addresses."""
        async with self._lock:
            await self._apply_locked(config, version)

    async def _apply_locked(self, config: Config, version: int) -> None:
        assert self.desired is not None
        self.config_error = None
        new = desired_state(config, mesh=self.proxies, previous=self.desired)
        added_nodes = set(new.nodes) - set(self.desired.nodes)
        if added_nodes and self.use_netns:
            self.event(f"config v{version}: new node(s) {', '.join(sorted(added_nodes))} need a restart "
                       "(zerotunnel down; zerotunnel up); pods on them are not started")
            new = Desired(self.desired.nodes, tuple(p for p in new.pods if p.node in self.desired.nodes),
                          new.services, new.skipped)
        if (self.plan is not None and not self.plan.host_access and needs_host_access(new)
                and not needs_host_access(self.desired)):
            self.event(f"config v{version}: an ingress gateway pod was added; the host reaches it only "
                       "after a restart (zerotunnel down; zerotunnel up)")
        old_pods = {p.uid: p for p in self.desired.pods}
        new_pods = {p.uid: p for p in new.pods}
        removed = [u for u in old_pods if u not in new_pods or old_pods[u] != new_pods[u]]
        added = [u for u in new_pods if u not in old_pods or old_pods[u] != new_pods[u]]
        for uid in removed:
            await self._remove_pod(uid)
        self.config = config
        self.desired = new
        if not self.use_netns:
            ips = loopback_ips(new)
            for uid in added:
                run = PodRun(new_pods[uid], ips[uid], None)
                self.pods[uid] = run
                self._pod_procs(run)
                for _, m in run.procs:
                    m.start()
        else:
            self.plan = self._plan(new, config, self.plan)
            self._write_addresses()
            for uid in added:
                want = new_pods[uid]
                try:
                    pp = await asyncio.to_thread(network.add_pod, self.plan, want.namespace, want.name)
                    run = PodRun(want, str(pp.ip), pp.netns)
                    self.pods[uid] = run
                    self._write_hosts([uid])
                    await asyncio.to_thread(self._prepare_pod_network, want)
                    await self._start_pod(run)
                except (ZerotunnelError, OSError) as exc:
                    self.event(f"pod {uid} could not be started: {exc}")
            self._write_hosts()
            for run in self.pods.values():
                if not run.want.ambient:
                    await asyncio.to_thread(self._dnat_for, run.want)
        parts = [f"+{u}" for u in added if u not in removed] + [f"-{u}" for u in removed if u not in added]
        parts += [f"~{u}" for u in added if u in removed]
        self.event(f"config v{version} applied" + (f": pods {' '.join(parts)}" if parts else
                                                   " (policies are applied by the node proxies)"))
        self.changed()

    async def _remove_pod(self, uid: str) -> None:
        run = self.pods.pop(uid, None)
        if run is None:
            return
        await asyncio.gather(*(m.stop() for _, m in run.procs))
        if run.want.ambient and self.proxies:
            with contextlib.suppress(podapi.PodApiError):
                await podapi.request(self.cdir.node_socket(run.want.node), {"op": "del", "uid": uid}, 5.0)
        if run.netns is not None:
            await asyncio.to_thread(network.remove_pod, self.cluster, run.netns)

    async def _watch(self) -> None:
        """Reload on any change under the given paths (files added to a directory included); a bad
        change keeps the last good config in force and is reported (DESIGN.md §2)."""
        changes = watchfiles.awatch(*self.paths, debounce=200, step=50, stop_event=self.stop_event)
        async for _changes in changes:
            previous = self.version
            try:
                config = self._load_good()
            except (ConfigError, InputError) as exc:
                self._config_rejected(exc)
                continue
            if self.version != previous:
                await self._apply(config, self.version)

    def _config_rejected(self, exc: InputError) -> None:
        self.config_error = exc.message
        self.event(f"config change rejected, the previous config stays in force: {exc.message}")

    # --- teardown -------------------------------------------------------------------------------

    async def teardown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(m.stop() for r in self.pods.values() for _, m in r.procs),
                             return_exceptions=True)
        await asyncio.gather(*(m.stop() for m in self.nodes.values()), return_exceptions=True)
        if self.control is not None:
            await self.control.stop()
        if self.network_built:
            try:
                await asyncio.to_thread(network.destroy_network, self.cluster)
            except ZerotunnelError as exc:
                log.error("%s", exc.message)
        for node in self.nodes:
            with contextlib.suppress(OSError):
                self.cdir.node_socket(node).unlink()

    async def run(self, ready_timeout: float) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.stop_event.set)
        write_atomic(self.cdir.pid_file, f"{os.getpid()}\n")
        self.publish()
        rc = 0
        try:
            starting = asyncio.create_task(self._start_and_wait(ready_timeout))
            stopped = asyncio.create_task(self.stop_event.wait())
            done, _ = await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if starting not in done:
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await starting
                raise StartupError("stopped while starting")
            starting.result()
            stopped.cancel()
            self.phase = PHASE_READY
            for gw in self._ingress():
                ports = ", ".join(map(str, gw.ports)) or "no server port"
                hosts = f" for {', '.join(gw.hosts)}" if gw.hosts else ""
                self.event(f"ingress gateway {gw.namespace}/{gw.pod} ({gw.gateway}) reachable from the "
                           f"host at {gw.ip} port {ports}{hosts}")
            self.event(f"cluster {self.cluster} ready")
            housekeeping = asyncio.create_task(self._housekeeping())
            watch = asyncio.create_task(self._watch())
            await self.stop_event.wait()
            for t in (housekeeping, watch):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            self.phase = PHASE_STOPPING
            self.event("stopping")
        except (StartupError, ZerotunnelError) as exc:
            self.phase = PHASE_FAILED
            self.reason = exc.message
            log.error("up failed: %s", exc.message)
            rc = 1
        except Exception as exc:
            self.phase = PHASE_FAILED
            self.reason = f"{type(exc).__name__}: {exc}"
            log.exception("up failed")
            rc = 1
        finally:
            await self.teardown()
            if self.phase != PHASE_FAILED:
                self.phase = PHASE_STOPPED
            self.event("stopped; every process and namespace removed" if rc == 0
                       else f"failed, everything removed: {self.reason}")
            with contextlib.suppress(OSError):
                self.cdir.pid_file.unlink()
        return rc

    async def _start_and_wait(self, ready_timeout: float) -> None:
        await self.start()
        self.publish()
        await self._wait_all_ready(ready_timeout)


def route_owners(networks: list[str]) -> str:
    """What holds the clashing routes: ` (through zt…h0, the host access of zerotunnel cluster 'N'; stop
    it with `zerotunnel down --name N`)` when clusters' host veths carry them, else the devices."""
    proc = subprocess.run(["ip", "-4", "-o", "route", "show", "table", "all"], capture_output=True,
                          text=True, timeout=30, check=False)
    clusters = {cluster_link_prefix(c): c for c in network.list_clusters()}
    devices: set[str] = set()
    for line in proc.stdout.splitlines():
        words = line.split()
        if "dev" in words and words.index("dev") + 1 < len(words) and set(words[:2]) & set(networks):
            devices.add(words[words.index("dev") + 1])
    owners = sorted({c for d in devices for pfx, c in clusters.items() if d.startswith(pfx)})
    if owners:
        downs = "; ".join("`zerotunnel down" + ("" if c == "zerotunnel" else f" --name {c}") + "`"
                          for c in owners)
        return (f" (the host access of zerotunnel cluster(s) {', '.join(map(repr, owners))}, which is up: "
                f"stop it with {downs})")
    return f" (dev {', '.join(sorted(devices))})" if devices else ""


def main(argv: list[str] | None = None) -> int:
    """`python -m zerotunnel.cluster.supervisor --state DIR` (what `up` execs as the daemon)."""
    parser = argparse.ArgumentParser(prog="zerotunnel-supervisor")
    parser.add_argument("--state", required=True, help="the cluster's state directory")
    args = parser.parse_args(argv)
    root = Path(args.state)
    settings = json.loads((root / "cluster.json").read_text())
    cdir = ClusterDir(settings["cluster"], root)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sup = Supervisor(cdir, list(settings["paths"]), netns=bool(settings.get("netns", True)),
                     proxies=bool(settings.get("proxies", True)),
                     control_plane=bool(settings.get("control_plane", False)))
    with contextlib.suppress(OSError):
        os.chdir(root)
    socket.setdefaulttimeout(None)
    return asyncio.run(sup.run(float(settings.get("ready_timeout", 60.0))))


if __name__ == "__main__":
    sys.exit(main())
