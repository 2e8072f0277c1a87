"""Named network namespaces and `ip -batch` (root; each test makes and removes its own namespace)."""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Iterator

import pytest

from zerotunnel.cluster import netns as ns
from zerotunnel.errors import ZerotunnelError


@pytest.fixture
def name() -> Iterator[str]:
    n = "zt-nstest" + secrets.token_hex(3) + "-x"
    ns.add_netns([n])
    try:
        yield n
    finally:
        ns.delete_netns(n)
        assert n not in ns.list_netns()


@pytest.mark.e2e
def test_add_list_exec_delete(name: str) -> None:
    assert ns.netns_exists(name) and name in ns.list_netns()
    ns.ip_batch(name, ["link set lo up", "link add zttest0 type veth peer name zttest9"])
    assert sorted(ns.list_links(name)) == ["lo", "zttest0", "zttest9"]
    out = ns.exec_in_netns(name, ["sh", "-c", "ip -o link show | wc -l; exit 3"])
    assert (out.returncode, out.stdout.strip()) == (3, "3")


@pytest.mark.e2e
def test_ip_batch_reports_the_failing_line(name: str) -> None:
    with pytest.raises(ns.NetworkSetupError, match=f"in netns {name}.*zt-missing"):
        ns.ip_batch(name, ["link set lo up", "link set zt-missing up"])
    ns.ip_batch(name, ["link set zt-missing up", "link add zttest1 type veth peer name zttest2"], force=True)
    assert "zttest1" in ns.list_links(name)
    ns.ip_batch(name, [])


@pytest.mark.e2e
def test_sysctl_is_per_namespace(name: str) -> None:
    ns.set_sysctl(name, "net.ipv4.ip_forward", "1")
    out = ns.exec_in_netns(name, ["cat", "/proc/sys/net/ipv4/ip_forward"])
    assert out.stdout.strip() == "1"
    with pytest.raises(ZerotunnelError):
        ns.set_sysctl("zt-no-such-netns-y", "net.ipv4.ip_forward", "1")
    with pytest.raises(ns.NetworkSetupError, match="cannot set"):
        ns.set_sysctl(name, "net.ipv4.no_such_key", "1")


@pytest.mark.e2e
def test_delete_kills_what_runs_inside_and_is_idempotent(name: str) -> None:
    proc = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "60"])
    deadline = time.monotonic() + 5
    while not ns.netns_pids(name) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ns.netns_pids(name) == [proc.pid]  # `ip netns exec` execs the command in place
    ns.delete_netns(name)
    assert proc.wait(5) == -9
    assert not ns.netns_exists(name)
    ns.delete_netns(name)
    assert ns.netns_pids(name) == []
