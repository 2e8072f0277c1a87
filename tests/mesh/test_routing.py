from __future__ import annotations

import pytest

from zerotunnel.config import Config, load
from zerotunnel.mesh.build import Addresses, build_mesh
from zerotunnel.mesh.model import MeshState, WaypointRef
from zerotunnel.mesh.routing import (
    HboneRoute,
    PassthroughRoute,
    RoutingError,
    format_authority,
    plan_outbound,
    resolve_inbound,
)

A_ID = "spiffe://cluster.local/ns/namespace-a/sa/service-account-a"


def test_service_vip_goes_over_hbone_to_endpoint_target_port(seed_state: MeshState) -> None:
    state = seed_state
    b = state.workloads["namespace-b/app-b"]
    route = plan_outbound(state, b, "10.96.0.10", 80, pick=0)
    assert route == HboneRoute(
        next_hop_ip="10.244.1.2", next_hop_port=15008, authority="10.244.1.2:8080",
        expected_identities=(A_ID,), destination_workload="namespace-a/app-a",
        service="app-a.namespace-a.svc.cluster.local",
    )


def test_pod_ip_goes_direct_with_same_port(seed_state: MeshState) -> None:
    state = seed_state
    route = plan_outbound(state, state.workloads["namespace-b/app-b"], "10.244.1.2", 8080, pick=0)
    assert isinstance(route, HboneRoute)
    assert (route.authority, route.service) == ("10.244.1.2:8080", None)


def test_unknown_destination_is_passthrough(seed_state: MeshState) -> None:
    state = seed_state
    route = plan_outbound(state, state.workloads["namespace-b/app-b"], "192.0.2.1", 443, pick=3)
    assert route == PassthroughRoute("192.0.2.1", 443)


def test_unknown_service_port_and_empty_service_fail_fast(seed_config: Config, seed_state: MeshState) -> None:
    state = seed_state
    b = state.workloads["namespace-b/app-b"]
    with pytest.raises(RoutingError, match="has no port 81"):
        plan_outbound(state, b, "10.96.0.10", 81, pick=0)
    empty = build_mesh(seed_config, Addresses(service_vips={"namespace-a/app-a": "10.96.0.10"}))
    with pytest.raises(RoutingError, match="no healthy upstream"):
        plan_outbound(empty, b, "10.96.0.10", 80, pick=0)


def test_recursive_call_refused(seed_state: MeshState) -> None:
    state = seed_state
    b = state.workloads["namespace-b/app-b"]
    for ip in ("127.0.0.1", "10.244.2.2"):
        with pytest.raises(RoutingError, match="recursive call"):
            plan_outbound(state, b, ip, 15008, pick=0)


def test_endpoints_are_spread_by_pick() -> None:
    pods = "".join(f"""
---
apiVersion: v1
kind: Pod
metadata: {{name: web-{i}, namespace: default, labels: {{app: web}}}}
spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: 9000}}]}}]}}
""" for i in range(3))
    config = load([("x.yaml", """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: http}]}
""" + pods)])
    state = build_mesh(config, Addresses(
        pod_ips={f"default/web-{i}": f"10.244.1.{10 + i}" for i in range(3)},
        service_vips={"default/web": "10.96.0.5"},
    ))
    src = state.workloads["default/web-0"]
    hops = {plan_outbound(state, src, "10.96.0.5", 80, pick=i).authority for i in range(6)}  # type: ignore[union-attr]
    assert hops == {"10.244.1.10:9000", "10.244.1.11:9000", "10.244.1.12:9000"}, "named targetPort resolved"


def test_out_of_mesh_endpoint_is_plain_tcp_to_target_port() -> None:
    config = load([("x.yaml", """
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: default, labels: {app: legacy}}
spec: {containers: [{name: c}]}
---
apiVersion: v1
kind: Service
metadata: {name: legacy, namespace: default}
spec: {selector: {app: legacy}, ports: [{port: 80, targetPort: 8080}]}
""")])
    state = build_mesh(config, Addresses(pod_ips={"default/legacy": "10.244.1.5"},
                                         service_vips={"default/legacy": "10.96.0.6"}))
    route = plan_outbound(state, state.workloads["default/legacy"], "10.96.0.6", 80, pick=0)
    assert route == PassthroughRoute("10.244.1.5", 8080, "default/legacy", "legacy.default.svc.cluster.local")


def test_service_with_waypoint_goes_to_waypoint(seed_with_waypoint_state: MeshState) -> None:
    state = seed_with_waypoint_state
    b = state.workloads["namespace-b/app-b"]
    route = plan_outbound(state, b, "10.96.0.10", 80, pick=0)
    assert isinstance(route, HboneRoute)
    assert (route.next_hop_ip, route.authority, route.via_waypoint) == (
        "10.244.1.3", "10.96.0.10:80", WaypointRef("namespace-a", "waypoint"))
    assert route.expected_identities == ("spiffe://cluster.local/ns/namespace-a/sa/waypoint",)
    # workload-addressed traffic uses the workload waypoint (waypoint-for: all)
    direct = plan_outbound(state, b, "10.244.1.2", 8080, pick=0)
    assert isinstance(direct, HboneRoute) and direct.next_hop_ip == "10.244.1.3"
    assert direct.authority == "10.244.1.2:8080"
    # ... but the waypoint itself goes straight to the endpoint
    wp = state.workloads["namespace-a/waypoint-0"]
    onward = plan_outbound(state, wp, "10.96.0.10", 80, pick=0)
    assert isinstance(onward, HboneRoute) and onward.authority == "10.244.1.2:8080"
    assert onward.expected_identities == (A_ID,)


def test_inbound_resolution(seed_state: MeshState) -> None:
    state = seed_state
    target = resolve_inbound(state, "10.244.1.2", "10.244.1.2", 8080)
    assert (target.workload.name, target.port) == ("app-a", 8080)
    by_name = resolve_inbound(state, "10.244.1.2", "app-a.namespace-a.svc.cluster.local", 80)
    assert (by_name.port, by_name.service) == (8080, "app-a.namespace-a.svc.cluster.local")
    with pytest.raises(RoutingError, match="recursive") as err:
        resolve_inbound(state, "10.244.1.2", "10.244.1.2", 15006)
    assert err.value.status == 503
    with pytest.raises(RoutingError, match="unknown destination"):
        resolve_inbound(state, "10.244.9.9", "10.244.9.9", 80)


def test_format_authority() -> None:
    assert format_authority("10.0.0.2", 8080) == "10.0.0.2:8080"
    assert format_authority("fd00::2", 8080) == "[fd00::2]:8080"
