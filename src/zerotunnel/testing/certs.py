"""Certificate builders for tests: a real CA, real SVIDs, and deliberately bad certificates.

Good certificates come from the production CA (`zerotunnel.identity.ca`), so tests exercise what the
mesh really issues. Bad ones are built here with cryptography directly, because the production CA
must never be able to make them; each targets one rule of the X.509-SVID profile
(spec/users-spiffe-conventions.md §3.3) and names the `Reason` the verifier must give.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from zerotunnel.identity.ca import CertificateAuthority
from zerotunnel.identity.csr import PrivateKey, generate_key, private_key_pem, signature_hash
from zerotunnel.identity.spiffe import SpiffeId

BadKind = Literal[
    "ca-as-leaf",
    "two-uri-sans",
    "no-uri-san",
    "non-spiffe-uri",
    "expired",
    "not-yet-valid",
    "wrong-eku",
    "other-trust-domain",
    "other-root",
]

BAD_KINDS: tuple[BadKind, ...] = (
    "ca-as-leaf",
    "two-uri-sans",
    "no-uri-san",
    "non-spiffe-uri",
    "expired",
    "not-yet-valid",
    "wrong-eku",
    "other-trust-domain",
    "other-root",
)

# the verifier's Reason for each bad kind (zerotunnel.identity.verify.Reason values)
EXPECTED_REASON: dict[BadKind, str] = {
    "ca-as-leaf": "leaf-is-ca",
    "two-uri-sans": "multiple-uri-sans",
    "no-uri-san": "no-uri-san",
    "non-spiffe-uri": "non-spiffe-uri",
    "expired": "expired",
    "not-yet-valid": "not-yet-valid",
    "wrong-eku": "wrong-eku",
    "other-trust-domain": "wrong-trust-domain",
    "other-root": "unknown-root",
}

SvidFiles = tuple[bytes, bytes, tuple[bytes, ...]]
"""(leaf cert PEM, private key PEM, intermediate PEMs to send after the leaf; roots excluded)."""


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


def make_test_ca(
    td: str = "cluster.local", *, tiers: int = 1, key_type: str = "ec-p256", now: datetime | None = None
) -> CertificateAuthority:
    """A CA for trust domain `td`: `tiers=1` is a root, 2 adds an intermediate, 3 is root→int→int."""
    at = _now(now)
    ca = CertificateAuthority.create_root(td, at, key_type=key_type)
    for _ in range(tiers - 1):
        ca = CertificateAuthority.create_intermediate(ca, at, key_type=key_type)
    return ca


def issue_test_svid(
    ca: CertificateAuthority,
    spiffe_id: str | SpiffeId,
    ttl: timedelta = timedelta(hours=1),
    *,
    now: datetime | None = None,
) -> SvidFiles:
    """A real SVID from `ca`'s issuance path; the bundle to trust it is `ca.root_bundle_pem`."""
    identity = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
    chain, key_pem = ca.issue_with_key(identity, _now(now), ttl)
    return chain.leaf_pem, key_pem, chain.intermediates_pem


def build_leaf(
    issuer: CertificateAuthority,
    key: PrivateKey,
    *,
    uris: Sequence[str],
    dns: Sequence[str] = (),
    not_before: datetime,
    not_after: datetime,
    ca: bool = False,
    key_cert_sign: bool = False,
    ekus: Sequence[x509.ObjectIdentifier] | None = (
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ),
) -> x509.Certificate:
    """A leaf signed by `issuer` with exactly the given properties: the knob box for negative tests."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.signing_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=not ca,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign or ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    try:
        ski = issuer.signing_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    except x509.ExtensionNotFound:
        pass
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    if ekus is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
    return builder.sign(issuer.signing_key, signature_hash(issuer.signing_key))


def make_bad_svid(
    ca: CertificateAuthority,
    kind: BadKind,
    spiffe_id: str = "spiffe://cluster.local/ns/default/sa/bad",
    *,
    now: datetime | None = None,
) -> SvidFiles:
    """A certificate that breaks exactly one SVID rule, to be verified against `ca`'s roots.

    "other-trust-domain" and "other-root" are properly issued by a *different* CA (of trust domain
    `other.td`, resp. of the same trust domain) so only the trust decision can reject them.
    """
    at = _now(now)
    if kind == "other-trust-domain":
        other = make_test_ca("other.td", now=at)
        return issue_test_svid(other, "spiffe://other.td/ns/default/sa/bad", now=at)
    if kind == "other-root":
        other = make_test_ca(SpiffeId.parse(spiffe_id).trust_domain, now=at)
        return issue_test_svid(other, spiffe_id, now=at)
    key = generate_key()
    window = {"not_before": at - timedelta(minutes=2), "not_after": at + timedelta(hours=1)}
    uris: list[str] = [spiffe_id]
    extra: dict[str, object] = {}
    if kind == "ca-as-leaf":
        extra["ca"] = True
    elif kind == "two-uri-sans":
        uris.append(spiffe_id + "-twin")
    elif kind == "no-uri-san":
        uris = []
        extra["dns"] = ("bad.default.svc.cluster.local",)
    elif kind == "non-spiffe-uri":
        uris = ["https://cluster.local/ns/default/sa/bad"]
    elif kind == "expired":
        window = {"not_before": at - timedelta(hours=2), "not_after": at - timedelta(hours=1)}
    elif kind == "not-yet-valid":
        window = {"not_before": at + timedelta(hours=1), "not_after": at + timedelta(hours=2)}
    elif kind == "wrong-eku":
        extra["ekus"] = (ExtendedKeyUsageOID.EMAIL_PROTECTION,)
    leaf = build_leaf(ca, key, uris=uris, **window, **extra)  # type: ignore[arg-type]
    return leaf.public_bytes(serialization.Encoding.PEM), private_key_pem(key), ca.intermediates_pem
