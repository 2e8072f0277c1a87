"""Building and tearing down the local cluster's network from a `NetworkPlan` (DESIGN.md §4).

The plan (topology.py) decides; this module turns it into `ip -batch` scripts (pure functions, so
the exact commands are unit-tested) and runs them: one batch in the root namespace creates every
namespace and veth pair directly inside its target namespaces (nothing is ever left half-made in
the root namespace except the optional host-access veth), then one batch per namespace configures
it. Teardown finds its objects by name prefix, not from a plan, so it also cleans up after a crash
and is safe to run twice.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from zerotunnel.cluster import netns as ns
from zerotunnel.cluster.topology import (
    NetworkPlan,
    NodePlan,
    PodPlan,
    cluster_link_prefix,
    cluster_netns_prefix,
    validate_cluster_name,
)
from zerotunnel.errors import InputError
from zerotunnel.node.capture import removal_ruleset, run_nft

SERVICE_TABLE = "zerotunnel-svc"
_CLUSTER_RE = re.compile(r"^[a-z0-9]{1,12}$")
RESOLV_CONF = "# written by zerotunnel: names resolve from /etc/hosts only\nnameserver 127.0.0.1\n"


@dataclass(frozen=True, slots=True)
class Batch:
    """`ip -batch` lines to run in one namespace (None = root)."""

    netns: str | None
    commands: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Leftovers:
    """What of a cluster's network exists on this host (empty after a clean `down`)."""

    netns: tuple[str, ...]
    links: tuple[str, ...]
    etc_dirs: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not (self.netns or self.links or self.etc_dirs)


def _pod_link_commands(pod: PodPlan, node: NodePlan) -> list[str]:
    return [
        f"link add {pod.interface} netns {pod.netns} type veth peer name {pod.node_veth} netns {node.netns}"
    ]


def pod_batch(pod: PodPlan) -> Batch:
    """Inside the pod: its /32 and a default route to the node's gateway (onlink: no subnet)."""
    return Batch(pod.netns, (
        "link set lo up",
        f"addr add {pod.ip}/32 dev {pod.interface}",
        f"link set {pod.interface} up",
        f"route add default via {pod.gateway} dev {pod.interface} onlink",
    ))


def node_pod_commands(pod: PodPlan) -> list[str]:
    """The node's side of one pod: bring up the veth and route the pod's /32 to it."""
    return [f"link set {pod.node_veth} up", f"route add {pod.ip}/32 dev {pod.node_veth}"]


def setup_batches(plan: NetworkPlan) -> list[Batch]:
    """Every `ip` command that builds `plan`, in the order they must run."""
    root: list[str] = [f"netns add {name}" for name in plan.all_netns()]
    for node in plan.nodes:
        root.append(
            f"link add {node.uplink} netns {node.netns} type veth peer name {node.bridge_port} "
            f"netns {plan.bridge_netns}"
        )
    for pod in plan.pods:
        root += _pod_link_commands(pod, plan.node(pod.node))
    if plan.host_access:
        root.append(
            f"link add {plan.host_veth} type veth peer name {plan.host_peer} netns {plan.bridge_netns}"
        )
    bridge = [
        "link set lo up",
        f"link add {plan.bridge} type bridge",
        f"link set {plan.bridge} up",
    ]
    ports = [n.bridge_port for n in plan.nodes] + ([plan.host_peer] if plan.host_access else [])
    for port in ports:
        bridge += [f"link set {port} master {plan.bridge}", f"link set {port} up"]
    batches = [Batch(None, tuple(root)), Batch(plan.bridge_netns, tuple(bridge))]
    batches += [pod_batch(p) for p in plan.pods]
    for node in plan.nodes:
        cmds = [
            "link set lo up",
            f"addr add {node.gateway}/32 dev lo",
            f"addr add {node.ip}/{plan.node_cidr.prefixlen} dev {node.uplink}",
            f"link set {node.uplink} up",
        ]
        for pod in plan.pods_on(node.name):
            cmds += node_pod_commands(pod)
        cmds += [f"route add {r.destination} via {r.via} dev {node.uplink}"
                 for r in plan.node_routes() if r.netns == node.netns]
        batches.append(Batch(node.netns, tuple(cmds)))
    if plan.host_access:
        host = [f"addr add {plan.host_ip}/{plan.node_cidr.prefixlen} dev {plan.host_veth}",
                f"link set {plan.host_veth} up"]
        host += [f"route add {r.destination} via {r.via} dev {plan.host_veth}" for r in plan.host_routes()]
        batches.append(Batch(None, tuple(host)))
    return batches


def create_network(plan: NetworkPlan, *, check_routes: bool = True) -> None:
    """Build the whole network; on failure, remove what was built and re-raise.

    Refuses to start over leftovers of the same cluster: call `destroy_network` first (`up` does).
    With host access it also refuses CIDRs the host already routes (`check_routes`).
    """
    left = find_leftovers(plan.cluster)
    if not left.empty:
        raise InputError(
            f"cluster {plan.cluster!r} already has network objects on this host "
            f"({', '.join((*left.netns, *left.links, *left.etc_dirs)[:5])}); run `zerotunnel down` first"
        )
    if plan.host_access and check_routes:
        clashes = root_route_clashes(plan)
        if clashes:
            raise InputError(
                f"cluster {plan.cluster!r}: host access needs routes to {plan.pod_cidr} and "
                f"{plan.node_cidr}, but this host already routes {', '.join(clashes)}; "
                "choose other pod/node CIDRs"
            )
    try:
        for batch in setup_batches(plan):
            ns.ip_batch(batch.netns, batch.commands)
        for node in plan.nodes:
            ns.set_sysctl(node.netns, "net.ipv4.ip_forward", "1")
    except BaseException:
        destroy_network(plan.cluster)
        raise


def root_route_clashes(plan: NetworkPlan) -> list[str]:
    """Root-namespace IPv4 routes (other than the default) overlapping the plan's pod or node CIDR.

    With host access the plan adds root routes for those ranges; a clash would either fail half
    way or, worse, steal the host's own traffic.
    """
    proc = subprocess.run(["ip", "-4", "-o", "route", "show", "table", "all"], capture_output=True,
                          text=True, timeout=30, check=False)
    clashes = []
    for line in proc.stdout.splitlines():
        words = line.split()
        dest = words[1] if words and words[0] in {"blackhole", "unreachable", "prohibit", "local",
                                                  "broadcast", "unicast"} else (words[0] if words else "")
        try:
            net = ipaddress.IPv4Network(dest, strict=False)
        except ValueError:
            continue
        if net.prefixlen and (net.overlaps(plan.pod_cidr) or net.overlaps(plan.node_cidr)):
            clashes.append(str(net))
    return sorted(set(clashes))


def add_pod(plan: NetworkPlan, namespace: str, name: str) -> PodPlan:
    """Create one pod's netns and links in a running cluster (`plan` already includes the pod)."""
    pod = plan.pod(namespace, name)
    node = plan.node(pod.node)
    try:
        ns.ip_batch(None, [f"netns add {pod.netns}", *_pod_link_commands(pod, node)])
        ns.ip_batch(pod.netns, pod_batch(pod).commands)
        ns.ip_batch(node.netns, node_pod_commands(pod))
    except BaseException:
        remove_pod(plan.cluster, pod.netns)
        raise
    return pod


def remove_pod(cluster: str, pod_netns: str) -> None:
    """Remove one pod's netns (its veth and the node's route to it go with it) and /etc/netns dir."""
    if not pod_netns.startswith(cluster_netns_prefix(cluster)):
        raise InputError(f"{pod_netns} does not belong to cluster {cluster}")
    ns.delete_netns(pod_netns)
    shutil.rmtree(ns.ETC_NETNS_DIR / pod_netns, ignore_errors=True)


def find_leftovers(cluster: str, *, etc_netns: Path | None = None) -> Leftovers:
    """Every namespace, root-namespace link and /etc/netns directory named for `cluster`."""
    validate_cluster_name(cluster)
    prefix = cluster_netns_prefix(cluster)
    link_prefix = cluster_link_prefix(cluster)
    etc = etc_netns if etc_netns is not None else ns.ETC_NETNS_DIR
    try:
        dirs = sorted(p.name for p in etc.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        dirs = []
    return Leftovers(
        netns=tuple(n for n in ns.list_netns() if n.startswith(prefix)),
        links=tuple(link for link in ns.list_links() if link.startswith(link_prefix)),
        etc_dirs=tuple(dirs),
    )


def list_clusters() -> list[str]:
    """Clusters with at least one namespace on this host (for `down`/`status` without a name)."""
    found = set()
    for name in ns.list_netns():
        parts = name.split("-", 2)
        if len(parts) == 3 and parts[0] == "zt" and _CLUSTER_RE.match(parts[1]):
            found.add(parts[1])
    return sorted(found)


def destroy_network(cluster: str) -> Leftovers:
    """Remove everything named for `cluster`; idempotent; returns what it removed.

    Pods first, then nodes, then the bridge: processes still running in a pod (a crashed runner's
    children) are killed so the namespace really goes away. Deleting a namespace deletes its
    links, addresses, routes and nftables tables with it.
    """
    found = find_leftovers(cluster)
    prefix = cluster_netns_prefix(cluster)
    order = sorted(found.netns, key=lambda n: (0 if n.startswith(prefix + "pod-")
                                               else 1 if n.startswith(prefix + "node-") else 2, n))
    errors: list[str] = []
    for name in order:
        try:
            ns.delete_netns(name)
        except ns.NetworkSetupError as exc:
            errors.append(str(exc))
    ns.ip_batch(None, [f"link delete {link}" for link in found.links], force=True)
    for d in found.etc_dirs:
        shutil.rmtree(ns.ETC_NETNS_DIR / d, ignore_errors=True)
    left = find_leftovers(cluster)
    if not left.empty:
        errors.append(f"still present: {', '.join((*left.netns, *left.links, *left.etc_dirs))}")
    if errors:
        raise ns.NetworkSetupError(f"teardown of cluster {cluster} incomplete: {'; '.join(errors)}")
    return found


# --- hosts files (DESIGN.md §4: service names resolve through /etc/netns/<pod>/hosts) -----------

def render_hosts_file(names: Mapping[str, str]) -> str:
    """An /etc/hosts text: localhost lines, then one line per IP with all its names, sorted."""
    by_ip: dict[str, list[str]] = {}
    for name, ip in names.items():
        by_ip.setdefault(str(ipaddress.ip_address(ip)), []).append(name)
    lines = ["# written by zerotunnel", "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    for ip in sorted(by_ip, key=lambda a: ipaddress.ip_address(a).packed):
        lines.append(f"{ip}\t{' '.join(sorted(by_ip[ip], key=lambda n: (-n.count('.'), n)))}")
    return "\n".join(lines) + "\n"


def write_hosts_file(
    netns_name: str, names: Mapping[str, str], *, etc_netns: Path | None = None, resolv_conf: bool = True
) -> Path:
    """Write /etc/netns/<netns>/hosts, which `ip netns exec` bind-mounts over /etc/hosts.

    With `resolv_conf`, also a resolv.conf pointing at 127.0.0.1, where nothing answers: a name
    that is not in the hosts file then fails at once inside the pod, instead of waiting seconds
    for the host's resolver, which a pod has no route to. Files are written to a temporary name
    and renamed, so a process starting meanwhile never reads half a file.
    """
    root = etc_netns if etc_netns is not None else ns.ETC_NETNS_DIR
    directory = root / netns_name
    directory.mkdir(parents=True, exist_ok=True)
    files = {"hosts": render_hosts_file(names)}
    if resolv_conf:
        files["resolv.conf"] = RESOLV_CONF
    for name, text in files.items():
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(directory / name)
    return directory / "hosts"


# --- service VIP DNAT for pods outside the mesh ---------------------------------------------------

@dataclass(frozen=True, slots=True)
class ServiceDnat:
    """One Service port: VIP:port spread over endpoints (pod IP, targetPort), TCP."""

    vip: str
    port: int
    endpoints: tuple[tuple[str, int], ...]


def service_dnat_ruleset(services: Sequence[ServiceDnat], *, table: str = SERVICE_TABLE) -> str:
    """nft text that (re)places the VIP DNAT table atomically.

    What kube-proxy does for a pod without a mesh proxy: DNAT in OUTPUT (the pod's own connections)
    and PREROUTING (when installed in a node netns for traffic routed through it), a random
    endpoint per connection, and a TCP reset for a VIP port with no endpoint so clients fail fast
    instead of timing out. Mesh pods must not get this table: their node proxy resolves VIPs
    (spec §2.4) and the capture table's REDIRECT would race with it.
    """
    rules: list[str] = []
    rejects: list[str] = []
    for s in sorted(services, key=lambda s: (ipaddress.ip_address(s.vip).packed, s.port)):
        if ipaddress.ip_address(s.vip).version != 4:
            raise InputError(f"service VIP {s.vip}: only IPv4 is supported")
        match = f"ip daddr {s.vip} tcp dport {s.port}"
        eps = sorted(set(s.endpoints))
        if not eps:
            rejects.append(f"\t\t{match} reject with tcp reset")
        elif len(eps) == 1:
            rules.append(f"\t\t{match} dnat ip to {eps[0][0]}:{eps[0][1]}")
        else:
            elems = ", ".join(f"{i} : {ip} . {port}" for i, (ip, port) in enumerate(eps))
            rules.append(f"\t\t{match} dnat ip addr . port to numgen random mod {len(eps)} map {{ {elems} }}")
    body = "\n".join(rules)
    reject_body = "\n".join(rejects)
    return (
        f"table ip {table}\ndelete table ip {table}\ntable ip {table} {{\n"
        f"\tchain output {{\n\t\ttype nat hook output priority -110; policy accept;\n{body}\n\t}}\n"
        f"\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n{body}\n\t}}\n"
        f"\tchain no_endpoints {{\n\t\ttype filter hook output priority filter; policy accept;\n"
        f"{reject_body}\n\t}}\n"
        f"\tchain no_endpoints_fwd {{\n\t\ttype filter hook forward priority filter; policy accept;\n"
        f"{reject_body}\n\t}}\n}}\n"
    )


def install_service_dnat(netns: str, services: Sequence[ServiceDnat]) -> None:
    """Install (or replace) the VIP DNAT table in `netns` (an out-of-mesh pod, or a node)."""
    run_nft(netns, service_dnat_ruleset(services))


def remove_service_dnat(netns: str) -> None:
    run_nft(netns, removal_ruleset(SERVICE_TABLE, "ip"))


def nft_tables(netns: str | None = None) -> list[str]:
    """`family name` of every nftables table in `netns` (None = root), for status and tests."""
    argv = ["nft", "list", "tables"]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    lines = proc.stdout.splitlines()
    return [line.removeprefix("table ").strip() for line in lines if line.startswith("table ")]
