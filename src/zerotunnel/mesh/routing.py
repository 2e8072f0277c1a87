"""Where a captured connection goes: the outbound and inbound routing plans of a node proxy.

DESIGN.md §5 "decide, then act": these functions return frozen plans; the node proxy's shell executes
them. The order of the outbound decision is ztunnel's `build_request` (istio-ambient.md §2.4):
1. a Service VIP whose service has a waypoint → HBONE to the waypoint, authority = the original VIP:port;
2. otherwise pick an endpoint of the service (or the workload owning the IP); none → fail fast for a
   service, plain passthrough for an unknown destination;
3. a workload-addressed destination with a workload waypoint (and we are not that waypoint) → HBONE to
   the waypoint;
4. an in-mesh endpoint → HBONE to `podIP:15008` with authority `podIP:targetPort`; an endpoint outside
   the mesh → plain TCP to `podIP:targetPort`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from zerotunnel.errors import ZerotunnelError
from zerotunnel.mesh.model import HBONE_PORT, PROXY_PORTS, MeshState, WaypointRef, Workload


class RoutingError(ZerotunnelError):
    """No route for a captured connection; the reason goes to the access log."""


@dataclass(frozen=True, slots=True)
class HboneRoute:
    """Open an HBONE stream to `next_hop_ip:next_hop_port` with `:authority` = `authority` and accept
    only a server presenting one of `expected_identities` (§1.7)."""

    next_hop_ip: str
    next_hop_port: int
    authority: str
    expected_identities: tuple[str, ...]
    destination_workload: str | None
    service: str | None
    """hostname of the intended service, for the `forwarded` header's `host=` and telemetry."""
    via_waypoint: WaypointRef | None = None


@dataclass(frozen=True, slots=True)
class PassthroughRoute:
    """Plain TCP: to an out-of-mesh endpoint (`workload` set) or an unknown destination."""

    ip: str
    port: int
    destination_workload: str | None = None
    service: str | None = None


OutboundRoute = HboneRoute | PassthroughRoute


def format_authority(ip: str, port: int) -> str:
    """Rust `SocketAddr` formatting (§1.2): `10.0.0.2:8080`, `[fd00::2]:8080`."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _target_port(service_port: int, target: int | str, workload: Workload) -> int | None:
    if isinstance(target, int):
        return target
    if target.isdigit():
        return int(target)
    return workload.named_ports.get(target)


def _via_waypoint(
    state: MeshState, ref: WaypointRef, authority: str, service: str | None, source: Workload
) -> HboneRoute | None:
    waypoint = state.waypoint_workload(ref)
    if waypoint is None or waypoint.ip is None:
        raise RoutingError(f"waypoint {ref} has no running workload", status=503, response_flag="UH")
    if waypoint.uid == source.uid:
        return None  # the waypoint's own traffic goes to the destination itself
    return HboneRoute(
        next_hop_ip=waypoint.ip,
        next_hop_port=HBONE_PORT,
        authority=authority,
        expected_identities=(waypoint.identity,),
        destination_workload=None,
        service=service,
        via_waypoint=ref,
    )


def _to_workload(workload: Workload, port: int, service: str | None) -> OutboundRoute:
    """Expected identity = the endpoint's own (§1.7; Kubernetes Services carry no extra SANs)."""
    assert workload.ip is not None
    if not workload.in_mesh:
        return PassthroughRoute(workload.ip, port, workload.uid, service)
    return HboneRoute(
        next_hop_ip=workload.ip,
        next_hop_port=HBONE_PORT,
        authority=format_authority(workload.ip, port),
        expected_identities=(workload.identity,),
        destination_workload=workload.uid,
        service=service,
    )


def plan_outbound(state: MeshState, source: Workload, dst_ip: str, dst_port: int, pick: int) -> OutboundRoute:
    """The route for a connection `source` made to `dst_ip:dst_port`.

    `pick` spreads connections over a service's endpoints (the shell passes a counter), so the function
    stays pure. Raises RoutingError for a recursive call or a service with no usable endpoint.
    """
    if dst_port in PROXY_PORTS and (dst_ip == source.ip or dst_ip.startswith("127.")):
        raise RoutingError("attempted recursive call to ourselves", status=503, response_flag="UH")
    original = format_authority(dst_ip, dst_port)
    service = state.service_at(dst_ip)
    if service is not None:
        if service.waypoint is not None:
            route = _via_waypoint(state, service.waypoint, original, service.hostname, source)
            if route is not None:
                return route
        svc_port = service.port(dst_port)
        if svc_port is None:
            raise RoutingError(
                f"service {service.hostname} has no port {dst_port}", status=503, response_flag="NR"
            )
        candidates = [
            (w, tp)
            for w in (state.workloads.get(uid) for uid in service.endpoints)
            if w is not None and w.ip is not None
            and (tp := _target_port(svc_port.port, svc_port.target_port, w)) is not None
        ]
        if not candidates:
            raise RoutingError(
                f"no healthy upstream for {service.hostname}:{dst_port}", status=503, response_flag="UH"
            )
        endpoint, target = candidates[pick % len(candidates)]
        return _to_workload(endpoint, target, service.hostname)
    workload = state.workload_at(dst_ip)
    if workload is None:
        return PassthroughRoute(dst_ip, dst_port)
    if workload.waypoint is not None:
        route = _via_waypoint(state, workload.waypoint, original, None, source)
        if route is not None:
            return route
    return _to_workload(workload, dst_port, None)


@dataclass(frozen=True, slots=True)
class InboundTarget:
    """The local workload an HBONE stream or a plaintext connection is for, and the app port."""

    workload: Workload
    port: int
    service: str | None = None


def resolve_inbound(state: MeshState, landed_ip: str, host: str, port: int) -> InboundTarget:
    """Resolve an HBONE authority on a connection that landed on `landed_ip` (§1.4 steps 4-6).

    `host` is an IP (the normal case, already checked equal to `landed_ip` by the HBONE server) or a
    service hostname (whose service port maps to the workload's target port).
    """
    workload = state.workload_at(landed_ip)
    if workload is None:
        raise RoutingError(f"unknown destination workload at {landed_ip}", status=503, response_flag="NR")
    service_name: str | None = None
    target = port
    if not _is_ip(host):
        service = state.service_named(host)
        svc_port = service.port(port) if service is not None else None
        if service is None or svc_port is None:
            raise RoutingError(f"unknown service {host}:{port}", status=503, response_flag="NR")
        resolved = _target_port(svc_port.port, svc_port.target_port, workload)
        if resolved is None:
            raise RoutingError(f"no target port for {host}:{port}", status=503, response_flag="NR")
        target, service_name = resolved, service.hostname
    if target in PROXY_PORTS:
        raise RoutingError("attempted recursive call to ourselves", status=503, response_flag="UH")
    return InboundTarget(workload, target, service_name)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
