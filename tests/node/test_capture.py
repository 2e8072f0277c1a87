"""In-pod capture (spec istio-ambient.md §2.3) in real network namespaces.

The e2e tests build a two-node cluster network with zerotunnel.cluster.network (pod `a` on node n1,
pod `c` on node n2), install the capture table in pod a, and check each redirection the golden
describes with real sockets: an application's plain connect, the proxy's marked socket, inbound to
an app port, inbound to 15008, the pod calling itself, and removal.
"""

from __future__ import annotations

import os
import random
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from zerotunnel.cluster.network import create_network, destroy_network
from zerotunnel.cluster.topology import NetworkPlan, PodSpec, plan_network
from zerotunnel.node.capture import (
    NetnsError,
    NetnsHandle,
    capture_installed,
    capture_ruleset,
    connect_in_netns,
    in_netns,
    install_capture,
    open_listener_in_netns,
    original_dst,
    removal_ruleset,
    remove_capture,
    run_nft,
    socket_in_netns,
)

TIMEOUT = 5.0


def test_ruleset_follows_the_golden() -> None:
    text = capture_ruleset()
    assert text.startswith("table inet zerotunnel\ndelete table inet zerotunnel\n")
    assert "ip saddr 169.254.7.127 meta l4proto tcp accept" in text
    assert "ip daddr 169.254.7.127 meta l4proto tcp accept" in text
    assert ("ip daddr != 127.0.0.1 tcp dport != 15008 meta mark & 0xfff != 0x539 redirect to :15006"
            in text)
    assert "ip6 daddr != ::1 tcp dport != 15008 meta mark & 0xfff != 0x539 redirect to :15006" in text
    assert "ip daddr != 127.0.0.1 meta l4proto tcp meta mark & 0xfff != 0x539 redirect to :15001" in text
    assert 'oifname "lo" ip daddr != 127.0.0.1 accept' in text
    # the lo exemption must come before the outbound redirect, or self-calls would go to 15001
    assert text.index('oifname "lo" ip daddr') < text.index("redirect to :15001")


def test_ruleset_parameters() -> None:
    text = capture_ruleset(table="t2", outbound_port=25001, inbound_port=25006, hbone_port=25008, mark=0x42)
    assert "table inet t2 {" in text
    assert "redirect to :25001" in text and "redirect to :25006" in text
    assert "dport != 25008" in text and "!= 0x42" in text
    assert "15001" not in text
    assert removal_ruleset("t2") == "table inet t2\ndelete table inet t2\n"


@pytest.fixture(scope="module")
def plan() -> Iterator[NetworkPlan]:
    cluster = "cap" + secrets.token_hex(3)
    k = random.randrange(150, 240, 2)
    p = plan_network(
        cluster, [], [PodSpec("a", "ns1", "n1"), PodSpec("c", "ns2", "n2")],
        pod_cidr=f"10.{k}.0.0/16", node_cidr=f"10.{k + 1}.0.0/24",
    )
    create_network(p)
    try:
        yield p
    finally:
        destroy_network(cluster)
        assert not any(n.startswith(p.netns_prefix) for n in os.listdir("/run/netns"))


@pytest.fixture
def captured(plan: NetworkPlan) -> Iterator[NetworkPlan]:
    a = plan.pod("ns1", "a")
    install_capture(a.netns)
    try:
        yield plan
    finally:
        remove_capture(a.netns)


def _accept(listener: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
    listener.settimeout(TIMEOUT)
    conn, peer = listener.accept()
    conn.settimeout(TIMEOUT)
    return conn, peer[:2]


def _app_connect(netns: str, ip: str, port: int) -> subprocess.Popen[str]:
    """An application in the pod: a plain python client knowing nothing of the mesh."""
    code = (
        "import socket,sys\n"
        f"s=socket.create_connection(({ip!r},{port}),timeout={TIMEOUT})\n"
        "s.sendall(b'hello')\n"
        "sys.stdout.write(s.recv(16).decode())\n"
    )
    return subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", code],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


@pytest.mark.e2e
def test_install_is_idempotent(plan: NetworkPlan) -> None:
    a = plan.pod("ns1", "a")
    install_capture(a.netns)
    install_capture(a.netns)
    try:
        out = subprocess.run(["ip", "netns", "exec", a.netns, "nft", "list", "table", "inet", "zerotunnel"],
                             capture_output=True, text=True, check=True).stdout
        assert out.count("redirect to :15001") == 2  # one per address family, not doubled
        assert capture_installed(a.netns)
    finally:
        remove_capture(a.netns)
        remove_capture(a.netns)
    assert not capture_installed(a.netns)


@pytest.mark.e2e
def test_app_outbound_lands_on_15001_with_original_dst(captured: NetworkPlan) -> None:
    a, c = captured.pod("ns1", "a"), captured.pod("ns2", "c")
    with open_listener_in_netns(a.netns, "0.0.0.0", 15001) as listener:
        client = _app_connect(a.netns, str(c.ip), 8080)
        conn, peer = _accept(listener)
        with conn:
            assert original_dst(conn) == (str(c.ip), 8080)
            assert peer[0] == str(a.ip)
            assert conn.recv(5) == b"hello"
            conn.sendall(b"captured")
        out, err = client.communicate(timeout=TIMEOUT)
    assert client.returncode == 0, err
    assert out == "captured"


@pytest.mark.e2e
def test_marked_socket_skips_capture(captured: NetworkPlan) -> None:
    a, c = captured.pod("ns1", "a"), captured.pod("ns2", "c")
    with open_listener_in_netns(c.netns, "0.0.0.0", 8080) as app, \
            open_listener_in_netns(a.netns, "0.0.0.0", 15001) as outbound:
        with connect_in_netns(a.netns, (str(c.ip), 8080), timeout=TIMEOUT) as sock:  # marked 0x539
            conn, peer = _accept(app)
            with conn:
                assert peer == (str(a.ip), sock.getsockname()[1])
                sock.sendall(b"direct")
                assert conn.recv(6) == b"direct"
        outbound.setblocking(False)
        with pytest.raises(BlockingIOError):
            outbound.accept()


@pytest.mark.e2e
def test_unmarked_proxy_socket_is_captured_too(captured: NetworkPlan) -> None:
    """The mark, not the process, is what exempts a socket: without it the proxy would loop."""
    a, c = captured.pod("ns1", "a"), captured.pod("ns2", "c")
    with open_listener_in_netns(a.netns, "0.0.0.0", 15001) as outbound, \
            connect_in_netns(a.netns, (str(c.ip), 9000), mark=None, timeout=TIMEOUT):
        conn, _ = _accept(outbound)
        with conn:
            assert original_dst(conn) == (str(c.ip), 9000)


@pytest.mark.e2e
def test_inbound_lands_on_15006_with_original_dst(captured: NetworkPlan) -> None:
    a, c = captured.pod("ns1", "a"), captured.pod("ns2", "c")
    with open_listener_in_netns(a.netns, "::", 15006) as inbound, \
            connect_in_netns(c.netns, (str(a.ip), 8080), mark=None, timeout=TIMEOUT):
        conn, peer = _accept(inbound)
        with conn:
            assert original_dst(conn) == (str(a.ip), 8080)  # dual-stack listener, IPv4 client
            assert peer[0] == f"::ffff:{c.ip}"


@pytest.mark.e2e
def test_inbound_to_15008_is_not_redirected(captured: NetworkPlan) -> None:
    a, c = captured.pod("ns1", "a"), captured.pod("ns2", "c")
    with open_listener_in_netns(a.netns, "0.0.0.0", 15006) as inbound, \
            open_listener_in_netns(a.netns, "0.0.0.0", 15008) as hbone, \
            connect_in_netns(c.netns, (str(a.ip), 15008), mark=None, timeout=TIMEOUT):
        conn, _ = _accept(hbone)
        conn.close()
        inbound.setblocking(False)
        with pytest.raises(BlockingIOError):
            inbound.accept()


@pytest.mark.e2e
def test_pod_calling_its_own_ip_goes_straight_to_the_app(captured: NetworkPlan) -> None:
    """Golden: `! -d 127.0.0.1 -o lo -j ACCEPT` in OUTPUT; NAT is decided once per connection, so
    PREROUTING does not see the looped-back packet again and the app answers directly (as in Istio)."""
    a = captured.pod("ns1", "a")
    with open_listener_in_netns(a.netns, "0.0.0.0", 15006) as inbound, \
            open_listener_in_netns(a.netns, "0.0.0.0", 8080) as app:
        client = _app_connect(a.netns, str(a.ip), 8080)
        conn, _ = _accept(app)
        with conn:
            assert conn.recv(5) == b"hello"
            conn.sendall(b"self")
        out, err = client.communicate(timeout=TIMEOUT)
        inbound.setblocking(False)
        with pytest.raises(BlockingIOError):
            inbound.accept()
    assert (client.returncode, out) == (0, "self"), err


@pytest.mark.e2e
def test_ipv6_outbound_original_dst(captured: NetworkPlan) -> None:
    """IP6T_SO_ORIGINAL_DST: an IPv6 app connection redirected to [::1]:15001 (nothing leaves the pod)."""
    a = captured.pod("ns1", "a")
    route = ["2001:db8:7a::/64", "dev", "eth0"]
    subprocess.run(["ip", "-n", a.netns, "-6", "route", "add", *route], check=True)
    try:
        with open_listener_in_netns(a.netns, "::", 15001) as outbound, \
                connect_in_netns(a.netns, ("2001:db8:7a::5", 8080), mark=None, timeout=TIMEOUT):
            conn, _ = _accept(outbound)
            with conn:
                assert original_dst(conn) == ("2001:db8:7a::5", 8080)
    finally:
        subprocess.run(["ip", "-n", a.netns, "-6", "route", "del", *route], check=True)


@pytest.mark.e2e
def test_localhost_is_not_captured(captured: NetworkPlan) -> None:
    a = captured.pod("ns1", "a")
    with open_listener_in_netns(a.netns, "127.0.0.1", 9090) as local, \
            connect_in_netns(a.netns, ("127.0.0.1", 9090), mark=None, timeout=TIMEOUT):
        conn, _ = _accept(local)
        conn.close()


@pytest.mark.e2e
def test_remove_capture_restores_direct_traffic(plan: NetworkPlan) -> None:
    a, c = plan.pod("ns1", "a"), plan.pod("ns2", "c")
    install_capture(a.netns)
    remove_capture(a.netns)
    with open_listener_in_netns(c.netns, "0.0.0.0", 8080) as app:
        client = _app_connect(a.netns, str(c.ip), 8080)
        conn, peer = _accept(app)
        with conn:
            assert peer[0] == str(a.ip)
            assert conn.recv(5) == b"hello"
            conn.sendall(b"direct")
        out, err = client.communicate(timeout=TIMEOUT)
    assert (client.returncode, out) == (0, "direct"), err


@pytest.mark.e2e
def test_in_netns_always_switches_back(plan: NetworkPlan) -> None:
    a = plan.pod("ns1", "a")
    before = _netns_inode()
    with pytest.raises(ValueError, match="boom"), in_netns(a.netns):
        assert _netns_inode() != before
        raise ValueError("boom")
    assert _netns_inode() == before
    with pytest.raises(NetnsError, match="cannot open"), in_netns("zt-no-such-netns-x"):
        pass
    assert _netns_inode() == before
    with open_listener_in_netns(a.netns, "0.0.0.0", 15001), \
            pytest.raises(NetnsError, match="cannot listen"):
        open_listener_in_netns(a.netns, "0.0.0.0", 15001)
    assert _netns_inode() == before
    # nested: the inner exit returns to the outer namespace, not to the thread's home one
    b = plan.pod("ns2", "c")
    with in_netns(a.netns):
        inside_a = _netns_inode()
        with in_netns(b.netns):
            assert _netns_inode() not in (before, inside_a)
        assert _netns_inode() == inside_a
    assert _netns_inode() == before


@pytest.mark.e2e
def test_socket_in_netns_belongs_to_the_pod(plan: NetworkPlan) -> None:
    a = plan.pod("ns1", "a")
    with socket_in_netns(a.netns, socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("10.0.0.1", 9))  # UDP connect only picks a route: the pod's default
        assert s.getsockname()[0] == str(a.ip)


@pytest.mark.e2e
def test_run_nft_reports_errors(plan: NetworkPlan) -> None:
    a = plan.pod("ns1", "a")
    with pytest.raises(Exception, match="nft failed"):
        run_nft(a.netns, "table inet broken { chain x { nonsense; } }\n")


@pytest.mark.e2e
def test_handle_outlives_the_name() -> None:
    name = "zt-caph" + secrets.token_hex(3) + "-x"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        handle = NetnsHandle(name)
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)
    with handle:
        before = _netns_inode()
        with in_netns(handle):
            inside = _netns_inode()
        assert inside != before and _netns_inode() == before
        with open_listener_in_netns(handle, "127.0.0.1", 15001) as s:  # lo is down: bind still works
            assert s.getsockname() == ("127.0.0.1", 15001)
    with pytest.raises(NetnsError, match="closed"), in_netns(handle):
        pass
    assert _netns_inode() == before
    with pytest.raises(NetnsError, match="cannot open"):
        NetnsHandle(name)
