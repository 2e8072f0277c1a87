"""Network planning for the local cluster: names, addresses, routes, VIPs, hosts entries (no I/O)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zerotunnel.cluster.topology import (
    IFNAMSIZ,
    PodSpec,
    ServiceSpec,
    cluster_link_prefix,
    plan_network,
    pod_hosts,
    pod_netns_name,
    service_hostnames,
)
from zerotunnel.errors import InputError

PODS = [PodSpec("a", "ns1", "n1"), PodSpec("b", "ns1", "n1"), PodSpec("c", "ns2", "n2")]


def test_two_nodes_three_pods() -> None:
    plan = plan_network("demo", ["n1", "n2"], PODS, host_access=True)
    n1, n2 = plan.node("n1"), plan.node("n2")
    assert (n1.index, n2.index) == (0, 1)
    assert str(n1.pod_cidr) == "10.244.0.0/24" and str(n2.pod_cidr) == "10.244.1.0/24"
    assert (str(n1.gateway), str(n2.gateway)) == ("10.244.0.1", "10.244.1.1")
    assert (str(n1.ip), str(n2.ip), str(plan.host_ip)) == ("10.243.0.2", "10.243.0.3", "10.243.0.1")
    a, b, c = plan.pod("ns1", "a"), plan.pod("ns1", "b"), plan.pod("ns2", "c")
    assert [str(p.ip) for p in (a, b, c)] == ["10.244.0.2", "10.244.0.3", "10.244.1.2"]
    assert a.gateway == n1.gateway and c.gateway == n2.gateway
    assert a.netns == "zt-demo-pod-ns1.a" and n1.netns == "zt-demo-node-n1"
    assert plan.bridge_netns == "zt-demo-net"
    routes = {(r.netns, str(r.destination), str(r.via)) for r in plan.node_routes()}
    assert routes == {(n1.netns, "10.244.1.0/24", "10.243.0.3"), (n2.netns, "10.244.0.0/24", "10.243.0.2")}
    assert {str(r.destination) for r in plan.host_routes()} == {"10.244.0.0/24", "10.244.1.0/24"}
    assert plan.pods_on("n1") == (a, b)


def test_link_names_fit_and_carry_the_cluster_prefix() -> None:
    plan = plan_network("demo", [], PODS, host_access=True)
    prefix = cluster_link_prefix("demo")
    assert len(prefix) == 6 and prefix.startswith("zt")
    names = [plan.bridge, plan.host_veth, plan.host_peer, *(n.bridge_port for n in plan.nodes),
             *(p.node_veth for p in plan.pods)]
    assert len(set(names)) == len(names)
    assert all(len(n) <= IFNAMSIZ and n.startswith(prefix) for n in names)
    assert cluster_link_prefix("other") != prefix


def test_plan_is_independent_of_input_order() -> None:
    svcs = [ServiceSpec("y", "ns"), ServiceSpec("x", "ns")]
    one = plan_network("demo", ["n2", "n1"], list(reversed(PODS)), svcs)
    two = plan_network("demo", ["n1"], PODS, [ServiceSpec("x", "ns"), ServiceSpec("y", "ns")])
    assert one == two


def test_nodes_named_only_by_pods_are_added() -> None:
    plan = plan_network("demo", [], [PodSpec("a", "ns", "worker")])
    assert [n.name for n in plan.nodes] == ["worker"]


def test_previous_plan_keeps_addresses_when_pods_come_and_go() -> None:
    first = plan_network("demo", [], PODS, [ServiceSpec("web", "ns1")])
    # b leaves, d arrives on n1 and a new node n0 (sorts first) appears
    second = plan_network(
        "demo", [], [PODS[0], PODS[2], PodSpec("d", "ns1", "n1"), PodSpec("e", "ns1", "n0")],
        [ServiceSpec("web", "ns1"), ServiceSpec("api", "ns1")], previous=first,
    )
    assert second.pod("ns1", "a").ip == first.pod("ns1", "a").ip
    assert second.pod("ns2", "c").ip == first.pod("ns2", "c").ip
    assert second.node("n1") == first.node("n1") and second.node("n2") == first.node("n2")
    assert second.node("n0").index == 2
    assert str(second.pod("ns1", "d").ip) == "10.244.0.3"  # b's freed slot, lowest free
    assert second.service("ns1", "web").vip == first.service("ns1", "web").vip


def test_requested_pod_ip_is_honoured_and_checked() -> None:
    plan = plan_network("demo", [], [PodSpec("a", "ns", "n1", ip="10.244.0.50"), PodSpec("b", "ns", "n1")])
    assert str(plan.pod("ns", "a").ip) == "10.244.0.50"
    assert str(plan.pod("ns", "b").ip) == "10.244.0.2"
    with pytest.raises(InputError, match="outside node n1"):
        plan_network("demo", [], [PodSpec("a", "ns", "n1", ip="10.244.7.5")])
    with pytest.raises(InputError, match="same podIP"):
        plan_network("demo", [], [PodSpec("a", "ns", "n1", ip="10.244.0.9"),
                                   PodSpec("b", "ns", "n1", ip="10.244.0.9")])
    with pytest.raises(InputError, match="podIP 'x'"):
        plan_network("demo", [], [PodSpec("a", "ns", "n1", ip="x")])


def test_service_vips() -> None:
    plan = plan_network("demo", [], [], [ServiceSpec("web", "ns"),
                                         ServiceSpec("db", "ns", cluster_ip="10.96.0.10"),
                                         ServiceSpec("headless", "ns", cluster_ip="None")])
    assert str(plan.service("ns", "db").vip) == "10.96.0.10"
    web = plan.service("ns", "web").vip
    assert web in ipaddress.IPv4Network("10.96.0.0/16") and web != ipaddress.IPv4Address("10.96.0.1")
    assert plan_network("demo", [], [], [ServiceSpec("web", "ns")]).service("ns", "web").vip == web
    with pytest.raises(InputError, match="already used"):
        plan_network("demo", [], [], [ServiceSpec("a", "ns", "10.96.0.10"),
                                      ServiceSpec("b", "ns", "10.96.0.10")])
    with pytest.raises(InputError, match="not usable"):
        plan_network("demo", [], [], [ServiceSpec("a", "ns", "10.97.0.10")])
    with pytest.raises(InputError, match="not usable"):
        plan_network("demo", [], [], [ServiceSpec("a", "ns", "10.96.0.1")])


def test_small_service_cidr_fills_up() -> None:
    five = [ServiceSpec(f"s{i}", "ns") for i in range(5)]
    plan = plan_network("demo", [], [], five, service_cidr="10.96.0.0/29")
    assert len({s.vip for s in plan.services}) == 5
    with pytest.raises(InputError, match="full"):
        plan_network("demo", [], [], [*five, ServiceSpec("s5", "ns")], service_cidr="10.96.0.0/29")


@pytest.mark.parametrize("cluster", ["", "a-b", "UP", "x" * 13, "a.b"])
def test_bad_cluster_names(cluster: str) -> None:
    with pytest.raises(InputError, match="cluster name"):
        plan_network(cluster, [], [])


@pytest.mark.parametrize(("pod", "match"), [
    (PodSpec("A", "ns", "n"), "pod name"),
    (PodSpec("a", "n.s", "n"), "namespace name"),
    (PodSpec("a", "ns", "-n"), "node name"),
    (PodSpec("a/b", "ns", "n"), "pod name"),
])
def test_bad_kubernetes_names(pod: PodSpec, match: str) -> None:
    with pytest.raises(InputError, match=match):
        plan_network("demo", [], [pod])


def test_duplicate_pod_and_overlapping_ranges() -> None:
    with pytest.raises(InputError, match="twice"):
        plan_network("demo", [], [PodSpec("a", "ns", "n1"), PodSpec("a", "ns", "n2")])
    with pytest.raises(InputError, match="overlap"):
        plan_network("demo", [], [], pod_cidr="10.96.0.0/12")
    with pytest.raises(InputError, match="smaller than"):
        plan_network("demo", [], [], pod_cidr="10.244.0.0/25")
    with pytest.raises(InputError, match="pod CIDR"):
        plan_network("demo", [], [], pod_cidr="nope")


def test_too_many_pods_on_a_node() -> None:
    pods = [PodSpec(f"p{i}", "ns", "n1") for i in range(254)]
    with pytest.raises(InputError, match="too many pods on node n1"):
        plan_network("demo", [], pods)


def test_netns_names_are_unambiguous_and_bounded() -> None:
    # namespace names have no dots, so `<ns>.<pod>` cannot collide the way `<ns>-<pod>` would
    assert pod_netns_name("c", "a", "b-c") != pod_netns_name("c", "a-b", "c")
    long = pod_netns_name("c", "n" * 63, "p" * 253)
    assert len(long) <= 100 and long.startswith("zt-c-pod-")
    assert long != pod_netns_name("c", "n" * 63, "p" * 252 + "q")


def test_hosts_entries() -> None:
    plan = plan_network("demo", [], PODS, [ServiceSpec("web", "ns1"), ServiceSpec("db", "ns2")])
    web, db = plan.service("ns1", "web"), plan.service("ns2", "db")
    assert service_hostnames(web, "ns1") == ("web.ns1.svc.cluster.local", "web.ns1", "web")
    assert service_hostnames(web, "ns2", "corp.example") == ("web.ns1.svc.corp.example", "web.ns1")
    hosts = pod_hosts(plan.pod("ns1", "a"), plan.services)
    assert hosts["a"] == "10.244.0.2"
    assert hosts["web"] == hosts["web.ns1"] == hosts["web.ns1.svc.cluster.local"] == str(web.vip)
    assert hosts["db.ns2"] == str(db.vip) and "db" not in hosts


_name = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_name, _name, st.sampled_from(["n1", "n2", "n3"])), max_size=30,
                unique_by=lambda t: (t[0], t[1])))
def test_invariants(specs: list[tuple[str, str, str]]) -> None:
    pods = [PodSpec(name, ns, node) for name, ns, node in specs]
    plan = plan_network("hyp", [], pods)
    ips = [p.ip for p in plan.pods]
    assert len(set(ips)) == len(ips)
    for p in plan.pods:
        node = plan.node(p.node)
        assert p.ip in node.pod_cidr and p.ip not in (node.gateway, node.pod_cidr.network_address)
        assert p.gateway == node.gateway
    veths = [p.node_veth for p in plan.pods]
    assert len(set(veths)) == len(veths)
    assert len(set(plan.all_netns())) == len(plan.all_netns())
    # re-planning from itself changes nothing
    assert plan_network("hyp", [], pods, previous=plan) == plan
