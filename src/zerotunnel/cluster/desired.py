"""What the local cluster should run, decided from the config alone (no I/O; unit-tested without root).

Issue 5: nodes are the `Node` objects plus the `spec.nodeName`s of the pods; with no node named at
all there is one node. A pod without `nodeName` is scheduled on the node with the fewest pods (ties
by name), which spreads pods deterministically the way a default scheduler would on idle nodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from zerotunnel.cluster.topology import NetworkPlan, PodSpec, ServiceSpec
from zerotunnel.config import Config
from zerotunnel.config.model import Container, EnvVar
from zerotunnel.mesh.build import GATEWAY_NAME_LABEL

DEFAULT_NODE = "node-1"
IDLE_COMMAND = ("sleep", "infinity")


@dataclass(frozen=True, slots=True)
class PodWant:
    """One pod as the runner runs it."""

    namespace: str
    name: str
    node: str
    ambient: bool
    identity: str
    service_account: str
    containers: tuple[Container, ...]
    waypoint_of: str | None = None  # `ns/name` of the waypoint Gateway this pod runs
    gateway_of: str | None = None  # the Istio Gateway(s) this pod serves: `ns/name`, or "*" for all

    @property
    def uid(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ports(self) -> tuple[int, ...]:
        """The declared TCP containerPorts: the pod is ready once each one is listening."""
        return tuple(sorted({p.container_port for c in self.containers for p in c.ports
                             if p.protocol.upper() == "TCP"}))


@dataclass(frozen=True, slots=True)
class Desired:
    nodes: tuple[str, ...]
    pods: tuple[PodWant, ...]
    services: tuple[ServiceSpec, ...]
    skipped: tuple[str, ...] = ()

    def pod(self, uid: str) -> PodWant | None:
        return next((p for p in self.pods if p.uid == uid), None)


def desired_state(config: Config, *, mesh: bool = True, previous: Desired | None = None) -> Desired:
    """Nodes, pods (with node and mesh membership) and services of `config`.

    `mesh=False` (the runner without node proxies) treats every pod as out of the mesh. A pod that
    was already placed keeps its node when it still has no `nodeName` (`previous`), so an edit to an
    unrelated document never moves a running pod.
    """
    nodes = {n.meta.name for n in config.nodes} | {p.node_name for p in config.pods if p.node_name}
    if not nodes:
        nodes = {DEFAULT_NODE}
    placed = {p.uid: p.node for p in previous.pods} if previous else {}
    load = {n: 0 for n in nodes}
    skipped: list[str] = []
    chosen: dict[str, str] = {}
    for pod in config.pods:
        uid = f"{pod.meta.namespace}/{pod.meta.name}"
        if pod.host_network:
            skipped.append(f"{uid}: hostNetwork pods are not run by the local cluster")
            continue
        node = pod.node_name or (placed.get(uid) if placed.get(uid) in nodes else None)
        if node is not None:
            chosen[uid] = node
            load[node] += 1
    pods: list[PodWant] = []
    for pod in config.pods:
        uid = f"{pod.meta.namespace}/{pod.meta.name}"
        if pod.host_network:
            continue
        node = chosen.get(uid)
        if node is None:
            node = min(sorted(load), key=lambda n: load[n])
            load[node] += 1
        pods.append(PodWant(
            namespace=pod.meta.namespace, name=pod.meta.name, node=node,
            ambient=mesh and config.pod_is_ambient(pod), identity=config.identity_of(pod),
            service_account=pod.service_account, containers=pod.containers,
            waypoint_of=_waypoint_of(config, pod.meta.namespace, pod.meta.labels.get(GATEWAY_NAME_LABEL)),
            gateway_of=gateway_of(pod.containers),
        ))
    services = tuple(ServiceSpec(s.meta.name, s.meta.namespace, s.cluster_ip) for s in config.services)
    return Desired(tuple(sorted(nodes)), tuple(pods), services, tuple(skipped))


def _waypoint_of(config: Config, namespace: str, gateway: str | None) -> str | None:
    if gateway is None:
        return None
    found = any(g.is_waypoint and g.meta.name == gateway and g.meta.namespace == namespace
                for g in config.k8s_gateways)
    return f"{namespace}/{gateway}" if found else None


def gateway_of(containers: tuple[Container, ...]) -> str | None:
    """`NS/NAME` of a container running `zerotunnel gateway --gateway NS/NAME` ("*" without the flag:
    it serves every Istio Gateway); None for a pod that runs no ingress gateway."""
    for c in containers:
        argv = container_argv(c)
        if len(argv) < 2 or argv[0].rsplit("/", 1)[-1] != "zerotunnel" or argv[1] != "gateway":
            continue
        for k, arg in enumerate(argv[2:], start=2):
            if arg == "--gateway" and k + 1 < len(argv):
                return argv[k + 1]
            if arg.startswith("--gateway="):
                return arg.partition("=")[2]
        return "*"
    return None


def needs_host_access(desired: Desired) -> bool:
    """An ingress gateway is for clients outside the cluster: the host must reach it (issue 7)."""
    return any(p.gateway_of is not None for p in desired.pods)


@dataclass(frozen=True, slots=True)
class IngressAddress:
    """Where a client on the host reaches an ingress gateway pod: its IP and its servers' ports."""

    namespace: str
    pod: str
    gateway: str
    ip: str
    ports: tuple[int, ...]
    hosts: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"namespace": self.namespace, "pod": self.pod, "gateway": self.gateway, "ip": self.ip,
                "ports": list(self.ports), "hosts": list(self.hosts)}


def ingress_addresses(config: Config, desired: Desired, plan: NetworkPlan) -> tuple[IngressAddress, ...]:
    """Each gateway pod's address with the ports and hosts of the Istio Gateways it serves.

    A Gateway is served by the pod when the pod's `--gateway` names it (or it serves all) and the
    Gateway's `selector` matches the pod's labels, as istiod binds a Gateway to gateway workloads.
    """
    out = []
    for want in desired.pods:
        if want.gateway_of is None:
            continue
        src = config.pod(want.namespace, want.name)
        labels = src.meta.labels if src is not None else {}
        served = [g for g in config.gateways
                  if want.gateway_of in ("*", f"{g.meta.namespace}/{g.meta.name}")
                  and all(labels.get(k) == v for k, v in g.selector.items())]
        try:
            ip = str(plan.pod(want.namespace, want.name).ip)
        except KeyError:
            continue
        ports = tuple(sorted({s.port.number for g in served for s in g.servers}))
        hosts = tuple(sorted({h.partition("/")[2] or h for g in served for s in g.servers for h in s.hosts}))
        name = want.gateway_of if want.gateway_of != "*" else ", ".join(
            f"{g.meta.namespace}/{g.meta.name}" for g in served) or "*"
        out.append(IngressAddress(want.namespace, want.name, name, ip, ports, hosts))
    return tuple(out)


def pod_specs(desired: Desired, config: Config) -> list[PodSpec]:
    """The network plan's view of the pods (with a `status.podIP` the YAML asks for)."""
    out = []
    for p in desired.pods:
        src = config.pod(p.namespace, p.name)
        out.append(PodSpec(p.name, p.namespace, p.node, src.pod_ip if src is not None else None))
    return out


def container_argv(container: Container) -> tuple[str, ...]:
    """Kubernetes: `command` replaces the image's entrypoint and `args` follow it. With no image to
    supply an entrypoint, `args` alone are the argv, and a container with neither idles (so it can
    still be used with `zerotunnel exec`)."""
    argv = container.command + container.args
    return argv or IDLE_COMMAND


def container_env(
    base: Mapping[str, str], pod: PodWant, ip: str, env: tuple[EnvVar, ...]
) -> dict[str, str]:
    """The host's PATH (with zerotunnel's own bin first), the downward-API-like pod facts, then the
    container's `env` (entries with `valueFrom`, which we do not resolve, are left out)."""
    out = {k: v for k, v in base.items() if k in {"PATH", "LANG", "LC_ALL", "TERM", "TZ"}}
    out.update({
        "HOSTNAME": pod.name, "POD_NAME": pod.name, "POD_NAMESPACE": pod.namespace, "POD_IP": ip,
        "NODE_NAME": pod.node, "SERVICE_ACCOUNT": pod.service_account, "PYTHONUNBUFFERED": "1",
    })
    out.update({e.name: e.value for e in env if e.value is not None})
    return out


def addresses_document(plan: NetworkPlan) -> dict[str, dict[str, str]]:
    """`--addresses` for the node proxies: every pod IP and service VIP by `ns/name`."""
    return {
        "pod_ips": {f"{p.namespace}/{p.name}": str(p.ip) for p in plan.pods},
        "service_vips": {f"{s.namespace}/{s.name}": str(s.vip) for s in plan.services},
    }


def loopback_ips(desired: Desired) -> dict[str, str]:
    """`--no-netns`: each pod gets 127.0.0.<k+2> in pod order (127.0.0.1 stays the host's)."""
    if len(desired.pods) > 250:
        raise ValueError("loopback mode supports at most 250 pods")
    return {p.uid: f"127.0.0.{k + 2}" for k, p in enumerate(sorted(desired.pods, key=lambda p: p.uid))}


def changed(old: PodWant, new: PodWant) -> bool:
    return old != new


def service_endpoints(
    config: Config, plan: NetworkPlan
) -> Mapping[tuple[str, str], list[tuple[str, int, list[tuple[str, int]]]]]:
    """For each service: (VIP, port, [(pod IP, target port)]) — what kube-proxy would program."""
    out: dict[tuple[str, str], list[tuple[str, int, list[tuple[str, int]]]]] = {}
    ips = {(p.namespace, p.name): str(p.ip) for p in plan.pods}
    for svc in config.services:
        key = (svc.meta.namespace, svc.meta.name)
        try:
            vip = str(plan.service(*key).vip)
        except KeyError:
            continue
        selected = [p for p in config.pods_in(svc.meta.namespace)
                    if svc.selector and all(p.meta.labels.get(k) == v for k, v in svc.selector.items())
                    and (p.meta.namespace, p.meta.name) in ips]
        entries = []
        for port in svc.ports:
            if port.protocol.upper() != "TCP":
                continue
            eps: list[tuple[str, int]] = []
            for pod in selected:
                target = _target_port(pod.containers, port.target_port)
                if target is not None:
                    eps.append((ips[(pod.meta.namespace, pod.meta.name)], target))
            entries.append((vip, port.port, eps))
        out[key] = entries
    return out


def _target_port(containers: tuple[Container, ...], target: int | str) -> int | None:
    if isinstance(target, int):
        return target
    if target.isdigit():
        return int(target)
    return next((p.container_port for c in containers for p in c.ports if p.name == target), None)


MESH_COMPONENTS = frozenset({"waypoint", "gateway"})


def with_mesh_options(argv: tuple[str, ...], config_dir: str, ca_dir: str, addresses: str) -> tuple[str, ...]:
    """A pod running `zerotunnel waypoint|gateway …` gets the cluster's config, CA and addresses.

    In Istio, istiod deploys a waypoint or gateway and feeds it over xDS; a pod manifest only says
    which Gateway it runs (`--gateway NS/NAME`). The local cluster is that control plane here: it adds
    `-f` (the last good config snapshot), `--ca-dir` and `--addresses` unless the command sets them.
    """
    if len(argv) < 2 or argv[0].rsplit("/", 1)[-1] != "zerotunnel" or argv[1] not in MESH_COMPONENTS:
        return argv
    given = set(argv)
    extra: list[str] = []
    if not given & {"-f", "--filename"}:
        extra += ["-f", config_dir]
    if "--ca-dir" not in given:
        extra += ["--ca-dir", ca_dir]
    if "--addresses" not in given:
        extra += ["--addresses", addresses]
    return (*argv, *extra)
