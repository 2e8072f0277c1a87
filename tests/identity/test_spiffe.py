"""SpiffeId: §3.4 rules, each rejection with its reason; format∘parse is the identity (Hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zerotunnel.errors import InputError
from zerotunnel.identity.spiffe import SpiffeId, SpiffeIdError

TD_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.-_"
SEG_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_"

trust_domains = st.text(TD_CHARS, min_size=1, max_size=40)
segments = st.text(SEG_CHARS, min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
paths = st.lists(segments, max_size=6).map(lambda segs: "".join("/" + s for s in segs))


def test_istio_form_and_accessors() -> None:
    sid = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
    assert sid == SpiffeId.istio("cluster.local", "default", "sleep")
    assert (sid.trust_domain, sid.path) == ("cluster.local", "/ns/default/sa/sleep")
    assert (sid.namespace, sid.service_account) == ("default", "sleep")
    assert sid.principal == "cluster.local/ns/default/sa/sleep"
    assert str(sid) == "spiffe://cluster.local/ns/default/sa/sleep"


def test_non_istio_shapes_have_no_namespace() -> None:
    for text in (
        "spiffe://td/workload",
        "spiffe://td/ns/a/sa/b/extra",
        "spiffe://td/ns/a/xx/b",
        "spiffe://td",
    ):
        sid = SpiffeId.parse(text)
        assert sid.namespace is None and sid.service_account is None


def test_trust_domain_id() -> None:
    sid = SpiffeId.parse("spiffe://example.org")
    assert sid.is_trust_domain_id and sid.path == "" and str(sid) == "spiffe://example.org"


def test_istio_replaces_at_in_trust_domain() -> None:
    assert str(SpiffeId.istio("foo@bar", "ns", "sa")) == "spiffe://foo.bar/ns/ns/sa/sa"


def test_istio_rejects_slash_in_names() -> None:
    with pytest.raises(SpiffeIdError, match="namespace must be one non-empty path segment"):
        SpiffeId.istio("cluster.local", "a/b", "sa")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "cannot be empty"),
        ("http://cluster.local/x", "scheme is missing or invalid"),
        ("SPIFFE://cluster.local/x", "scheme is missing or invalid"),
        ("spiffe:/cluster.local/x", "scheme is missing or invalid"),
        ("spiffe://", "trust domain is missing"),
        ("spiffe:///path", "trust domain is missing"),
        ("spiffe://Cluster.local/x", "trust domain characters are limited"),
        ("spiffe://user@cluster.local/x", "must not contain userinfo"),
        ("spiffe://cluster.local:8080/x", "must not contain a port"),
        ("spiffe://[::1]/x", "must not be an IPv6 address"),
        ("spiffe://clu%41ster/x", "must not contain percent-encoding"),
        ("spiffe://cluster.local/x?y=1", "query is not allowed"),
        ("spiffe://cluster.local/x#frag", "fragment is not allowed"),
        ("spiffe://cluster.local/", "trailing slash"),
        ("spiffe://cluster.local/a//b", "empty segments"),
        ("spiffe://cluster.local/a/./b", "dot segments"),
        ("spiffe://cluster.local/a/..", "dot segments"),
        ("spiffe://cluster.local/a%2Fb", "percent-encoding"),
        ("spiffe://cluster.local/a b", "path segment characters are limited"),
        ("spiffe://cluster.local/a\x00b", "path segment characters are limited"),
        ("spiffe://" + "a" * 256 + "/x", "longer than 255 bytes"),
        ("spiffe://td/" + "a" * 2048, "longer than 2048 bytes"),
    ],
)
def test_rejections_have_reasons(text: str, reason: str) -> None:
    with pytest.raises(SpiffeIdError) as info:
        SpiffeId.parse(text)
    assert reason in info.value.reason
    assert isinstance(info.value, InputError)
    assert "\n" not in info.value.message


def test_ipv4_trust_domain_allowed() -> None:
    assert SpiffeId.parse("spiffe://10.0.0.1/x").trust_domain == "10.0.0.1"


def test_direct_construction_validates() -> None:
    with pytest.raises(SpiffeIdError, match="dot segments"):
        SpiffeId("cluster.local", "/a/..")


@settings(max_examples=200)
@given(trust_domains, paths)
def test_format_then_parse_is_identity(td: str, path: str) -> None:
    sid = SpiffeId(td, path)
    assert SpiffeId.parse(str(sid)) == sid
    assert str(SpiffeId.parse(str(sid))) == str(sid)


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=60), st.text(max_size=40).map(lambda s: "spiffe://" + s)))
def test_every_string_parses_round_trip_or_has_a_reason(text: str) -> None:
    try:
        sid = SpiffeId.parse(text)
    except SpiffeIdError as exc:
        assert exc.reason
        assert exc.message.startswith("invalid SPIFFE ID")
    else:
        assert str(sid) == text
