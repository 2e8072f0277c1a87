"""TrustBundle: several roots per trust domain, several trust domains, aliases, validation."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from zerotunnel.identity.bundle import BundleError, TrustBundle
from zerotunnel.identity.ca import CertificateAuthority
from zerotunnel.identity.spiffe import SpiffeId, SpiffeIdError

NOW = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def cas() -> tuple[CertificateAuthority, CertificateAuthority, CertificateAuthority]:
    return (
        CertificateAuthority.create_root("cluster.local", NOW),
        CertificateAuthority.create_root("cluster.local", NOW),
        CertificateAuthority.create_root("other.td", NOW),
    )


def test_from_pem_several_roots_and_dedup(cas: tuple[CertificateAuthority, ...]) -> None:
    a, b, _ = cas
    bundle = TrustBundle.from_pem("cluster.local", a.root_bundle_pem + b.root_bundle_pem + a.root_bundle_pem)
    assert bundle.roots_for("cluster.local") == (a.signing_cert, b.signing_cert)
    assert bundle.roots_for("other.td") == ()
    assert bundle.pem_for("cluster.local") == a.root_bundle_pem + b.root_bundle_pem


def test_merge_and_rotation(cas: tuple[CertificateAuthority, ...]) -> None:
    a, b, o = cas
    old = TrustBundle.from_pem("cluster.local", a.root_bundle_pem)
    merged = old.merge(TrustBundle.from_pem("cluster.local", b.root_bundle_pem)).merge(
        TrustBundle.from_pem("other.td", o.root_bundle_pem)
    )
    assert merged.roots_for("cluster.local") == (a.signing_cert, b.signing_cert)
    assert merged.trust_domains == {"cluster.local", "other.td"}
    dropped = merged.without("cluster.local", a.signing_cert)
    assert dropped.roots_for("cluster.local") == (b.signing_cert,)
    assert old.roots_for("cluster.local") == (a.signing_cert,)  # immutable
    assert dropped.without("other.td", o.signing_cert).trust_domains == {"cluster.local"}


def test_alias(cas: tuple[CertificateAuthority, ...]) -> None:
    a, _, o = cas
    bundle = TrustBundle.from_pem("cluster.local", a.root_bundle_pem).with_alias("old.td", "cluster.local")
    assert bundle.roots_for("old.td") == (a.signing_cert,)
    assert bundle.resolve("old.td") == "cluster.local"
    assert "old.td" in bundle.trust_domains
    with pytest.raises(BundleError, match="has roots of its own"):
        bundle.merge(TrustBundle.from_pem("other.td", o.root_bundle_pem)).with_alias(
            "other.td", "cluster.local"
        )
    with pytest.raises(BundleError, match="points at both"):
        bundle.merge(TrustBundle().with_alias("old.td", "other.td"))


def test_rejections(cas: tuple[CertificateAuthority, ...]) -> None:
    a, _, _ = cas
    leaf, _ = a.issue_with_key(SpiffeId.parse("spiffe://cluster.local/x"), NOW)
    with pytest.raises(BundleError, match="is not a CA"):
        TrustBundle.from_pem("cluster.local", leaf.leaf_pem)
    with pytest.raises(BundleError, match="not PEM certificates"):
        TrustBundle.from_pem("cluster.local", b"-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n")
    with pytest.raises(BundleError, match="holds no certificates"):
        TrustBundle.from_certs("cluster.local", [])
    with pytest.raises(SpiffeIdError, match="trust domain characters"):
        TrustBundle.from_pem("Bad.TD", a.root_bundle_pem)
