"""The computed mesh: workloads and services with addresses, as a node proxy sees them.

DESIGN.md §2/§5: the configuration says what users declared; this says what exists on the network
(who owns which IP, which identity it holds, which service VIP leads to which endpoints, who is in the
mesh). It is what ztunnel receives over xDS as `Workload` and `Service` resources (istio-ambient.md
§2.4, §4.1), built once per configuration and shared, immutable, by every connection admitted under it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from zerotunnel.config.model import FrozenMap

HBONE_PORT = 15008
OUTBOUND_CAPTURE_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
PROXY_PORTS = frozenset({OUTBOUND_CAPTURE_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT})
"""istio-ambient.md §2.1: ports never forwarded to (a connection to one is a recursive call)."""


@dataclass(frozen=True, slots=True)
class WaypointRef:
    """A Gateway API Gateway of class `istio-waypoint`, by namespace and name."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Workload:
    """One addressable workload: a pod, or a WorkloadEntry (a host outside any pod).

    `uid` is `<namespace>/<name>` for pods and `<namespace>/workloadentry/<name>` for entries, unique
    across the mesh. `in_mesh` is ztunnel's protocol HBONE (captured, reached over mTLS) versus TCP
    (reached in plaintext). `waypoint` is the waypoint serving workload-addressed traffic to it.
    """

    uid: str
    name: str
    namespace: str
    service_account: str
    identity: str
    ip: str | None
    node: str | None
    labels: Mapping[str, str] = field(default_factory=FrozenMap)
    in_mesh: bool = False
    kind: str = "pod"
    waypoint: WaypointRef | None = None
    named_ports: Mapping[str, int] = field(default_factory=FrozenMap)
    is_waypoint_of: WaypointRef | None = None

    @property
    def principal(self) -> str:
        """The identity without `spiffe://`, as AuthorizationPolicy principals spell it (§3.1)."""
        return self.identity.removeprefix("spiffe://")


@dataclass(frozen=True, slots=True)
class MeshServicePort:
    port: int
    target_port: int | str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class MeshService:
    """A Service with its VIP and the uids of the workloads its selector picks (in uid order)."""

    namespace: str
    name: str
    hostname: str
    vip: str | None
    ports: tuple[MeshServicePort, ...]
    endpoints: tuple[str, ...]
    waypoint: WaypointRef | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def port(self, number: int) -> MeshServicePort | None:
        return next((p for p in self.ports if p.port == number), None)


@dataclass(frozen=True, slots=True)
class MeshState:
    """Every workload and service of the mesh, indexed the ways the data path looks them up."""

    trust_domain: str
    trust_domain_aliases: tuple[str, ...]
    workloads: Mapping[str, Workload]
    services: Mapping[str, MeshService]
    workload_by_ip: Mapping[str, str]
    service_by_vip: Mapping[str, str]
    service_by_hostname: Mapping[str, str]
    waypoints: Mapping[WaypointRef, str]
    """waypoint Gateway → uid of the workload running it (absent until it runs)."""

    def workload_at(self, ip: str) -> Workload | None:
        uid = self.workload_by_ip.get(ip)
        return self.workloads[uid] if uid is not None else None

    def service_at(self, vip: str) -> MeshService | None:
        key = self.service_by_vip.get(vip)
        return self.services[key] if key is not None else None

    def service_named(self, hostname: str) -> MeshService | None:
        key = self.service_by_hostname.get(hostname.lower().rstrip("."))
        return self.services[key] if key is not None else None

    def waypoint_workload(self, ref: WaypointRef) -> Workload | None:
        uid = self.waypoints.get(ref)
        return self.workloads[uid] if uid is not None else None

    def workloads_on(self, node: str) -> tuple[Workload, ...]:
        return tuple(w for w in self.workloads.values() if w.node == node)
