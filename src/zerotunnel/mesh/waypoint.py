"""Which waypoint, if any, serves traffic to a pod or a service.

users-spiffe-conventions.md §5.2 and istio-ambient.md §6.1. Labels `istio.io/use-waypoint` (value
`<name>`, `<ns>/<name>`, or `none`/`#none` to opt out) and `istio.io/use-waypoint-namespace` bind a
Namespace, a Service or a Pod to a Gateway of class `istio-waypoint`; the Gateway's
`istio.io/waypoint-for` label (service by default, workload, all, none) says which traffic it takes.

Precedence follows what istiod computes and ztunnel's `build_request` uses (istio-ambient.md §2.4):
traffic addressed to a service goes to the service's waypoint (Service label, else Namespace label,
for a waypoint that takes `service` traffic) and never to a workload waypoint; traffic addressed to a
pod directly goes to the workload's waypoint (Pod label, else Namespace label, for a waypoint that
takes `workload` traffic). A more specific label always wins over the namespace's, including `none`,
which opts the object out. Clients outside the mesh never go through a waypoint (§2.4); that is the
caller's concern.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from zerotunnel.config.model import (
    USE_WAYPOINT_LABEL,
    USE_WAYPOINT_NAMESPACE_LABEL,
    Config,
    K8sGateway,
    Pod,
    Service,
)

OPT_OUT = ("none", "#none")
_ACCEPTS = {"service": ("service", "all"), "workload": ("workload", "all")}


@dataclass(frozen=True, slots=True)
class WaypointBinding:
    """The outcome for one destination. `gateway` is None when no waypoint serves it; `reference`
    is the (namespace, name) a label asked for (set even when that Gateway is missing or does not
    take this traffic, so `analyze` can say so); `bound_by` is `pod`, `service` or `namespace`;
    `traffic` is `service` or `workload`; `note` explains the outcome in a sentence."""

    gateway: K8sGateway | None
    reference: tuple[str, str] | None
    bound_by: str
    traffic: str
    note: str


def parse_reference(labels: Mapping[str, str], namespace: str) -> tuple[str, str] | str | None:
    """(ns, name) from an object's labels; "none" when it opts out; None when it has no label."""
    value = labels.get(USE_WAYPOINT_LABEL)
    if value is None:
        return None
    if value in OPT_OUT or not value:
        return "none"
    ns, sep, name = value.partition("/")
    if sep:
        return ns, name
    return labels.get(USE_WAYPOINT_NAMESPACE_LABEL, namespace), value


def find_gateway(config: Config, namespace: str, name: str) -> K8sGateway | None:
    return next(
        (
            g
            for g in config.k8s_gateways
            if g.is_waypoint and g.meta.namespace == namespace and g.meta.name == name
        ),
        None,
    )


def _resolve(
    config: Config, levels: list[tuple[str, Mapping[str, str], str]], traffic: str
) -> WaypointBinding | None:
    for bound_by, labels, namespace in levels:
        ref = parse_reference(labels, namespace)
        if ref is None:
            continue
        if ref == "none":
            return WaypointBinding(None, None, bound_by, traffic, f"the {bound_by} opts out of waypoints")
        assert isinstance(ref, tuple)
        gw = find_gateway(config, *ref)
        where = f"{ref[0]}/{ref[1]}"
        if gw is None:
            return WaypointBinding(
                None, ref, bound_by, traffic, f"the {bound_by} names waypoint {where}, which does not exist"
            )
        if gw.waypoint_for not in _ACCEPTS[traffic]:
            return WaypointBinding(
                None,
                ref,
                bound_by,
                traffic,
                f"waypoint {where} is for {gw.waypoint_for!r} traffic, not {traffic} traffic",
            )
        return WaypointBinding(
            gw, ref, bound_by, traffic, f"{traffic} traffic uses waypoint {where} ({bound_by} label)"
        )
    return None


def namespace_labels(config: Config, namespace: str) -> Mapping[str, str]:
    ns = config.namespace(namespace)
    return ns.meta.labels if ns is not None else {}


def for_service(config: Config, service: Service) -> WaypointBinding | None:
    """The waypoint of traffic addressed to `service` (Service label > Namespace label)."""
    ns = service.meta.namespace
    return _resolve(
        config,
        [("service", service.meta.labels, ns), ("namespace", namespace_labels(config, ns), ns)],
        "service",
    )


def for_pod(config: Config, pod: Pod) -> WaypointBinding | None:
    """The waypoint of traffic addressed to the pod itself (Pod label > Namespace label)."""
    ns = pod.meta.namespace
    return _resolve(
        config,
        [("pod", pod.meta.labels, ns), ("namespace", namespace_labels(config, ns), ns)],
        "workload",
    )


def services_of(config: Config, pod: Pod) -> list[Service]:
    """Services in the pod's namespace whose selector matches it."""
    return [
        s
        for s in config.services
        if s.meta.namespace == pod.meta.namespace
        and s.selector
        and all(pod.meta.labels.get(k) == v for k, v in s.selector.items())
    ]


def waypoint_for(config: Config, pod: Pod, service: Service | None = None) -> WaypointBinding | None:
    """The waypoint traffic to `pod` goes through: the service's when the client addressed `service`
    (§2.4 step 1), else the workload's (§2.4 step 4: only for traffic not addressed to a service)."""
    if service is not None:
        return for_service(config, service)
    return for_pod(config, pod)
