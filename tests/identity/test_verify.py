"""verify_peer: good SVIDs through 1-3 tiers and root rotation; every rejection with its own Reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from zerotunnel.identity.bundle import TrustBundle
from zerotunnel.identity.ca import CertificateAuthority
from zerotunnel.identity.csr import generate_key
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.identity.verify import PeerRole, Reason, VerificationError, validate_path, verify_peer
from zerotunnel.testing.certs import (
    BAD_KINDS,
    EXPECTED_REASON,
    BadKind,
    build_leaf,
    issue_test_svid,
    make_bad_svid,
    make_test_ca,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
SID = SpiffeId.istio("cluster.local", "default", "sleep")


@pytest.fixture(scope="module", params=[1, 3], ids=["root", "3-tier"])
def ca(request: pytest.FixtureRequest) -> CertificateAuthority:
    return make_test_ca(tiers=request.param, now=NOW)


def _bundle(ca: CertificateAuthority) -> TrustBundle:
    return TrustBundle.from_pem("cluster.local", ca.root_bundle_pem)


def _reason(leaf: bytes | x509.Certificate, chain: list[bytes], bundle: TrustBundle, **kw: object) -> str:
    with pytest.raises(VerificationError) as info:
        verify_peer(leaf, chain, bundle, NOW, **kw)  # type: ignore[arg-type]
    assert info.value.detail
    return info.value.reason


def test_accepts_issued_svid(ca: CertificateAuthority) -> None:
    leaf, _key, chain = issue_test_svid(ca, SID, now=NOW)
    roles: tuple[PeerRole, ...] = ("client", "server")
    for role in roles:
        peer = verify_peer(leaf, list(chain), _bundle(ca), NOW, {SID}, peer_role=role)
        assert peer.spiffe_id == SID
        assert peer.not_after == NOW + timedelta(hours=1)
        assert peer.chain[-1] == ca.roots[0]
        assert len(peer.chain) == 2 + len(ca.intermediates) + (0 if ca.is_root else 1)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_rejects_bad_svid_with_reason(ca: CertificateAuthority, kind: BadKind) -> None:
    leaf, _key, chain = make_bad_svid(ca, kind, now=NOW)
    assert _reason(leaf, list(chain), _bundle(ca)) == EXPECTED_REASON[kind]


def test_reason_strings_are_stable() -> None:
    assert {r.value for r in Reason} >= {
        "leaf-is-ca",
        "multiple-uri-sans",
        "no-uri-san",
        "non-spiffe-uri",
        "expired",
        "not-yet-valid",
        "wrong-trust-domain",
        "unknown-root",
        "wrong-eku",
        "broken-chain",
        "unexpected-identity",
    }


def test_identity_not_among_expected(ca: CertificateAuthority) -> None:
    leaf, _key, chain = issue_test_svid(ca, SID, now=NOW)
    other = SpiffeId.istio("cluster.local", "default", "productpage")
    assert _reason(leaf, list(chain), _bundle(ca), expected_ids={other}) == Reason.UNEXPECTED_ID
    assert _reason(leaf, list(chain), _bundle(ca), expected_ids=set()) == Reason.UNEXPECTED_ID


def test_broken_chain_missing_or_wrong_intermediate() -> None:
    ca = make_test_ca(tiers=3, now=NOW)
    leaf, _key, chain = issue_test_svid(ca, SID, now=NOW)
    assert len(chain) == 2
    # the middle intermediate alone: the signing intermediate is missing
    assert _reason(leaf, [chain[1]], _bundle(ca)) == Reason.BROKEN_CHAIN
    # an intermediate with the right name but another key
    impostor_parent = make_test_ca(tiers=1, now=NOW)
    impostor = CertificateAuthority(
        build_leaf(
            impostor_parent,
            generate_key(),
            uris=[],
            not_before=NOW - timedelta(hours=1),
            not_after=NOW + timedelta(hours=1),
            ca=True,
        ),
        generate_key(),
        (),
        impostor_parent.roots,
    )
    forged = x509.CertificateBuilder(
        issuer_name=ca.signing_cert.subject,
        subject_name=ca.signing_cert.subject,
        public_key=impostor.signing_key.public_key(),
        serial_number=1,
        not_valid_before=NOW - timedelta(hours=1),
        not_valid_after=NOW + timedelta(hours=1),
        extensions=list(ca.signing_cert.extensions),
    ).sign(impostor.signing_key, hashes.SHA256())
    pem = forged.public_bytes(serialization.Encoding.PEM)
    assert _reason(leaf, [pem, chain[1]], _bundle(ca)) == Reason.BROKEN_CHAIN


def test_expired_intermediate() -> None:
    root = make_test_ca(now=NOW)
    short = CertificateAuthority.create_intermediate(root, NOW, ttl=timedelta(hours=2))
    leaf = build_leaf(
        short, generate_key(), uris=[str(SID)], not_before=NOW, not_after=NOW + timedelta(hours=5)
    )
    with pytest.raises(VerificationError) as info:
        verify_peer(leaf, list(short.intermediates_pem), _bundle(root), NOW + timedelta(hours=3))
    assert info.value.reason == Reason.EXPIRED
    assert "intermediate" in info.value.detail


def test_root_rotation_bundle_accepts_both() -> None:
    old, new = make_test_ca(now=NOW), make_test_ca(now=NOW)
    bundle = TrustBundle.from_pem("cluster.local", old.root_bundle_pem + new.root_bundle_pem)
    for ca in (old, new):
        leaf, _key, chain = issue_test_svid(ca, SID, now=NOW)
        assert verify_peer(leaf, list(chain), bundle, NOW).spiffe_id == SID
    leaf, _key, chain = issue_test_svid(old, SID, now=NOW)
    assert _reason(leaf, list(chain), bundle.without("cluster.local", old.roots[0])) == Reason.UNKNOWN_ROOT


def test_trust_domain_picks_roots_and_aliases() -> None:
    local, other = make_test_ca(now=NOW), make_test_ca("other.td", now=NOW)
    bundle = TrustBundle.from_pem("cluster.local", local.root_bundle_pem).merge(
        TrustBundle.from_pem("other.td", other.root_bundle_pem)
    )
    leaf, _key, chain = issue_test_svid(other, "spiffe://other.td/ns/x/sa/y", now=NOW)
    assert verify_peer(leaf, list(chain), bundle, NOW).spiffe_id.trust_domain == "other.td"
    # a cert claiming cluster.local but signed by other.td's root: the cluster.local roots do not verify it
    forged, _k, fchain = issue_test_svid(other, SID, now=NOW)
    assert _reason(forged, list(fchain), bundle) == Reason.UNKNOWN_ROOT
    aliased = TrustBundle.from_pem("cluster.local", local.root_bundle_pem).with_alias(
        "old.td", "cluster.local"
    )
    leaf, _key, chain = issue_test_svid(local, "spiffe://old.td/ns/x/sa/y", now=NOW)
    assert verify_peer(leaf, list(chain), aliased, NOW).spiffe_id.trust_domain == "old.td"
    assert _reason(leaf, list(chain), _bundle(local)) == Reason.WRONG_TRUST_DOMAIN


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"uris": ["spiffe://cluster.local"]}, Reason.INVALID_SPIFFE_ID),
        ({"uris": ["spiffe://cluster.local/a/../b"]}, Reason.INVALID_SPIFFE_ID),
        ({"uris": ["spiffe://cluster.local/ns/a/sa/b"], "key_cert_sign": True}, Reason.LEAF_IS_CA),
        (
            {"uris": ["spiffe://cluster.local/ns/a/sa/b"], "ekus": [ExtendedKeyUsageOID.SERVER_AUTH]},
            Reason.WRONG_EKU,
        ),
        (
            {
                "uris": ["spiffe://cluster.local/ns/a/sa/b"],
                "ekus": [ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE],
            },
            Reason.WRONG_EKU,
        ),
    ],
)
def test_more_leaf_rules(kw: dict[str, Any], reason: Reason) -> None:
    ca = make_test_ca(now=NOW)
    leaf = build_leaf(
        ca, generate_key(), not_before=NOW - timedelta(minutes=1), not_after=NOW + timedelta(hours=1), **kw
    )
    assert _reason(leaf, [], _bundle(ca)) == reason


def test_eku_by_role_and_absent_eku() -> None:
    ca = make_test_ca(now=NOW)
    window: dict[str, Any] = {"not_before": NOW - timedelta(minutes=1), "not_after": NOW + timedelta(hours=1)}
    server_only = build_leaf(
        ca, generate_key(), uris=[str(SID)], ekus=[ExtendedKeyUsageOID.SERVER_AUTH], **window
    )
    assert verify_peer(server_only, [], _bundle(ca), NOW, peer_role="server").spiffe_id == SID
    assert _reason(server_only, [], _bundle(ca), peer_role="client") == Reason.WRONG_EKU
    no_eku = build_leaf(ca, generate_key(), uris=[str(SID)], ekus=None, **window)
    assert verify_peer(no_eku, [], _bundle(ca), NOW).spiffe_id == SID  # RFC 5280: absent EKU = any


def test_malformed_input() -> None:
    ca = make_test_ca(now=NOW)
    assert _reason(b"not a cert", [], _bundle(ca)) == Reason.MALFORMED
    leaf, _key, _chain = issue_test_svid(ca, SID, now=NOW)
    assert _reason(leaf + leaf, [], _bundle(ca)) == Reason.MALFORMED
    der = x509.load_pem_x509_certificate(leaf).public_bytes(serialization.Encoding.DER)
    assert verify_peer(der, [], _bundle(ca), NOW).spiffe_id == SID


def test_validate_path_server_name() -> None:
    ca = make_test_ca(now=NOW)
    leaf = build_leaf(
        ca,
        generate_key(),
        uris=[str(SID)],
        dns=["web.example"],
        not_before=NOW - timedelta(minutes=1),
        not_after=NOW + timedelta(hours=1),
    )
    chain = validate_path(
        leaf, [], ca.roots, NOW, peer_role="server", server_name=x509.DNSName("web.example")
    )
    assert chain[-1] == ca.roots[0]
    from cryptography.x509.verification import VerificationError as PathError

    with pytest.raises(PathError):
        validate_path(leaf, [], ca.roots, NOW, peer_role="server", server_name=x509.DNSName("other.example"))
