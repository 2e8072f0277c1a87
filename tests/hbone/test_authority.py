from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zerotunnel.hbone.authority import AuthorityError, HboneAuthority, parse_authority


@pytest.mark.parametrize(
    ("text", "host", "port", "is_ip"),
    [
        ("10.0.0.2:8080", "10.0.0.2", 8080, True),
        ("[fd00::2]:8080", "fd00::2", 8080, True),
        ("[::ffff:10.0.0.1]:80", "::ffff:a00:1", 80, True),
        ("productpage.default.svc.cluster.local:9080", "productpage.default.svc.cluster.local", 9080, False),
        ("Svc.NS:1", "svc.ns", 1, False),
        ("127.0.0.1:65535", "127.0.0.1", 65535, True),
    ],
)
def test_valid(text: str, host: str, port: int, is_ip: bool) -> None:
    a = parse_authority(text)
    assert (a.host, a.port, a.ip is not None) == (host, port, is_ip)
    assert parse_authority(text.encode()) == a


@pytest.mark.parametrize(
    "text",
    [
        "",
        "10.0.0.2",
        "10.0.0.2:",
        ":80",
        "10.0.0.2:0",
        "10.0.0.2:65536",
        "10.0.0.2:+80",
        "::1:80",
        "[::1]",
        "[::1]80",
        "[zz]:80",
        "[fe80::1%eth0]:80",
        "user@host:80",
        "a b:80",
        "010.0.0.1:80",
        "host:80/x",
        "10.0.0.2:80:80",
        "-bad:80",
        "1.2.3:80",
        "h\x00:80",
        "10.0.0.2:0080000",
    ],
)
def test_invalid(text: str) -> None:
    with pytest.raises(AuthorityError) as info:
        parse_authority(text)
    assert info.value.status == 400
    assert info.value.message.startswith("no valid authority pseudo header: ")


def test_non_ascii_bytes() -> None:
    with pytest.raises(AuthorityError):
        parse_authority(b"\xff\xfe:80")


@settings(max_examples=200)
@given(st.ip_addresses(), st.integers(1, 65535))
def test_ip_round_trip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    a = HboneAuthority.from_ip(ip, port)
    assert parse_authority(str(a)) == a
    assert a.ip == ip


@settings(max_examples=300)
@given(st.text(max_size=40))
def test_arbitrary_text_parses_or_raises_authority_error(text: str) -> None:
    try:
        a = parse_authority(text)
    except AuthorityError:
        return
    assert 0 < a.port < 65536
    assert parse_authority(str(a)) == a
