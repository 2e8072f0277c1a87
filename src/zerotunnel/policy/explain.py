"""`authz check` as a pure function: follow the real path of one request and decide at every hop.

issue 3: `auto` follows what the mesh would do — through the destination's waypoint when it has one
(mesh/waypoint.py), then the destination's node proxy, which then sees the waypoint's identity as the
source (istio-ambient.md §6.1, §10.8). Each hop is decided by the same engine the proxies use
(engine.py), so the explanation is the decision. The shell passes in the clock and any JWKS text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from zerotunnel.config.model import Config, K8sGateway, Pod, Service
from zerotunnel.errors import InputError
from zerotunnel.mesh.waypoint import WaypointBinding, for_pod, services_of, waypoint_for
from zerotunnel.policy.decision import Decision
from zerotunnel.policy.engine import Engine
from zerotunnel.policy.l4 import SPIFFE_PREFIX, L4Request, parse_identity
from zerotunnel.policy.l7 import L7Request

PLACEHOLDER_SRC_IP = "10.255.0.1"
PLACEHOLDER_DST_IP = "10.255.1.1"
PLACEHOLDER_WAYPOINT_IP = "10.255.2.1"


@dataclass(frozen=True, slots=True)
class CheckQuery:
    """The question. Exactly one of `from_pod` (`ns/name`), `from_principal`, `from_plaintext`."""

    to: str
    port: int | None = None
    to_ip: str | None = None
    from_pod: str | None = None
    from_principal: str | None = None
    from_plaintext: bool = False
    from_ip: str | None = None
    via: str = "auto"
    method: str = "GET"
    path: str = "/"
    host: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    jwt: str | None = None


@dataclass(frozen=True, slots=True)
class Hop:
    kind: str  # "waypoint" | "ztunnel"
    name: str
    source: str
    destination: str
    decision: Decision

    def to_json(self) -> dict[str, Any]:
        d = self.decision
        return {
            "hop": self.kind,
            "name": self.name,
            "source": self.source,
            "destination": self.destination,
            "decision": "ALLOW" if d.allowed else "DENY",
            "policy": d.policy,
            "rule": d.rule,
            "reason": d.reason,
            "status": d.status,
            "dry_run": list(d.dry_run_hits),
            "warnings": list(d.warnings),
        }


@dataclass(frozen=True, slots=True)
class Explanation:
    allowed: bool
    enforced_by: str | None
    policy: str | None
    reason: str
    status: int
    hops: tuple[Hop, ...]
    dry_run: tuple[str, ...]
    warnings: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "decision": "ALLOW" if self.allowed else "DENY",
            "enforced_by": self.enforced_by,
            "policy": self.policy,
            "reason": self.reason,
            "status": self.status,
            "hops": [h.to_json() for h in self.hops],
            "dry_run": list(self.dry_run),
            "warnings": list(self.warnings),
        }


def _split(ref: str, what: str) -> tuple[str, str]:
    ns, sep, name = ref.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise InputError(f"{what} must be NAMESPACE/POD, got {ref!r}")
    return ns, name


def _pod(config: Config, ref: str, what: str) -> Pod:
    ns, name = _split(ref, what)
    pod = config.pod(ns, name)
    if pod is None:
        known = ", ".join(sorted(f"{p.meta.namespace}/{p.meta.name}" for p in config.pods)) or "none"
        raise InputError(f"unknown pod {ns}/{name} for {what} (pods in the configuration: {known})")
    return pod


def _service_for_port(config: Config, pod: Pod, port: int, to_ip: str | None) -> tuple[Service, int] | None:
    """The Service the client addressed: one selecting `pod` whose targetPort resolves to `port`.
    With `--to-ip`, only a Service whose clusterIP it is; any other address means the client
    dialled the pod itself (istio-ambient.md §2.4 decides waypoints by this)."""
    named = {cp.name: cp.container_port for c in pod.containers for cp in c.ports if cp.name}
    for svc in services_of(config, pod):
        if to_ip is not None and svc.cluster_ip != to_ip:
            continue
        for sp in svc.ports:
            target = sp.target_port if isinstance(sp.target_port, int) else named.get(sp.target_port)
            if target == port:
                return svc, sp.port
    return None


def waypoint_identity(config: Config, gw: K8sGateway) -> str:
    """A waypoint runs as the service account named after its Gateway (istioctl waypoint apply)."""
    return f"spiffe://{config.mesh.trust_domain}/ns/{gw.meta.namespace}/sa/{gw.meta.name}"


def _source(config: Config, q: CheckQuery, warnings: list[str]) -> tuple[str | None, str, str]:
    """(identity, ip, label) of the client."""
    given = [q.from_pod is not None, q.from_principal is not None, q.from_plaintext]
    if sum(given) != 1:
        raise InputError(
            "give exactly one of --from NAMESPACE/POD, --from-principal TD/ns/NS/sa/SA, --from-plaintext"
        )
    if q.from_pod is not None:
        pod = _pod(config, q.from_pod, "--from")
        ip = q.from_ip or pod.pod_ip or PLACEHOLDER_SRC_IP
        label = f"{pod.meta.namespace}/{pod.meta.name}"
        if not config.pod_is_ambient(pod):
            warnings.append(
                f"source pod {label} is not in the ambient mesh: it connects in plaintext, with no identity"
            )
            return None, ip, label
        return config.identity_of(pod), ip, label
    if q.from_principal is not None:
        principal = q.from_principal.removeprefix(SPIFFE_PREFIX)
        if parse_identity(principal) == ("", ""):
            raise InputError(f"--from-principal must look like TD/ns/NS/sa/SA, got {q.from_principal!r}")
        return SPIFFE_PREFIX + principal, q.from_ip or PLACEHOLDER_SRC_IP, principal
    return None, q.from_ip or PLACEHOLDER_SRC_IP, "plaintext client"


def _forced_waypoint(
    config: Config, dst: Pod, svc: Service | None, binding: WaypointBinding | None, warnings: list[str]
) -> WaypointBinding:
    """`--via waypoint` with no label binding the destination: use the one waypoint of its namespace,
    saying that the real traffic would not take this path."""
    ns = dst.meta.namespace
    candidates = [g for g in config.k8s_gateways if g.is_waypoint and g.meta.namespace == ns]
    note = binding.note if binding else "no istio.io/use-waypoint label on its namespace, service or pod"
    if len(candidates) != 1:
        found = "none" if not candidates else ", ".join(g.meta.name for g in candidates)
        raise InputError(
            f"--via waypoint: no waypoint serves {ns}/{dst.meta.name} ({note}); waypoints in {ns}: {found}"
        )
    gw = candidates[0]
    warnings.append(
        f"--via waypoint: {note}; evaluating through waypoint {ns}/{gw.meta.name} although real "
        "traffic would "
        "not be sent there"
    )
    return WaypointBinding(
        gw, (ns, gw.meta.name), "flag", "service" if svc else "workload", "forced by --via"
    )


def explain(
    config: Config,
    q: CheckQuery,
    *,
    now: datetime,
    jwks_by_uri: Mapping[str, str] | None = None,
    engine: Engine | None = None,
) -> Explanation:
    if q.via not in ("auto", "ztunnel", "waypoint"):
        raise InputError(f"--via must be auto, ztunnel or waypoint, got {q.via!r}")
    engine = engine or Engine.from_config(config)
    warnings: list[str] = []
    dst = _pod(config, q.to, "--to")
    dst_label = f"{dst.meta.namespace}/{dst.meta.name}"
    identity, src_ip, src_label = _source(config, q, warnings)
    port = q.port or next((cp.container_port for c in dst.containers for cp in c.ports), 80)
    if not config.pod_is_ambient(dst):
        warnings.append(
            f"destination {dst_label} is not in the ambient mesh: no node proxy or waypoint enforces policy"
        )
        reason = "destination not in the ambient mesh"
        return Explanation(True, None, None, reason, 200, (), (), tuple(warnings))
    svc = _service_for_port(config, dst, port, q.to_ip)
    # §4.2/§10.7: the node proxy sees the pod IP and target port, never the Service VIP
    dst_ip = (q.to_ip if q.to_ip and not svc else None) or dst.pod_ip or PLACEHOLDER_DST_IP
    binding: WaypointBinding | None = None
    if q.via != "ztunnel":
        binding = waypoint_for(config, dst, svc[0] if svc else None)
        if q.via == "waypoint" and (binding is None or binding.gateway is None):
            binding = _forced_waypoint(config, dst, svc[0] if svc else None, binding, warnings)
        if binding is not None and binding.gateway is None:
            warnings.append(binding.note)
        own = for_pod(config, dst) if svc else None
        if own is not None and own.gateway is not None and (binding is None or binding.gateway is None):
            warnings.append(
                f"the pod's own waypoint {own.gateway.meta.namespace}/{own.gateway.meta.name} serves "
                "only traffic "
                f"addressed to the pod (--to-ip {dst.pod_ip or 'POD_IP'}), not traffic to service "
                f"{svc[0].meta.name if svc else ''}"
            )
        if binding is not None and binding.gateway is not None and identity is None and q.via == "auto":
            warnings.append(
                "a plaintext client has no node proxy to send it to the waypoint: only the "
                "destination node proxy "
                "enforces policy"
            )
            binding = None
    hops: list[Hop] = []
    l4_src_identity, l4_src_ip, l4_src_label = identity, src_ip, src_label
    if binding is not None and binding.gateway is not None:
        gw = binding.gateway
        gw_label = f"{gw.meta.namespace}/{gw.meta.name}"
        service = (svc[0].meta.namespace, svc[0].meta.name) if svc and binding.traffic == "service" else None
        l7_port = svc[1] if service and svc else port
        host = q.host or (svc[0].hostname if service and svc else dst_ip)
        headers = q.headers + ((("authorization", f"Bearer {q.jwt}"),) if q.jwt else ())
        request = L7Request(q.method, q.path, host, l7_port, headers, identity, src_ip, None, dst_ip)
        decision = engine.check_l7(
            gw.meta.namespace, gw.meta.name, request, now=now, service=service, jwks_by_uri=jwks_by_uri
        )
        hops.append(Hop("waypoint", gw_label, src_label, f"{host}:{l7_port}", decision))
        l4_src_identity = waypoint_identity(config, gw)
        l4_src_ip = gw.addresses[0] if gw.addresses else PLACEHOLDER_WAYPOINT_IP
        l4_src_label = f"waypoint {gw_label}"
    if not hops or hops[-1].decision.allowed:
        decision = engine.check_l4(
            dst.meta.namespace, dst.meta.labels, L4Request(l4_src_ip, dst_ip, port, l4_src_identity)
        )
        node = dst.meta.namespace if dst.node_name is None else dst.node_name
        hops.append(Hop("ztunnel", node, l4_src_label, f"{dst_label} {dst_ip}:{port}", decision))
    last = next((h for h in hops if not h.decision.allowed), hops[-1])
    d = last.decision
    dry = tuple(x for h in hops for x in h.decision.dry_run_hits)
    all_warnings = tuple(dict.fromkeys([*warnings, *(w for h in hops for w in h.decision.warnings)]))
    return Explanation(d.allowed, last.kind, d.policy, d.reason, d.status, tuple(hops), dry, all_warnings)
