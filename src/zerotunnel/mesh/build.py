"""Configuration + assigned addresses → the mesh state (the `Workload`/`Service` view of §2.4).

Addresses come from outside: a pod's `status.podIP` when the YAML carries one, otherwise what the local
cluster assigned (`Addresses`); a Service's `clusterIP` likewise. Keeping the assignment out of here is what
lets the control plane, the node proxy and `authz check` build the very same state from the same inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from zerotunnel.config.model import Config, FrozenMap, Pod, Service, WorkloadEntry
from zerotunnel.mesh.model import MeshService, MeshServicePort, MeshState, WaypointRef, Workload
from zerotunnel.mesh.waypoint import WaypointBinding, for_pod, for_service

GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
"""Label the waypoint's own pod carries (as Istio's waypoint Deployment does): which Gateway it runs."""


@dataclass(frozen=True, slots=True)
class Addresses:
    """Addresses assigned outside the YAML: `pod_ips` by `ns/name`, `service_vips` by `ns/name`."""

    pod_ips: Mapping[str, str] = field(default_factory=FrozenMap)
    service_vips: Mapping[str, str] = field(default_factory=FrozenMap)


def pod_uid(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def _ref(binding: WaypointBinding | None) -> WaypointRef | None:
    if binding is None or binding.gateway is None:
        return None
    return WaypointRef(binding.gateway.meta.namespace, binding.gateway.meta.name)


def _pod_workload(config: Config, pod: Pod, addresses: Addresses) -> Workload:
    uid = pod_uid(pod.meta.namespace, pod.meta.name)
    named_ports = {
        p.name: p.container_port for c in pod.containers for p in c.ports if p.name is not None
    }
    runs = pod.meta.labels.get(GATEWAY_NAME_LABEL)
    runs_waypoint = None
    if runs is not None and any(
        g.is_waypoint and g.meta.name == runs and g.meta.namespace == pod.meta.namespace
        for g in config.k8s_gateways
    ):
        runs_waypoint = WaypointRef(pod.meta.namespace, runs)
    return Workload(
        uid=uid,
        name=pod.meta.name,
        namespace=pod.meta.namespace,
        service_account=pod.service_account,
        identity=config.identity_of(pod),
        ip=pod.pod_ip or addresses.pod_ips.get(uid),
        node=pod.node_name,
        labels=pod.meta.labels,
        in_mesh=config.pod_is_ambient(pod),
        kind="pod",
        waypoint=None if runs_waypoint else _ref(for_pod(config, pod)),
        named_ports=FrozenMap(named_ports),
        is_waypoint_of=runs_waypoint,
    )


def _entry_workload(config: Config, entry: WorkloadEntry) -> Workload:
    """A WorkloadEntry is in the mesh when its namespace is (the host runs a node proxy of ours)."""
    return Workload(
        uid=f"{entry.meta.namespace}/workloadentry/{entry.meta.name}",
        name=entry.meta.name,
        namespace=entry.meta.namespace,
        service_account=entry.service_account,
        identity=entry.identity(config.mesh.trust_domain),
        ip=entry.address,
        node=None,
        labels=entry.labels,
        in_mesh=config.is_ambient(entry.meta.namespace),
        kind="workloadentry",
        waypoint=None,  # workload waypoints for hosts outside pods: not resolved yet
        named_ports=entry.ports,
    )


def _mesh_service(
    config: Config, service: Service, workloads: Mapping[str, Workload], addresses: Addresses
) -> MeshService:
    key = f"{service.meta.namespace}/{service.meta.name}"
    selector = service.selector
    endpoints: tuple[str, ...] = ()
    if selector:
        endpoints = tuple(
            sorted(
                w.uid
                for w in workloads.values()
                if w.namespace == service.meta.namespace
                and w.is_waypoint_of is None
                and all(w.labels.get(k) == v for k, v in selector.items())
            )
        )
    vip = service.cluster_ip if service.cluster_ip not in (None, "", "None") else None
    return MeshService(
        namespace=service.meta.namespace,
        name=service.meta.name,
        hostname=service.hostname,
        vip=vip or addresses.service_vips.get(key),
        ports=tuple(MeshServicePort(p.port, p.target_port, p.name) for p in service.ports),
        endpoints=endpoints,
        waypoint=_ref(for_service(config, service)),
    )


def build_mesh(config: Config, addresses: Addresses | None = None) -> MeshState:
    """The whole mesh as every node proxy sees it (ztunnel receives all workloads and services)."""
    addresses = addresses or Addresses()
    workloads: dict[str, Workload] = {}
    for pod in config.pods:
        w = _pod_workload(config, pod, addresses)
        workloads[w.uid] = w
    for entry in config.workload_entries:
        w = _entry_workload(config, entry)
        workloads[w.uid] = w
    services = {
        s.key: s
        for s in (_mesh_service(config, svc, workloads, addresses) for svc in config.services)
    }
    return MeshState(
        trust_domain=config.mesh.trust_domain,
        trust_domain_aliases=config.mesh.trust_domain_aliases,
        workloads=FrozenMap(workloads),
        services=FrozenMap(services),
        workload_by_ip=FrozenMap({w.ip: w.uid for w in workloads.values() if w.ip}),
        service_by_vip=FrozenMap({s.vip: s.key for s in services.values() if s.vip}),
        service_by_hostname=FrozenMap({s.hostname: s.key for s in services.values()}),
        waypoints=FrozenMap(
            {w.is_waypoint_of: w.uid for w in workloads.values() if w.is_waypoint_of is not None}
        ),
    )
