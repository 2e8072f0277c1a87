"""Building, using and tearing down the local cluster's network (DESIGN.md §4).

Unit tests check the exact `ip`/nft text; e2e tests build real namespaces under a unique cluster
name per run and always tear them down, asserting nothing is left behind.
"""

from __future__ import annotations

import contextlib
import random
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from zerotunnel.cluster import netns as ns
from zerotunnel.cluster.network import (
    ServiceDnat,
    add_pod,
    create_network,
    destroy_network,
    find_leftovers,
    install_service_dnat,
    list_clusters,
    nft_tables,
    remove_pod,
    remove_service_dnat,
    render_hosts_file,
    service_dnat_ruleset,
    setup_batches,
    write_hosts_file,
)
from zerotunnel.cluster.topology import NetworkPlan, PodSpec, ServiceSpec, plan_network, pod_hosts
from zerotunnel.errors import InputError
from zerotunnel.node.capture import install_capture, open_listener_in_netns

TIMEOUT = 5.0
PODS = [PodSpec("a", "ns1", "n1"), PodSpec("b", "ns1", "n1"), PodSpec("c", "ns2", "n2"),
        PodSpec("d", "ns2", "n2")]


def _cidrs() -> dict[str, Any]:
    """Per-run ranges, so concurrent test runs with host access never fight over root routes."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True,
                            check=True).stdout
    free = [k for k in range(150, 240, 2) if f"10.{k}." not in routes and f"10.{k + 1}." not in routes]
    k = random.choice(free)
    return {"pod_cidr": f"10.{k}.0.0/16", "node_cidr": f"10.{k + 1}.0.0/24"}


# --- unit ---------------------------------------------------------------------------------------

def test_setup_batches() -> None:
    plan = plan_network("u", [], PODS[:3], host_access=True)
    batches = setup_batches(plan)
    root = batches[0]
    assert root.netns is None
    assert root.commands[: len(plan.all_netns())] == tuple(f"netns add {n}" for n in plan.all_netns())
    a = plan.pod("ns1", "a")
    assert (f"link add eth0 netns {a.netns} type veth peer name {a.node_veth} netns zt-u-node-n1"
            in root.commands)
    by_ns = {b.netns: b.commands for b in batches if b.netns}
    assert by_ns[a.netns] == ("link set lo up", "addr add 10.244.0.2/32 dev eth0", "link set eth0 up",
                              "route add default via 10.244.0.1 dev eth0 onlink")
    node = by_ns["zt-u-node-n1"]
    assert "addr add 10.244.0.1/32 dev lo" in node
    assert f"route add 10.244.0.2/32 dev {a.node_veth}" in node
    assert "route add 10.244.1.0/24 via 10.243.0.3 dev eth0" in node
    assert f"link set {plan.node('n1').bridge_port} master {plan.bridge}" in by_ns["zt-u-net"]
    host = batches[-1]
    assert host.netns is None and f"addr add 10.243.0.1/24 dev {plan.host_veth}" in host.commands
    # every pod batch runs before the node batches that route to the pods' (then up) veths
    order = [b.netns for b in batches]
    assert max(order.index(p.netns) for p in plan.pods) < min(order.index(n.netns) for n in plan.nodes)
    no_host = setup_batches(plan_network("u", [], PODS[:3]))
    assert not any(plan.host_veth in c for b in no_host for c in b.commands)


def test_render_hosts_file() -> None:
    text = render_hosts_file({"web": "10.96.0.5", "web.ns1.svc.cluster.local": "10.96.0.5",
                              "web.ns1": "10.96.0.5", "a": "10.244.0.2"})
    lines = text.splitlines()
    assert "127.0.0.1\tlocalhost" in lines
    assert lines[-2:] == ["10.96.0.5\tweb.ns1.svc.cluster.local web.ns1 web", "10.244.0.2\ta"]
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        render_hosts_file({"x": "not-an-ip"})


def test_write_hosts_file(tmp_path: Path) -> None:
    path = write_hosts_file("zt-x-pod-ns.a", {"web": "10.96.0.5"}, etc_netns=tmp_path)
    assert path == tmp_path / "zt-x-pod-ns.a" / "hosts"
    assert "10.96.0.5\tweb" in path.read_text()
    write_hosts_file("zt-x-pod-ns.a", {"db": "10.96.0.6"}, etc_netns=tmp_path)
    assert "web" not in path.read_text()
    assert sorted(p.name for p in path.parent.iterdir()) == ["hosts", "resolv.conf"]
    assert "nameserver 127.0.0.1" in (path.parent / "resolv.conf").read_text()
    write_hosts_file("zt-x-pod-ns.b", {"db": "10.96.0.6"}, etc_netns=tmp_path, resolv_conf=False)
    assert sorted(p.name for p in (tmp_path / "zt-x-pod-ns.b").iterdir()) == ["hosts"]


def test_service_dnat_ruleset() -> None:
    text = service_dnat_ruleset([
        ServiceDnat("10.96.0.5", 80, (("10.244.0.2", 8080),)),
        ServiceDnat("10.96.0.6", 443, (("10.244.0.3", 8443), ("10.244.1.2", 8443))),
        ServiceDnat("10.96.0.7", 80, ()),
    ])
    assert text.startswith("table ip zerotunnel-svc\ndelete table ip zerotunnel-svc\n")
    # once in output, once in prerouting
    assert text.count("ip daddr 10.96.0.5 tcp dport 80 dnat ip to 10.244.0.2:8080") == 2
    assert ("ip daddr 10.96.0.6 tcp dport 443 dnat ip addr . port to numgen random mod 2 map "
            "{ 0 : 10.244.0.3 . 8443, 1 : 10.244.1.2 . 8443 }") in text
    assert text.count("ip daddr 10.96.0.7 tcp dport 80 reject with tcp reset") == 2
    with pytest.raises(InputError, match="only IPv4"):
        service_dnat_ruleset([ServiceDnat("fd00::1", 80, ())])


# --- e2e ----------------------------------------------------------------------------------------

class Server:
    """Accepts on a listener in a thread and answers each connection with a fixed HTTP reply."""

    def __init__(self, listener: socket.socket, name: str) -> None:
        self.listener, self.name, self.peers = listener, name, list[str]()
        listener.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                self.peers.append(peer[0])
                conn.settimeout(TIMEOUT)
                with contextlib.suppress(OSError):
                    conn.recv(4096)
                    body = self.name.encode()
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        self.listener.close()


@pytest.fixture(scope="module")
def plan() -> Iterator[NetworkPlan]:
    cluster = "net" + secrets.token_hex(3)
    p = plan_network(cluster, [], PODS, [ServiceSpec("web", "ns1"), ServiceSpec("empty", "ns1")],
                     host_access=True, **_cidrs())
    create_network(p)
    try:
        yield p
    finally:
        destroy_network(cluster)
        assert find_leftovers(cluster).empty


@pytest.fixture(scope="module")
def servers(plan: NetworkPlan) -> Iterator[dict[str, Server]]:
    started = {p.name: Server(open_listener_in_netns(p.netns, "0.0.0.0", 8080), p.name) for p in plan.pods}
    try:
        yield started
    finally:
        for s in started.values():
            s.close()


def _http_get(netns: str, url: str) -> subprocess.CompletedProcess[str]:
    return ns.exec_in_netns(netns, ["curl", "-sS", "--max-time", str(TIMEOUT), url], timeout=TIMEOUT + 5)


@pytest.mark.e2e
def test_every_pod_reaches_every_pod(plan: NetworkPlan, servers: dict[str, Server]) -> None:
    for src in plan.pods:
        for dst in plan.pods:
            out = _http_get(src.netns, f"http://{dst.ip}:8080/")
            assert (out.returncode, out.stdout) == (0, dst.name), (src.name, dst.name, out.stderr)
            assert servers[dst.name].peers[-1] == str(src.ip)  # routed, never NATed


@pytest.mark.e2e
def test_host_reaches_pods_through_the_bridge(plan: NetworkPlan, servers: dict[str, Server]) -> None:
    for pod in plan.pods:
        with socket.create_connection((str(pod.ip), 8080), timeout=TIMEOUT) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert s.recv(100).endswith(pod.name.encode())
        assert servers[pod.name].peers[-1] == str(plan.host_ip)


@pytest.mark.e2e
def test_list_clusters(plan: NetworkPlan) -> None:
    assert plan.cluster in list_clusters()


@pytest.mark.e2e
def test_nodes_forward_and_pods_do_not(plan: NetworkPlan) -> None:
    for node in plan.nodes:
        out = ns.exec_in_netns(node.netns, ["cat", "/proc/sys/net/ipv4/ip_forward"])
        assert out.stdout.strip() == "1"
    out = ns.exec_in_netns(plan.pods[0].netns, ["cat", "/proc/sys/net/ipv4/ip_forward"])
    assert out.stdout.strip() == "0"


@pytest.mark.e2e
def test_service_names_and_dnat_for_an_out_of_mesh_pod(plan: NetworkPlan, servers: dict[str, Server]) -> None:
    d, b = plan.pod("ns2", "d"), plan.pod("ns1", "b")
    web = plan.service("ns1", "web")
    write_hosts_file(d.netns, pod_hosts(d, plan.services))
    install_service_dnat(d.netns, [ServiceDnat(str(web.vip), 80, ((str(b.ip), 8080),))])
    try:
        for url in ("http://web.ns1.svc.cluster.local/", "http://web.ns1/", f"http://{web.vip}:80/"):
            out = _http_get(d.netns, url)
            assert (out.returncode, out.stdout) == (0, "b"), (url, out.stderr)
            assert servers["b"].peers[-1] == str(d.ip)
        start = time.monotonic()
        out = _http_get(d.netns, "http://web/")  # the short name is only for pods in ns1
        assert out.returncode == 6 and time.monotonic() - start < 2, out.stderr  # resolve error, fast
    finally:
        remove_service_dnat(d.netns)
        remove_service_dnat(d.netns)
    assert "ip zerotunnel-svc" not in nft_tables(d.netns)


@pytest.mark.e2e
def test_short_service_name_in_the_same_namespace(plan: NetworkPlan, servers: dict[str, Server]) -> None:
    b, a = plan.pod("ns1", "b"), plan.pod("ns1", "a")
    web = plan.service("ns1", "web")
    write_hosts_file(b.netns, pod_hosts(b, plan.services))
    install_service_dnat(b.netns, [ServiceDnat(str(web.vip), 80, ((str(a.ip), 8080),))])
    try:
        out = _http_get(b.netns, "http://web/")
        assert (out.returncode, out.stdout) == (0, "a"), out.stderr
    finally:
        remove_service_dnat(b.netns)


@pytest.mark.e2e
def test_dnat_spreads_over_endpoints_and_resets_without_any(
    plan: NetworkPlan, servers: dict[str, Server]
) -> None:
    d = plan.pod("ns2", "d")
    web, empty = plan.service("ns1", "web"), plan.service("ns1", "empty")
    endpoints = tuple((str(plan.pod("ns1", n).ip), 8080) for n in ("a", "b"))
    install_service_dnat(d.netns, [ServiceDnat(str(web.vip), 80, endpoints),
                                   ServiceDnat(str(empty.vip), 80, ())])
    try:
        seen = set()
        for _ in range(16):
            out = _http_get(d.netns, f"http://{web.vip}/")
            assert out.returncode == 0, out.stderr
            seen.add(out.stdout)
        assert seen == {"a", "b"}
        start = time.monotonic()
        out = _http_get(d.netns, f"http://{empty.vip}/")
        assert out.returncode == 7 and time.monotonic() - start < 2  # refused at once, not a timeout
    finally:
        remove_service_dnat(d.netns)


@pytest.mark.e2e
def test_add_and_remove_a_pod_at_runtime(plan: NetworkPlan, servers: dict[str, Server]) -> None:
    bigger = plan_network(plan.cluster, [], [*PODS, PodSpec("e", "ns1", "n2")],
                          [ServiceSpec("web", "ns1"), ServiceSpec("empty", "ns1")], previous=plan,
                          pod_cidr=str(plan.pod_cidr), node_cidr=str(plan.node_cidr), host_access=True)
    assert all(bigger.pod(p.namespace, p.name) == p for p in plan.pods)
    e = add_pod(bigger, "ns1", "e")
    try:
        write_hosts_file(e.netns, pod_hosts(e, bigger.services))
        for dst in plan.pods:
            out = _http_get(e.netns, f"http://{dst.ip}:8080/")
            assert (out.returncode, out.stdout) == (0, dst.name), out.stderr
    finally:
        remove_pod(plan.cluster, e.netns)
        remove_pod(plan.cluster, e.netns)
    assert not ns.netns_exists(e.netns) and not (ns.ETC_NETNS_DIR / e.netns).exists()
    with pytest.raises(InputError, match="does not belong"):
        remove_pod(plan.cluster, "zt-other-pod-x.y")


@pytest.mark.e2e
def test_teardown_leaves_nothing_even_after_a_crash() -> None:
    cluster = "down" + secrets.token_hex(3)
    p = plan_network(cluster, ["n1", "n2"], PODS, [ServiceSpec("web", "ns1")], host_access=True, **_cidrs())
    create_network(p)
    orphan = None
    try:
        with pytest.raises(InputError, match="already has network objects"):
            create_network(p)
        a = p.pod("ns1", "a")
        install_capture(a.netns)
        install_service_dnat(p.pod("ns2", "d").netns, [ServiceDnat("10.96.0.9", 80, ((str(a.ip), 80),))])
        for pod in p.pods:
            write_hosts_file(pod.netns, pod_hosts(pod, p.services))
        # a pod process that outlived its runner keeps the namespace alive unless it is killed
        orphan = subprocess.Popen(["ip", "netns", "exec", a.netns, "sleep", "60"])
        deadline = time.monotonic() + TIMEOUT
        while not ns.netns_pids(a.netns) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ns.netns_pids(a.netns)
        found = find_leftovers(cluster)
        assert set(found.netns) == set(p.all_netns())
        assert found.links == (p.host_veth,)
        assert set(found.etc_dirs) == {pod.netns for pod in p.pods}
    finally:
        removed = destroy_network(cluster)
        if orphan is not None:
            assert orphan.wait(TIMEOUT) == -9
    assert set(removed.netns) == set(p.all_netns())
    assert find_leftovers(cluster).empty
    assert not [n for n in ns.list_netns() if n.startswith(p.netns_prefix)]
    assert not [link for link in ns.list_links() if link.startswith(p.link_prefix)]
    assert not [d for d in ns.ETC_NETNS_DIR.iterdir() if d.name.startswith(p.netns_prefix)]
    assert not [t for t in nft_tables() if "zerotunnel" in t]
    routes = subprocess.run(["ip", "route", "show"], capture_output=True, text=True, check=True).stdout
    assert str(p.pod_cidr.network_address)[:-2] not in routes  # host routes died with the host veth
    assert cluster not in list_clusters()
    assert destroy_network(cluster).empty  # idempotent


@pytest.mark.e2e
def test_failed_create_rolls_back() -> None:
    cluster = "fail" + secrets.token_hex(3)
    p = plan_network(cluster, [], PODS[:1], host_access=True, **_cidrs())
    blocker = str(p.nodes[0].pod_cidr)
    subprocess.run(["ip", "route", "add", "blackhole", blocker], check=True)  # the host route will clash
    try:
        with pytest.raises(InputError, match=f"already routes {blocker}"):
            create_network(p)
        assert find_leftovers(cluster).empty
        # skipping the up-front check, the clash hits half way: everything made so far is removed
        with pytest.raises(ns.NetworkSetupError, match="File exists"):
            create_network(p, check_routes=False)
        assert find_leftovers(cluster).empty
    finally:
        subprocess.run(["ip", "route", "del", "blackhole", blocker], check=True)
        destroy_network(cluster)
