"""The mesh CA: root/intermediate shape, issuance per istio-ambient.md §3.3, plug-in CA loading checks.

Interop: openssl verifies what we issue (root and 3-tier), py-spiffe parses it as an X509-SVID.
"""

from __future__ import annotations

import itertools
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from zerotunnel.identity.ca import (
    CaError,
    CertificateAuthority,
    IssuedChain,
)
from zerotunnel.identity.csr import generate_key, make_csr
from zerotunnel.identity.spiffe import SpiffeId

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
SID = SpiffeId.istio("cluster.local", "default", "sleep")


@pytest.fixture(scope="module")
def root() -> CertificateAuthority:
    return CertificateAuthority.create_root("cluster.local", NOW)


@pytest.fixture(scope="module")
def three_tier(root: CertificateAuthority) -> CertificateAuthority:
    return CertificateAuthority.create_intermediate(CertificateAuthority.create_intermediate(root, NOW), NOW)


def _leaf(chain: IssuedChain) -> x509.Certificate:
    return x509.load_pem_x509_certificate(chain.leaf_pem)


def test_root_shape(root: CertificateAuthority) -> None:
    cert = root.signing_cert
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")])
    assert cert.issuer == cert.subject
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert cert.not_valid_after_utc - NOW == timedelta(days=3650)
    assert root.is_root and root.intermediates == () and root.roots == (cert,)


@pytest.mark.parametrize("key_type", ["rsa-2048"])
def test_rsa_root(key_type: str) -> None:
    ca = CertificateAuthority.create_root("example.org", NOW, key_type=key_type)
    chain = ca.issue(make_csr(SID, generate_key()), SID, NOW)
    assert _leaf(chain).signature_algorithm_oid == x509.SignatureAlgorithmOID.RSA_WITH_SHA256


def test_leaf_profile(root: CertificateAuthority) -> None:
    csr = make_csr(SpiffeId.parse("spiffe://cluster.local/ns/evil/sa/admin"), generate_key())
    with pytest.raises(CaError, match=r"authorised only for spiffe://cluster.local/ns/default/sa/sleep"):
        root.issue(csr, SID, NOW)
    chain = root.issue(make_csr(SID, generate_key()), SID, NOW)
    leaf = _leaf(chain)
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(str(SID))]
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
    assert not ku.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.not_valid_before_utc == NOW - timedelta(minutes=2)
    assert leaf.not_valid_after_utc == NOW + timedelta(hours=24)
    assert 0 < leaf.serial_number < 2**128
    leaf.verify_directly_issued_by(root.signing_cert)


def test_san_comes_from_identity_not_csr(root: CertificateAuthority) -> None:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    key = generate_key()
    csr = builder.sign(key, hashes.SHA256())
    chain = root.issue(csr.public_bytes(serialization.Encoding.PEM), SID, NOW)
    assert _leaf(chain).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier) == [str(SID)]


def test_serials_are_random(root: CertificateAuthority) -> None:
    serials = {_leaf(root.issue_with_key(SID, NOW)[0]).serial_number for _ in range(5)}
    assert len(serials) == 5


def test_ttl_rules(root: CertificateAuthority) -> None:
    csr = make_csr(SID, generate_key())
    assert _leaf(root.issue(csr, SID, NOW, timedelta(hours=1))).not_valid_after_utc == NOW + timedelta(
        hours=1
    )
    assert _leaf(root.issue(csr, SID, NOW, timedelta(0))).not_valid_after_utc == NOW + timedelta(hours=24)
    assert _leaf(root.issue(csr, SID, NOW, timedelta(days=90))).not_valid_after_utc == NOW + timedelta(
        days=90
    )
    with pytest.raises(CaError, match="requested TTL 91d is greater than the max allowed TTL 90d"):
        root.issue(csr, SID, NOW, timedelta(days=91))


def test_not_after_clamped_to_issuer(root: CertificateAuthority) -> None:
    short = CertificateAuthority.create_intermediate(root, NOW, ttl=timedelta(hours=3))
    leaf = _leaf(short.issue(make_csr(SID, generate_key()), SID, NOW))
    assert leaf.not_valid_after_utc == short.signing_cert.not_valid_after_utc == NOW + timedelta(hours=3)


def test_expired_ca_refuses(root: CertificateAuthority) -> None:
    short = CertificateAuthority.create_intermediate(root, NOW, ttl=timedelta(hours=3))
    with pytest.raises(CaError, match=r"expired at .*refusing to sign"):
        short.issue(make_csr(SID, generate_key()), SID, NOW + timedelta(hours=4))


def test_bad_csrs(root: CertificateAuthority) -> None:
    with pytest.raises(CaError, match="CSR is not a PEM certificate request"):
        root.issue(b"garbage", SID, NOW)
    good = x509.load_pem_x509_csr(make_csr(SID, generate_key()))
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF  # flip a byte inside the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CaError, match="CSR signature does not verify"):
        root.issue(tampered, SID, NOW)
    with pytest.raises(CaError, match="has no path"):
        root.issue(make_csr(SID, generate_key()), SpiffeId.parse("spiffe://cluster.local"), NOW)


def test_response_shape(three_tier: CertificateAuthority) -> None:
    chain, _key = three_tier.issue_with_key(SID, NOW)
    response = chain.as_cert_chain_response()
    assert len(response) == 4  # leaf, signing intermediate, middle intermediate, root bundle
    assert all(r.startswith("-----BEGIN CERTIFICATE-----") and r.endswith("\n") for r in response)
    certs = [x509.load_pem_x509_certificate(r.encode()) for r in response]
    for child, parent in itertools.pairwise(certs):
        child.verify_directly_issued_by(parent)
    assert response[-1].encode() == three_tier.root_bundle_pem


def test_from_pem_round_trip_and_checks(root: CertificateAuthority, three_tier: CertificateAuthority) -> None:
    def load(ca: CertificateAuthority, **override: bytes) -> CertificateAuthority:
        parts = {
            "signing_cert": ca.signing_cert_pem,
            "signing_key": ca.signing_key_pem(),
            "cert_chain": ca.cert_chain_pem,
            "root_certs": ca.root_bundle_pem,
        }
        parts.update(override)
        return CertificateAuthority.from_pem(now=NOW, **parts)

    loaded = load(three_tier)
    assert loaded.intermediates == three_tier.intermediates
    assert loaded.issue_with_key(SID, NOW)[0].intermediates_pem == three_tier.intermediates_pem
    assert load(root).is_root
    other = CertificateAuthority.create_root("cluster.local", NOW)
    with pytest.raises(CaError, match=r"ca-key.pem .* does not match ca-cert.pem"):
        load(three_tier, signing_key=other.signing_key_pem())
    with pytest.raises(CaError, match=r"cert-chain.pem does not reach root-cert.pem"):
        load(three_tier, root_certs=other.root_bundle_pem)
    with pytest.raises(CaError, match=r"cert-chain.pem does not link"):
        load(three_tier, cert_chain=three_tier.signing_cert_pem + other.signing_cert_pem)
    leaf_pem = root.issue_with_key(SID, NOW)
    with pytest.raises(CaError, match="is not a CA"):
        load(root, signing_cert=leaf_pem[0].leaf_pem, signing_key=leaf_pem[1])
    with pytest.raises(CaError, match="expired at"):
        CertificateAuthority.from_pem(
            signing_cert=root.signing_cert_pem,
            signing_key=root.signing_key_pem(),
            cert_chain=root.cert_chain_pem,
            root_certs=root.root_bundle_pem,
            now=NOW + timedelta(days=3651),
        )
    with pytest.raises(CaError, match=r"root-cert.pem .*no PEM certificate found"):
        load(root, root_certs=b"")
    with pytest.raises(CaError, match="not a self-signed CA"):
        load(three_tier, root_certs=three_tier.signing_cert_pem)
    assert "PRIVATE" not in repr(three_tier)


def _openssl_verify(tmp_path: Path, root_pem: bytes, chain: IssuedChain) -> subprocess.CompletedProcess[str]:
    (tmp_path / "root.pem").write_bytes(root_pem)
    (tmp_path / "leaf.pem").write_bytes(chain.leaf_pem)
    (tmp_path / "untrusted.pem").write_bytes(b"".join(chain.intermediates_pem) or root_pem)
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "untrusted.pem",
            "-purpose",
            "sslclient",
            "leaf.pem",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("tiers", [1, 2, 3])
def test_openssl_verify_accepts(tmp_path: Path, tiers: int) -> None:
    now = datetime.now(UTC)
    ca = CertificateAuthority.create_root("cluster.local", now)
    for _ in range(tiers - 1):
        ca = CertificateAuthority.create_intermediate(ca, now)
    chain, _ = ca.issue_with_key(SID, now)
    result = _openssl_verify(tmp_path, ca.root_bundle_pem, chain)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "leaf.pem: OK" in result.stdout
    other = CertificateAuthority.create_root("cluster.local", now)
    assert _openssl_verify(tmp_path, other.root_bundle_pem, chain).returncode != 0


def test_py_spiffe_parses_issued_svid(three_tier: CertificateAuthority) -> None:
    from spiffe import X509Svid

    now = datetime.now(UTC)
    ca = CertificateAuthority.create_intermediate(CertificateAuthority.create_root("cluster.local", now), now)
    chain, key_pem = ca.issue_with_key(SID, now)
    svid = X509Svid.parse(chain.chain_pem, key_pem)
    assert str(svid.spiffe_id) == str(SID)
    assert len(svid.cert_chain) == 2


def test_load_certs_refuses_a_bundle_cut_inside_a_block() -> None:
    """cryptography skips an unterminated PEM block, so a two-root bundle cut inside its second root
    would load as one root; load_certs refuses it and names the file."""
    from zerotunnel.identity.ca import load_certs

    now = datetime.now(UTC)
    pems = b"".join(CertificateAuthority.create_root("cluster.local", now).root_bundle_pem for _ in range(2))
    assert len(load_certs(pems, "root-cert.pem")) == 2
    with pytest.raises(CaError, match=r"root-cert\.pem: truncated PEM"):
        load_certs(pems[: len(pems) - 200], "root-cert.pem")
