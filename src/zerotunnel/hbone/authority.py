"""The HBONE `:authority` pseudo header: where the tunnelled bytes must go.

spec/istio-ambient.md §1.2: the client writes the final destination as a socket address
(`10.0.0.2:8080`, `[fd00::2]:8080`); the hostname form `svc.ns.svc.cluster.local:80` exists for
double HBONE. The server parses it as a socket address first, then as `host:port`; a missing host
or port is a 400 with the error `no valid authority pseudo header: ...` (§1.4 step 3).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from zerotunnel.errors import ZerotunnelError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# RFC 1123 labels; the authority is attacker-controlled (security.md rule 1), so only plain DNS names pass.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# \Z, not $: `$` also matches before a trailing newline, which let `host\n:80` through
# (tests/reliability/test_fuzz.py, fuzz/corpus/authority/finding-*).
_HOST_RE = re.compile(rf"^(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\.?\Z")
_PORT_RE = re.compile(r"^[0-9]{1,5}\Z")


class AuthorityError(ZerotunnelError):
    """A CONNECT authority that is not `ip:port` or `host:port` (§1.4 step 3: HTTP 400)."""

    status = 400


@dataclass(frozen=True, slots=True)
class HboneAuthority:
    """A parsed authority: `ip` is set for the socket-address form, `host` holds the text form."""

    host: str
    port: int
    ip: IPAddress | None = None

    def __str__(self) -> str:
        if isinstance(self.ip, ipaddress.IPv6Address):
            return f"[{self.ip}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def from_ip(cls, ip: str | IPAddress, port: int) -> HboneAuthority:
        """The normal client case (§1.2): the final destination socket address."""
        addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
        if not 0 < port < 65536:
            raise AuthorityError(f"no valid authority pseudo header: port {port} out of range", status=400)
        return cls(host=str(addr), port=port, ip=addr)


def _bad(text: str) -> AuthorityError:
    return AuthorityError(f"no valid authority pseudo header: {text!r}", status=400)


def _port(text: str, whole: str) -> int:
    if not _PORT_RE.match(text):
        raise _bad(whole)
    port = int(text)
    if not 0 < port < 65536:
        raise _bad(whole)
    return port


def parse_authority(raw: str | bytes) -> HboneAuthority:
    """Parse an authority the way ztunnel's server does (§1.2), rejecting anything else.

    Order: `[v6]:port`, then `v4:port`, then `host:port`. A bare IPv6 address without brackets, an
    empty host, a missing/zero/oversized port, userinfo or any byte outside a DNS name is an error.
    """
    if isinstance(raw, bytes):
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise _bad(raw.decode("ascii", "backslashreplace")) from None
    else:
        text = raw
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise _bad(text)
        try:
            v6 = ipaddress.IPv6Address(text[1:close])
        except ValueError:
            raise _bad(text) from None
        if v6.scope_id is not None:
            raise _bad(text)
        return HboneAuthority(host=str(v6), port=_port(text[close + 2 :], text), ip=v6)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or ":" in host:
        raise _bad(text)
    port = _port(port_text, text)
    try:
        v4 = ipaddress.IPv4Address(host)
    except ValueError:
        v4 = None
    if v4 is not None:
        return HboneAuthority(host=str(v4), port=port, ip=v4)
    if not _HOST_RE.match(host) or host.replace(".", "").isdigit():
        raise _bad(text)
    return HboneAuthority(host=host.lower(), port=port, ip=None)
