from __future__ import annotations

from zerotunnel.config import load
from zerotunnel.mesh.build import Addresses, build_mesh
from zerotunnel.mesh.model import MeshState, WaypointRef


def test_seed_workloads_have_identities_addresses_and_nodes(seed_state: MeshState) -> None:
    state = seed_state
    a = state.workloads["namespace-a/app-a"]
    assert a.identity == "spiffe://cluster.local/ns/namespace-a/sa/service-account-a"
    assert a.principal == "cluster.local/ns/namespace-a/sa/service-account-a"
    assert (a.ip, a.node, a.in_mesh) == ("10.244.1.2", "node-1", True)
    assert a.named_ports == {"http": 8080}
    assert state.workload_at("10.244.2.3") == state.workloads["namespace-c/app-c"]
    assert [w.name for w in state.workloads_on("node-2")] == ["app-b", "app-c"]


def test_service_gets_vip_endpoints_and_hostname(seed_state: MeshState) -> None:
    state = seed_state
    svc = state.service_at("10.96.0.10")
    assert svc is not None
    assert svc.endpoints == ("namespace-a/app-a",)
    assert state.service_named("app-a.namespace-a.svc.cluster.local.") == svc
    assert svc.waypoint is None


def test_cluster_ip_in_yaml_wins_over_assigned_vip() -> None:
    config = load([("s.yaml", """
apiVersion: v1
kind: Service
metadata: {name: s, namespace: default}
spec: {clusterIP: 10.96.7.7, selector: {app: x}, ports: [{port: 80}]}
""")])
    state = build_mesh(config, Addresses(service_vips={"default/s": "10.96.0.99"}))
    assert state.service_at("10.96.7.7") is not None
    assert state.service_at("10.96.0.99") is None


def test_out_of_mesh_namespace_is_plain_tcp() -> None:
    config = load([("p.yaml", """
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: default}
spec: {containers: [{name: c, command: [sleep, "1"]}]}
""")])
    state = build_mesh(config, Addresses(pod_ips={"default/legacy": "10.244.1.9"}))
    w = state.workloads["default/legacy"]
    assert not w.in_mesh
    assert w.identity == "spiffe://cluster.local/ns/default/sa/default"


def test_waypoint_pod_is_known_and_bound(seed_with_waypoint_state: MeshState) -> None:
    state = seed_with_waypoint_state
    ref = WaypointRef("namespace-a", "waypoint")
    wp = state.waypoint_workload(ref)
    assert wp is not None and wp.identity == "spiffe://cluster.local/ns/namespace-a/sa/waypoint"
    assert wp.waypoint is None, "a waypoint never routes through itself"
    assert state.workloads["namespace-a/app-a"].waypoint == ref
    svc = state.service_at("10.96.0.10")
    assert svc is not None and svc.waypoint == ref
    assert svc.endpoints == ("namespace-a/app-a",), "the waypoint pod is not an endpoint of app-a"
