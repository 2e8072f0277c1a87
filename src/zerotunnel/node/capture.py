"""In-pod traffic capture: the per-pod nftables ruleset and sockets that live in a pod's netns.

DESIGN.md §4 and spec istio-ambient.md §2.2/§2.3: Istio's CNI agent enters each pod's network
namespace, installs redirection rules there, and ztunnel (one process per node) opens its listeners
*inside* that namespace. We do the same with one nftables table per pod netns (`inet zerotunnel`)
and with `setns(2)` on the calling thread to create sockets in the pod's namespace.

What the ruleset keeps from the golden (`cni/pkg/iptables/testdata/default.golden`, spec §2.3):
- nat PREROUTING: TCP from the kubelet probe address 169.254.7.127 is accepted untouched; every other
  inbound TCP not to 127.0.0.1, not to 15008 and not marked 0x539/0xfff is REDIRECTed to 15006;
- nat OUTPUT: TCP to 169.254.7.127 is accepted; traffic leaving through `lo` to anything but
  127.0.0.1 (the pod calling its own IP) is accepted, and since NAT is decided once per connection
  (at OUTPUT here) PREROUTING never sees it again: a pod calling itself reaches its app directly,
  as in Istio; every other TCP not to 127.0.0.1 and not marked 0x539/0xfff is REDIRECTed to 15001.
Both address families are covered (`::1` plays 127.0.0.1's part for IPv6).

What it leaves out, and why:
- the mangle CONNMARK rules (0x539 -> connmark 0x111, restore-mark on OUTPUT), the `-m mark 0x111
  -j ACCEPT` nat rule and the policy route `fwmark 0x111 lookup 100 / local 0.0.0.0/0 dev lo`:
  they exist only so that replies to connections the proxy opened with a *spoofed* source
  (IP_TRANSPARENT, the original client's IP) are routed back to the proxy instead of out of the pod.
  Our proxy does not spoof sources: it connects to the app from the pod's own address, so replies
  reach its socket by ordinary routing. Add them together with IP_TRANSPARENT, never one without
  the other.
- DNS capture (UDP/TCP 53 -> 15053) and the raw-table `CT --zone 1` rules that go with it: we
  have no DNS proxy; service names resolve from the per-pod hosts file (DESIGN.md §4).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from zerotunnel.errors import ZerotunnelError

OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
HBONE_PORT = 15008
# spec §2.2: ztunnel's in-pod PACKET_MARK; §2.3 InpodMask.
PROXY_MARK = 0x539
PROXY_MARK_MASK = 0xFFF
# spec §2.3: the SNAT address of the kubelet's host probes, always accepted.
PROBE_ADDRESS = "169.254.7.127"
CAPTURE_TABLE = "zerotunnel"

_CLONE_NEWNET = 0x40000000
_SO_MARK = 36
_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
_IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
_NETNS_RUN_DIR = Path("/run/netns")
_COMMAND_TIMEOUT = 30.0


class NetnsError(ZerotunnelError):
    """A network namespace could not be entered, left, or configured."""


class CaptureError(ZerotunnelError):
    """Installing or removing a pod's capture rules failed."""


def netns_path(netns: str | os.PathLike[str]) -> Path:
    """`/run/netns/NAME` for a bare name (what `ip netns add` creates), else the path as given.

    The node proxy may be handed either: a name for the local cluster, a `/proc/PID/ns/net` path
    (or a bind mount of one) when another agent owns the namespace.
    """
    text = os.fspath(netns)
    if "/" in text:
        return Path(text)
    if not text or text in {".", ".."}:
        raise NetnsError(f"invalid network namespace name {text!r}")
    return _NETNS_RUN_DIR / text


def _libc_setns() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.setns
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SETNS = None if hasattr(os, "setns") else _libc_setns()


def _setns(fd: int) -> None:
    """`setns(fd, CLONE_NEWNET)` on the calling thread only (os.setns on 3.12+, libc on 3.11)."""
    if _SETNS is None:
        os.setns(fd, _CLONE_NEWNET)  # type: ignore[attr-defined,unused-ignore]
        return
    if _SETNS(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class NetnsHandle:
    """An open network namespace, usable after its name is gone (like the fd ztunnel gets, spec §2.2).

    Holding one per pod saves opening the namespace file for every socket the proxy creates in it.
    """

    __slots__ = ("fd", "path")

    def __init__(self, netns: str | os.PathLike[str]) -> None:
        self.path = netns_path(netns)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NetnsError(f"cannot open network namespace {self.path}: {exc.strerror}") from exc

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> NetnsHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NetnsHandle({str(self.path)!r}, fd={self.fd})"


Netns = str | os.PathLike[str] | NetnsHandle


class _HomeNetns(threading.local):
    """The namespace a thread returns to, opened once per thread: opening
    /proc/thread-self/ns/net for every socket was half the cost of creating one in a pod (47 → 22 µs,
    once per inbound tunnel). Only `in_netns` moves a thread, and it always moves it back, so the
    namespace a thread is in outside any `in_netns` never changes; a nested entry opens its own."""

    def __init__(self) -> None:
        self.fd = -1
        self.depth = 0


_HOME = _HomeNetns()


@contextlib.contextmanager
def in_netns(netns: Netns) -> Iterator[None]:
    """Run the body with the calling thread in `netns`, and always switch back.

    Only this thread moves (network namespaces are per task), so an event-loop thread may use it
    for the few microseconds it takes to create a socket: a socket keeps the namespace it was
    created in for its whole life. Failing to switch back would leave the thread serving the wrong
    network, so that is raised as NetnsError no matter what the body raised.
    """
    home = _HOME
    nested = home.depth > 0
    if nested:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    else:
        if home.fd < 0:
            home.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        own = home.fd
    home.depth += 1
    try:
        handle = netns if isinstance(netns, NetnsHandle) else NetnsHandle(netns)
        try:
            if handle.fd < 0:
                raise NetnsError(f"network namespace handle for {handle.path} is closed")
            try:
                _setns(handle.fd)
            except OSError as exc:
                raise NetnsError(f"cannot enter network namespace {handle.path}: {exc.strerror}") from exc
        finally:
            if handle is not netns:
                handle.close()
        try:
            yield
        finally:
            try:
                _setns(own)
            except OSError as exc:  # pragma: no cover - the kernel refusing our own netns back
                msg = f"cannot return from network namespace {handle.path}: {exc.strerror}"
                raise NetnsError(msg) from exc
    finally:
        home.depth -= 1
        if nested:
            os.close(own)


def _family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def socket_in_netns(
    netns: Netns,
    family: socket.AddressFamily = socket.AF_INET,
    kind: socket.SocketKind = socket.SOCK_STREAM,
) -> socket.socket:
    """A new socket that belongs to `netns`; bind/connect it anywhere (asyncio: `sock_connect`)."""
    with in_netns(netns):
        return socket.socket(family, kind)


def open_listener_in_netns(
    netns_path: Netns,
    host: str,
    port: int,
    *,
    backlog: int = 512,
    reuse_port: bool = False,
    blocking: bool = True,
) -> socket.socket:
    """A listening TCP socket bound to host:port inside a pod's netns (spec §2.2: 15001/15006/15008).

    SO_REUSEADDR lets a restarted proxy rebind while old connections sit in TIME_WAIT; `reuse_port`
    mirrors ztunnel's INPOD_PORT_REUSE for a hand-over between two proxy processes.
    """
    family = _family_of(host)
    with in_netns(netns_path):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and host in {"::", ""}:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise NetnsError(f"cannot listen on {host}:{port} in {netns_path}: {exc.strerror}") from exc
    sock.setblocking(blocking)
    return sock


def mark_socket(sock: socket.socket, mark: int = PROXY_MARK) -> None:
    """Set SO_MARK so the capture rules let this socket's packets through (spec §2.2, 0x539)."""
    sock.setsockopt(socket.SOL_SOCKET, _SO_MARK, mark)


def connect_in_netns(
    netns: Netns,
    address: tuple[str, int],
    *,
    mark: int | None = PROXY_MARK,
    timeout: float = 10.0,
    source: tuple[str, int] | None = None,
) -> socket.socket:
    """A TCP connection that originates inside `netns` (the proxy speaking as the pod).

    Marked 0x539 by default so the pod's own capture rules do not bounce it back to 15001; pass
    `mark=None` to behave exactly like an application in the pod. The 10 s default is ztunnel's
    connect timeout (spec §1.5).
    """
    host, port = address
    sock = socket_in_netns(netns, _family_of(host))
    try:
        if mark is not None:
            mark_socket(sock, mark)
        if source is not None:
            sock.bind(source)
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The (ip, port) a REDIRECTed connection was heading to, from conntrack (spec §2.3).

    IPv4 uses SO_ORIGINAL_DST, IPv6 IP6T_SO_ORIGINAL_DST; an IPv4 client on a dual-stack IPv6
    listener (peer `::ffff:a.b.c.d`) is an IPv4 connection to conntrack, so it is asked as IPv4.
    A connection that was not NATed returns its own local address; OSError (ENOENT) means
    conntrack has no entry for it (netfilter not loaded in that namespace).
    """
    if sock.family == socket.AF_INET6:
        peer = sock.getpeername()[0]
        if not ipaddress.IPv6Address(peer.split("%")[0]).ipv4_mapped:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, _IP6T_SO_ORIGINAL_DST, 28)
            port = struct.unpack_from("!H", raw, 2)[0]
            return str(ipaddress.IPv6Address(raw[8:24])), port
    raw = sock.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


def capture_ruleset(
    *,
    table: str = CAPTURE_TABLE,
    outbound_port: int = OUTBOUND_PORT,
    inbound_port: int = INBOUND_PLAINTEXT_PORT,
    hbone_port: int = HBONE_PORT,
    mark: int = PROXY_MARK,
    mark_mask: int = PROXY_MARK_MASK,
    probe_address: str = PROBE_ADDRESS,
) -> str:
    """The `nft -f` text that atomically (re)places the pod's capture table (spec §2.3).

    The leading `table …` + `delete table …` pair makes the load idempotent in one transaction:
    the table is created if absent, dropped, then rebuilt, so a re-install never doubles rules and
    never leaves a moment without them being consistent.
    """
    m = f"meta mark & {mark_mask:#x} != {mark:#x}"
    return f"""table inet {table}
delete table inet {table}
table inet {table} {{
\tchain prerouting {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tip saddr {probe_address} meta l4proto tcp accept
\t\tip daddr != 127.0.0.1 tcp dport != {hbone_port} {m} redirect to :{inbound_port}
\t\tip6 daddr != ::1 tcp dport != {hbone_port} {m} redirect to :{inbound_port}
\t}}
\tchain output {{
\t\ttype nat hook output priority -100; policy accept;
\t\tip daddr {probe_address} meta l4proto tcp accept
\t\toifname "lo" ip daddr != 127.0.0.1 accept
\t\toifname "lo" ip6 daddr != ::1 accept
\t\tip daddr != 127.0.0.1 meta l4proto tcp {m} redirect to :{outbound_port}
\t\tip6 daddr != ::1 meta l4proto tcp {m} redirect to :{outbound_port}
\t}}
}}
"""


def removal_ruleset(table: str = CAPTURE_TABLE, family: str = "inet") -> str:
    """`nft -f` text that removes a table whether or not it exists (idempotent teardown)."""
    return f"table {family} {table}\ndelete table {family} {table}\n"


def run_nft(netns: str | os.PathLike[str] | None, script: str) -> None:
    """Load `script` with `nft -f -` inside `netns` (None: the caller's own namespace)."""
    argv = ["nft", "-f", "-"]
    if netns is not None:
        argv = ["nsenter", f"--net={netns_path(netns)}", "--", *argv]
    try:
        proc = subprocess.run(
            argv, input=script, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False
        )
    except FileNotFoundError as exc:
        raise CaptureError(f"{argv[0]} not found: install nftables (scripts/setup.sh)") from exc
    if proc.returncode != 0:
        where = f" in {netns}" if netns is not None else ""
        raise CaptureError(f"nft failed{where}: {proc.stderr.strip() or proc.stdout.strip()}")


def install_capture(
    netns: str | os.PathLike[str],
    *,
    table: str = CAPTURE_TABLE,
    outbound_port: int = OUTBOUND_PORT,
    inbound_port: int = INBOUND_PLAINTEXT_PORT,
    hbone_port: int = HBONE_PORT,
    mark: int = PROXY_MARK,
) -> None:
    """Install (or atomically replace) the pod's capture table; see `capture_ruleset`."""
    run_nft(
        netns,
        capture_ruleset(
            table=table, outbound_port=outbound_port, inbound_port=inbound_port,
            hbone_port=hbone_port, mark=mark,
        ),
    )


def remove_capture(netns: str | os.PathLike[str], *, table: str = CAPTURE_TABLE) -> None:
    """Remove the pod's capture table; safe when it is already gone. The netns must still exist."""
    run_nft(netns, removal_ruleset(table))


def capture_installed(netns: str | os.PathLike[str], *, table: str = CAPTURE_TABLE) -> bool:
    """Whether the capture table is present in `netns` (for status and tests)."""
    argv = ["nsenter", f"--net={netns_path(netns)}", "--", "nft", "list", "table", "inet", table]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False)
    return proc.returncode == 0
