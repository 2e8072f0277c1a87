"""Planning the local cluster's network: names, addresses and routes, decided before any I/O.

DESIGN.md §4: every node is a network namespace with a veth into a shared bridge namespace ("the
network"); every pod is a namespace with a veth into its node; pod IPs come from a per-node CIDR and
routes make pods on different nodes reach each other through their nodes. `network.py` executes a
plan; this module only decides it, so the addressing is testable without root.

The shape of the network (a routed, Calico-like design):
- bridge netns `zt-<cluster>-net` holds bridge `zt<h>br`; node i's uplink is `eth0` in its node
  netns, peered with `zt<h>n<ii>` on the bridge; node IPs are `node_cidr` .2, .3, …
- node i owns pod CIDR `10.244.<i>.0/24`; its gateway address `.1` sits on the node's `lo` and
  answers the pods' ARP; pod k of the node is `.<k+2>`/32 on the pod's `eth0`, peered with
  `zt<h>p<ii><kk>` in the node netns, with a /32 route to it there. Pods send everything to the
  gateway (default route, onlink), so same-node and cross-node traffic are both routed by the node;
  node netns forward (`ip_forward=1`) and carry one route per other node's pod CIDR via its node IP.
- optional host access: veth `zt<h>h0` (root netns, `node_cidr` .1) ↔ `zt<h>h1` on the bridge, with
  routes to every pod CIDR, so processes in the root namespace (the control plane, a user's curl)
  reach nodes and pods, and pods reach the host at `host_ip`.
- service VIPs come from `10.96.0.0/16`; a VIP is stable across re-plans (kept from the previous
  plan, else the Service's own `clusterIP`, else a hash of its name, probed linearly).

Every namespace is named `zt-<cluster>-…` and every link `zt<h>…` (h = 4 hex digits of the cluster
name's hash, so a link fits in 15 characters), which is how `down` finds leftovers after a crash.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from zerotunnel.errors import InputError

DEFAULT_POD_CIDR = "10.244.0.0/16"
DEFAULT_NODE_CIDR = "10.243.0.0/24"
DEFAULT_SERVICE_CIDR = "10.96.0.0/16"
DEFAULT_CLUSTER_DOMAIN = "cluster.local"
POD_PREFIX_LEN = 24
POD_INTERFACE = "eth0"
NODE_UPLINK = "eth0"
IFNAMSIZ = 15
_MAX_NETNS_NAME = 100

_CLUSTER_RE = re.compile(r"^[a-z0-9]{1,12}$")
# Kubernetes: namespaces are DNS labels (no dots), pods and nodes DNS subdomains.
_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@dataclass(frozen=True, slots=True)
class PodSpec:
    """What the plan needs of a Pod: identity, node, and optionally the IP it asks for."""

    name: str
    namespace: str
    node: str
    ip: str | None = None


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """What the plan needs of a Service: its name and optionally the `clusterIP` it asks for."""

    name: str
    namespace: str
    cluster_ip: str | None = None


@dataclass(frozen=True, slots=True)
class NodePlan:
    name: str
    index: int
    netns: str
    ip: ipaddress.IPv4Address
    pod_cidr: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    uplink: str
    bridge_port: str


@dataclass(frozen=True, slots=True)
class PodPlan:
    name: str
    namespace: str
    node: str
    index: int
    netns: str
    ip: ipaddress.IPv4Address
    gateway: ipaddress.IPv4Address
    interface: str
    node_veth: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class ServicePlan:
    name: str
    namespace: str
    vip: ipaddress.IPv4Address

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Route:
    """`destination via gateway` in `netns` (None = the root namespace)."""

    netns: str | None
    destination: ipaddress.IPv4Network
    via: ipaddress.IPv4Address


@dataclass(frozen=True, slots=True)
class NetworkPlan:
    cluster: str
    netns_prefix: str
    link_prefix: str
    bridge_netns: str
    bridge: str
    node_cidr: ipaddress.IPv4Network
    pod_cidr: ipaddress.IPv4Network
    service_cidr: ipaddress.IPv4Network
    host_access: bool
    host_ip: ipaddress.IPv4Address
    host_veth: str
    host_peer: str
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]
    services: tuple[ServicePlan, ...] = field(default=())

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def pod(self, namespace: str, name: str) -> PodPlan:
        for p in self.pods:
            if p.namespace == namespace and p.name == name:
                return p
        raise KeyError(f"{namespace}/{name}")

    def pods_on(self, node: str) -> tuple[PodPlan, ...]:
        return tuple(p for p in self.pods if p.node == node)

    def service(self, namespace: str, name: str) -> ServicePlan:
        for s in self.services:
            if s.namespace == namespace and s.name == name:
                return s
        raise KeyError(f"{namespace}/{name}")

    def node_routes(self) -> tuple[Route, ...]:
        """Each node's routes to the other nodes' pod CIDRs, through those nodes' IPs."""
        return tuple(
            Route(n.netns, other.pod_cidr, other.ip)
            for n in self.nodes
            for other in self.nodes
            if other.name != n.name
        )

    def host_routes(self) -> tuple[Route, ...]:
        """Root-namespace routes to every pod CIDR (only with host access)."""
        if not self.host_access:
            return ()
        return tuple(Route(None, n.pod_cidr, n.ip) for n in self.nodes)

    def all_netns(self) -> tuple[str, ...]:
        return (self.bridge_netns, *(n.netns for n in self.nodes), *(p.netns for p in self.pods))


def cluster_link_prefix(cluster: str) -> str:
    """`zt` + 4 hex digits of the cluster name's hash: short enough for IFNAMSIZ, unique enough."""
    return "zt" + hashlib.sha256(cluster.encode()).hexdigest()[:4]


def cluster_netns_prefix(cluster: str) -> str:
    return f"zt-{cluster}-"


def validate_cluster_name(cluster: str) -> str:
    """Lowercase letters and digits only: a dash would let `zt-a-` match cluster `a-b`'s leftovers."""
    if not _CLUSTER_RE.match(cluster):
        raise InputError(f"cluster name {cluster!r}: use 1-12 lowercase letters or digits")
    return cluster


def _bounded(name: str) -> str:
    if len(name) <= _MAX_NETNS_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[: _MAX_NETNS_NAME - 11]}-{digest}"


def node_netns_name(cluster: str, node: str) -> str:
    return _bounded(f"zt-{cluster}-node-{node}")


def pod_netns_name(cluster: str, namespace: str, pod: str) -> str:
    """`zt-<cluster>-pod-<namespace>.<pod>`: namespaces have no dots, so the name is unambiguous."""
    return _bounded(f"zt-{cluster}-pod-{namespace}.{pod}")


def bridge_netns_name(cluster: str) -> str:
    return f"zt-{cluster}-net"


def _check_name(kind: str, value: str, pattern: re.Pattern[str]) -> None:
    if not pattern.match(value):
        raise InputError(f"{kind} name {value!r} is not a valid Kubernetes name")


def _assign_indexes(
    keys: Sequence[tuple[str, ...]], previous: Mapping[tuple[str, ...], int], limit: int, what: str
) -> dict[tuple[str, ...], int]:
    """Stable small integers: kept from the previous plan, the lowest free one for newcomers."""
    out = {k: previous[k] for k in keys if k in previous}
    used = set(out.values())
    nxt = 0
    for k in keys:
        if k in out:
            continue
        while nxt in used:
            nxt += 1
        if nxt >= limit:
            raise InputError(f"too many {what}: at most {limit}")
        out[k] = nxt
        used.add(nxt)
    return out


def _parse_net(text: str, what: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text)
    except ValueError as exc:
        raise InputError(f"{what} {text!r}: {exc}") from exc


def plan_network(
    cluster: str,
    nodes: Iterable[str],
    pods: Iterable[PodSpec],
    services: Iterable[ServiceSpec] = (),
    *,
    pod_cidr: str = DEFAULT_POD_CIDR,
    node_cidr: str = DEFAULT_NODE_CIDR,
    service_cidr: str = DEFAULT_SERVICE_CIDR,
    host_access: bool = False,
    previous: NetworkPlan | None = None,
) -> NetworkPlan:
    """Decide every name and address. Nodes named only by pods are added; order never matters.

    `previous` keeps existing pods, nodes and services on their indexes and addresses, so applying
    changed YAML to a running cluster never renumbers what is already up.
    """
    validate_cluster_name(cluster)
    pod_net = _parse_net(pod_cidr, "pod CIDR")
    node_net = _parse_net(node_cidr, "node CIDR")
    svc_net = _parse_net(service_cidr, "service CIDR")
    if pod_net.prefixlen > POD_PREFIX_LEN:
        raise InputError(f"pod CIDR {pod_net} is smaller than one /{POD_PREFIX_LEN} per node")
    pod_list = sorted(pods, key=lambda p: (p.node, p.namespace, p.name))
    node_names = sorted(set(nodes) | {p.node for p in pod_list})
    for n in node_names:
        _check_name("node", n, _SUBDOMAIN_RE)
    seen: set[tuple[str, str]] = set()
    for p in pod_list:
        _check_name("namespace", p.namespace, _LABEL_RE)
        _check_name("pod", p.name, _SUBDOMAIN_RE)
        if (p.namespace, p.name) in seen:
            raise InputError(f"pod {p.namespace}/{p.name} is declared twice")
        seen.add((p.namespace, p.name))
    link = cluster_link_prefix(cluster)

    node_slots = min(node_net.num_addresses - 3, 2 ** (POD_PREFIX_LEN - pod_net.prefixlen), 256)
    prev_nodes: dict[tuple[str, ...], int] = {(n.name,): n.index for n in previous.nodes} if previous else {}
    node_idx = _assign_indexes([(n,) for n in node_names], prev_nodes, node_slots, "nodes")
    pod_subnets = list(pod_net.subnets(new_prefix=POD_PREFIX_LEN))[:node_slots]
    node_plans: list[NodePlan] = []
    for n in node_names:
        i = node_idx[(n,)]
        sub = pod_subnets[i]
        node_plans.append(NodePlan(
            name=n, index=i, netns=node_netns_name(cluster, n), ip=node_net.network_address + 2 + i,
            pod_cidr=sub, gateway=sub.network_address + 1, uplink=NODE_UPLINK,
            bridge_port=f"{link}n{i:02x}",
        ))

    pod_plans: list[PodPlan] = []
    prev_pods: dict[tuple[str, ...], int] = (
        {(p.node, p.namespace, p.name): p.index for p in previous.pods} if previous else {}
    )
    for node in node_plans:
        mine = [p for p in pod_list if p.node == node.name]
        requested: dict[tuple[str, ...], int] = {}
        for p in mine:
            if p.ip is None:
                continue
            try:
                addr = ipaddress.IPv4Address(p.ip)
            except ValueError as exc:
                raise InputError(f"pod {p.namespace}/{p.name}: podIP {p.ip!r}: {exc}") from exc
            offset = int(addr) - int(node.pod_cidr.network_address) - 2
            if addr not in node.pod_cidr or not 0 <= offset < 253:
                raise InputError(
                    f"pod {p.namespace}/{p.name}: podIP {addr} is outside node {node.name}'s pod range "
                    f"{node.pod_cidr} (.2-.254)"
                )
            requested[(p.node, p.namespace, p.name)] = offset
        if len(set(requested.values())) != len(requested):
            raise InputError(f"two pods on node {node.name} ask for the same podIP")
        keep: dict[tuple[str, ...], int] = {
            **{k: v for k, v in prev_pods.items() if v not in requested.values()}, **requested
        }
        keys = [(p.node, p.namespace, p.name) for p in mine]
        idx = _assign_indexes(keys, keep, 253, f"pods on node {node.name}")
        for p in mine:
            k = idx[(p.node, p.namespace, p.name)]
            pod_plans.append(PodPlan(
                name=p.name, namespace=p.namespace, node=p.node, index=k,
                netns=pod_netns_name(cluster, p.namespace, p.name),
                ip=node.pod_cidr.network_address + 2 + k, gateway=node.gateway,
                interface=POD_INTERFACE, node_veth=f"{link}p{node.index:02x}{k:02x}",
            ))

    svc_plans = _plan_services(services, svc_net, previous.services if previous else ())
    plan = NetworkPlan(
        cluster=cluster, netns_prefix=cluster_netns_prefix(cluster), link_prefix=link,
        bridge_netns=bridge_netns_name(cluster), bridge=f"{link}br", node_cidr=node_net,
        pod_cidr=pod_net, service_cidr=svc_net, host_access=host_access,
        host_ip=node_net.network_address + 1, host_veth=f"{link}h0", host_peer=f"{link}h1",
        nodes=tuple(sorted(node_plans, key=lambda n: n.index)),
        pods=tuple(sorted(pod_plans, key=lambda p: (p.node, p.index))),
        services=svc_plans,
    )
    _check_plan(plan)
    return plan


def _plan_services(
    services: Iterable[ServiceSpec], net: ipaddress.IPv4Network, previous: Sequence[ServicePlan]
) -> tuple[ServicePlan, ...]:
    """VIPs: the previous plan's, else the Service's clusterIP, else hash-and-probe (stable)."""
    svc_list = sorted(services, key=lambda s: (s.namespace, s.name))
    prev = {s.key: s.vip for s in previous}
    # .0 is the network, .1 is what Kubernetes gives its API server, the last is broadcast
    reserved = {net.network_address, net.network_address + 1, net.broadcast_address}
    taken: dict[ipaddress.IPv4Address, tuple[str, str]] = {}
    out: dict[tuple[str, str], ipaddress.IPv4Address] = {}

    def take(key: tuple[str, str], vip: ipaddress.IPv4Address) -> None:
        if vip in taken:
            raise InputError(f"service {key[0]}/{key[1]}: clusterIP {vip} is already used by "
                             f"{taken[vip][0]}/{taken[vip][1]}")
        taken[vip] = key
        out[key] = vip

    for s in svc_list:
        _check_name("namespace", s.namespace, _LABEL_RE)
        _check_name("service", s.name, _LABEL_RE)
        if s.cluster_ip is None or s.cluster_ip.lower() == "none":
            continue
        try:
            vip = ipaddress.IPv4Address(s.cluster_ip)
        except ValueError as exc:
            raise InputError(f"service {s.namespace}/{s.name}: clusterIP {s.cluster_ip!r}: {exc}") from exc
        if vip not in net or vip in reserved:
            raise InputError(f"service {s.namespace}/{s.name}: clusterIP {vip} is not usable in {net}")
        take((s.namespace, s.name), vip)
    for s in svc_list:
        key = (s.namespace, s.name)
        if key not in out and key in prev and prev[key] not in taken and prev[key] in net:
            take(key, prev[key])
    size = net.num_addresses
    for s in svc_list:
        key = (s.namespace, s.name)
        if key in out:
            continue
        start = int.from_bytes(hashlib.sha256(f"{s.namespace}/{s.name}".encode()).digest()[:8], "big")
        for step in range(size):
            vip = net.network_address + (start + step) % size
            if vip not in reserved and vip not in taken:
                take(key, vip)
                break
        else:
            raise InputError(f"service CIDR {net} is full")
    return tuple(ServicePlan(name=k[1], namespace=k[0], vip=v) for k, v in sorted(out.items()))


def _check_plan(plan: NetworkPlan) -> None:
    """Invariants `network.py` relies on; a violation is a bug here, not a user error."""
    links = [plan.bridge, plan.host_veth, plan.host_peer, *(n.bridge_port for n in plan.nodes),
             *(p.node_veth for p in plan.pods)]
    assert len(set(links)) == len(links), "link names collide"
    assert all(len(name) <= IFNAMSIZ and name.startswith(plan.link_prefix) for name in links)
    netns = plan.all_netns()
    assert len(set(netns)) == len(netns), "netns names collide"
    assert all(n.startswith(plan.netns_prefix) for n in netns)
    overlap = [(a, b) for a in (plan.node_cidr, plan.pod_cidr, plan.service_cidr)
               for b in (plan.node_cidr, plan.pod_cidr, plan.service_cidr) if a is not b and a.overlaps(b)]
    if overlap:
        raise InputError(f"address ranges overlap: {overlap[0][0]} and {overlap[0][1]}")


def service_hostnames(
    service: ServicePlan, client_namespace: str, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
) -> tuple[str, ...]:
    """The names a pod in `client_namespace` may use for a Service (Kubernetes DNS, issue 5)."""
    short = f"{service.name}.{service.namespace}"
    names = [f"{short}.svc.{cluster_domain}", short]
    if service.namespace == client_namespace:
        names.append(service.name)
    return tuple(names)


def pod_hosts(
    pod: PodPlan, services: Sequence[ServicePlan], cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
) -> dict[str, str]:
    """Name → IP for the pod's hosts file: its own name (as the kubelet writes it), then services."""
    names = {pod.name: str(pod.ip)}
    for s in sorted(services, key=lambda s: (s.namespace, s.name)):
        for host in service_hostnames(s, pod.namespace, cluster_domain):
            names[host] = str(s.vip)
    return names
