"""The mesh CA: root and intermediate creation, plug-in CA loading, workload issuance from a CSR.

Issuance follows spec/istio-ambient.md §3.3 field by field so that a certificate from us and one from
istiod are interchangeable; §3.5 gives the self-signed root and the `cacerts` plug-in layout.
"""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from zerotunnel.errors import InputError
from zerotunnel.identity.csr import PrivateKey, generate_key, load_private_key, make_csr, signature_hash
from zerotunnel.identity.spiffe import SpiffeId

# What cryptography raises for certificates/CSRs whose fields parse lazily (found by fuzzing, see
# tests/reliability/test_fuzz.py and fuzz/corpus/*/finding-*): a malformed input, never a crash.
_MALFORMED = (ValueError, UnsupportedAlgorithm, x509.InvalidVersion, x509.DuplicateExtension,
              x509.UnsupportedGeneralNameType)

DEFAULT_ROOT_TTL = timedelta(days=3650)
DEFAULT_INTERMEDIATE_TTL = timedelta(days=5 * 365)
DEFAULT_WORKLOAD_TTL = timedelta(hours=24)
MAX_WORKLOAD_TTL = timedelta(days=90)
CLOCK_SKEW_GRACE = timedelta(minutes=2)


class CaError(InputError):
    """A CA that cannot be used (bad files, mismatched key, broken chain) or a request it refuses."""


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


_PEM_LINE = re.compile(rb"-----(BEGIN|END) ([A-Z0-9 ]+)-----")


def check_pem_framing(data: bytes, what: str) -> None:
    """Every `-----BEGIN X-----` closed by its `-----END X-----`, in order; CaError naming `what`.

    A file cut short inside a PEM block (a half-written copy, a crash mid-rotation) still parses as the
    blocks before the cut — `cryptography` skips an unterminated block silently — so a root bundle
    truncated inside its second root would load as a one-root bundle, and the nodes whose certificates
    chain to the lost root would be cut off (security.md §4 item 28). A cut exactly between two blocks
    is a well-formed shorter file and cannot be told from one.
    """
    open_label: bytes | None = None
    for match in _PEM_LINE.finditer(data):
        kind, label = match.group(1), match.group(2)
        if kind == b"BEGIN":
            if open_label is not None:
                raise CaError(f"{what}: truncated PEM: {open_label.decode()} block has no END line")
            open_label = label
        elif open_label != label:
            raise CaError(f"{what}: malformed PEM: END {label.decode()} without its BEGIN line")
        else:
            open_label = None
    if open_label is not None:
        raise CaError(f"{what}: truncated PEM: {open_label.decode()} block has no END line")


def load_certs(pem: bytes, what: str) -> list[x509.Certificate]:
    """Every certificate in a PEM blob; CaError naming `what` when there is none, one is malformed,
    or the blob is cut inside a block (`check_pem_framing`)."""
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise CaError(f"{what}: no PEM certificate found")
    check_pem_framing(pem, what)
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise CaError(f"{what}: malformed PEM certificate") from None
    return certs


def _describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not bc.ca:
        return False
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ku.key_cert_sign


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when `issuer`'s name is `cert`'s issuer and its key verifies `cert`'s signature."""
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _validity_problem(cert: x509.Certificate, now: datetime) -> str | None:
    if now < cert.not_valid_before_utc:
        return f"not valid before {cert.not_valid_before_utc.isoformat()}"
    if now > cert.not_valid_after_utc:
        return f"expired at {cert.not_valid_after_utc.isoformat()}"
    return None


def _serial() -> int:
    """A positive 128-bit random serial (§3.3); zero is re-drawn because RFC 5280 forbids it."""
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


def _ca_cert(
    *,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    issuer: x509.Certificate | None,
    issuer_key: PrivateKey,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(public_key)
        .serial_number(_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(_aki_for(issuer), critical=False)
    return builder.sign(issuer_key, signature_hash(issuer_key))


def _aki_for(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


@dataclass(frozen=True, slots=True)
class IssuedChain:
    """A signed workload certificate and what a peer needs to check it: leaf → intermediates → roots."""

    leaf_pem: bytes
    intermediates_pem: tuple[bytes, ...]
    roots_pem: bytes

    def as_cert_chain_response(self) -> list[str]:
        """IstioCertificateResponse.cert_chain (§3.2): leaf, each intermediate, then the whole root bundle."""
        return [
            self.leaf_pem.decode(),
            *(p.decode() for p in self.intermediates_pem),
            self.roots_pem.decode(),
        ]

    @property
    def chain_pem(self) -> bytes:
        """Leaf followed by intermediates: what a TLS endpoint presents."""
        return self.leaf_pem + b"".join(self.intermediates_pem)


class CertificateAuthority:
    """A signing certificate and key, the intermediates above it, and the root bundle (§3.5).

    `intermediates` runs from the signing cert's issuer up to (not including) the root; for a root CA
    it is empty and `signing_cert` is the root itself. The key is never part of repr().
    """

    __slots__ = (
        "_aki",
        "_chain_above",
        "_intermediates_pem",
        "_is_root",
        "_not_after",
        "_roots_pem",
        "intermediates",
        "roots",
        "signing_cert",
        "signing_key",
    )

    def __init__(
        self,
        signing_cert: x509.Certificate,
        signing_key: PrivateKey,
        intermediates: Sequence[x509.Certificate],
        roots: Sequence[x509.Certificate],
    ) -> None:
        self.signing_cert = signing_cert
        self.signing_key = signing_key
        self.intermediates = tuple(intermediates)
        self.roots = tuple(roots)
        self._aki = _aki_for(signing_cert)
        self._is_root = _pem(signing_cert) in {_pem(r) for r in self.roots}
        top = self.intermediates[-1] if self.intermediates else signing_cert
        issuing = () if self._is_root else tuple(r for r in self.roots if signed_by(top, r))[:1]
        self._chain_above: tuple[x509.Certificate, ...] = (*self.intermediates, *issuing)
        self._not_after = min(c.not_valid_after_utc for c in (signing_cert, *self._chain_above))
        self._roots_pem = b"".join(_pem(r) for r in self.roots)
        self._intermediates_pem: tuple[bytes, ...] = (
            () if self._is_root else (_pem(signing_cert), *(_pem(c) for c in self.intermediates))
        )

    def __repr__(self) -> str:
        return f"CertificateAuthority(signing_cert={_describe(self.signing_cert)!r}, roots={len(self.roots)})"

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def create_root(
        cls, trust_domain: str, now: datetime, key_type: str = "ec-p256", ttl: timedelta = DEFAULT_ROOT_TTL
    ) -> CertificateAuthority:
        """Self-signed root, subject `O=<trust domain>`, CA=true, certSign|cRLSign (§3.5)."""
        if ttl <= timedelta(0):
            raise CaError(f"CA TTL must be positive, got {ttl}")
        key = generate_key(key_type)
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)])
        cert = _ca_cert(
            subject=subject,
            public_key=key.public_key(),
            issuer=None,
            issuer_key=key,
            not_before=now - CLOCK_SKEW_GRACE,
            not_after=now + ttl,
        )
        return cls(cert, key, (), (cert,))

    @classmethod
    def create_intermediate(
        cls,
        parent: CertificateAuthority,
        now: datetime,
        key_type: str = "ec-p256",
        ttl: timedelta = DEFAULT_INTERMEDIATE_TTL,
    ) -> CertificateAuthority:
        """An intermediate signed by `parent` (the plug-in CA case), its lifetime clamped to the parent's.

        The subject keeps the parent's organisation and adds a unique CN, so no two CAs in one chain
        share a name (a shared name would make the chain look self-issued).
        """
        if ttl <= timedelta(0):
            raise CaError(f"CA TTL must be positive, got {ttl}")
        parent.check_usable(now)
        key = generate_key(key_type)
        orgs = parent.signing_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(orgs[0].value))] if orgs else []
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, f"Intermediate CA {secrets.token_hex(4)}"))
        cert = _ca_cert(
            subject=x509.Name(attrs),
            public_key=key.public_key(),
            issuer=parent.signing_cert,
            issuer_key=parent.signing_key,
            not_before=now - CLOCK_SKEW_GRACE,
            not_after=min(now + ttl, parent.not_after),
        )
        above = () if parent.is_root else (parent.signing_cert, *parent.intermediates)
        return cls(cert, key, above, parent.roots)

    @classmethod
    def from_pem(
        cls, *, signing_cert: bytes, signing_key: bytes, cert_chain: bytes, root_certs: bytes, now: datetime
    ) -> CertificateAuthority:
        """Load a plug-in CA (`ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`), checking it.

        Checks, each with its own message: the key matches the cert, the cert is a CA that is valid at
        `now`, every root is a self-signed CA, and the chain links signing cert → … → one of the roots.
        `cert_chain` may start with the signing cert and may end with the root, as Istio's does.
        """
        certs = load_certs(signing_cert, "ca-cert.pem (signing certificate)")
        if not certs:
            raise CaError("ca-cert.pem (signing certificate): no certificate found")
        cert = certs[0]
        key = load_private_key(signing_key, "ca-key.pem (signing key)")
        if _public_bytes(key.public_key()) != _public_bytes(cert.public_key()):
            raise CaError("ca-key.pem (signing key) does not match ca-cert.pem (signing certificate)")
        if not _is_ca(cert):
            raise CaError(
                f"ca-cert.pem: {_describe(cert)} is not a CA (basicConstraints CA=false or no keyCertSign)"
            )
        roots = load_certs(root_certs, "root-cert.pem (root bundle)")
        if not roots:
            raise CaError("root-cert.pem (root bundle): no certificate found")
        for root in roots:
            if not _is_ca(root) or not signed_by(root, root):
                raise CaError(f"root-cert.pem: {_describe(root)} is not a self-signed CA certificate")
        chain = load_certs(cert_chain, "cert-chain.pem (certificate chain)")
        root_ders = {_pem(r) for r in roots}
        if chain and _pem(chain[0]) == _pem(cert):
            chain = chain[1:]
        while chain and _pem(chain[-1]) in root_ders:
            chain = chain[:-1]
        links = [cert, *chain]
        for child, parent in itertools.pairwise(links):
            if not signed_by(child, parent):
                raise CaError(
                    f"cert-chain.pem does not link: {_describe(child)} is not signed by {_describe(parent)}"
                )
        top = links[-1]
        if not any(signed_by(top, root) for root in roots):
            raise CaError(f"cert-chain.pem does not reach root-cert.pem: no root signed {_describe(top)}")
        ca = cls(cert, key, chain, roots)
        ca.check_usable(now)
        return ca

    # -- state ----------------------------------------------------------------------------------

    @property
    def is_root(self) -> bool:
        return self._is_root

    @property
    def not_after(self) -> datetime:
        """Earliest expiry along signing cert → intermediates → issuing root: nothing we sign outlives it."""
        return self._not_after

    def check_usable(self, now: datetime) -> None:
        """Refuse to sign with a CA (or a CA above it) that is expired or not yet valid at `now` (§3.3)."""
        for cert in (self.signing_cert, *self._chain_above):
            problem = _validity_problem(cert, now)
            if problem:
                raise CaError(f"CA certificate {_describe(cert)} is {problem}; refusing to sign")

    @property
    def root_bundle_pem(self) -> bytes:
        """Every root, concatenated: the last element of a CreateCertificate response (§3.2)."""
        return self._roots_pem

    @property
    def signing_cert_pem(self) -> bytes:
        return _pem(self.signing_cert)

    @property
    def cert_chain_pem(self) -> bytes:
        """Istio's `cert-chain.pem`: signing cert, intermediates, then the root that issued them."""
        return b"".join(_pem(c) for c in (self.signing_cert, *self._chain_above))

    @property
    def intermediates_pem(self) -> tuple[bytes, ...]:
        """What a leaf we sign must be sent with: signing cert (unless it is the root) and the CAs above."""
        return self._intermediates_pem

    def signing_key_pem(self) -> bytes:
        """The signing key as unencrypted PKCS#8: only for writing `ca-key.pem` with mode 0600."""
        return self.signing_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    # -- issuance -------------------------------------------------------------------------------

    def issue(
        self, csr_pem: bytes, identity: SpiffeId, now: datetime, ttl: timedelta | None = None
    ) -> IssuedChain:
        """Sign a workload X.509-SVID for the *authorised* `identity` from a CSR (§3.3, security rule 7).

        The CSR contributes only its public key; its signature must verify. A CSR that asks for any
        other name than `identity` is refused rather than silently rewritten, so a confused client
        learns at once.
        """
        if identity.is_trust_domain_id:
            raise CaError(f"{identity} has no path; a workload SVID needs one (X509-SVID §3.3)")
        if ttl is None or ttl <= timedelta(0):
            ttl = DEFAULT_WORKLOAD_TTL
        if ttl > MAX_WORKLOAD_TTL:
            raise CaError(
                f"requested TTL {_fmt_td(ttl)} is greater than the max allowed TTL "
                f"{_fmt_td(MAX_WORKLOAD_TTL)}"
            )
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
            signature_ok = csr.is_signature_valid
            # parsed lazily: a malformed key or extension raises here, not at load (test_fuzz.py)
            public_key = csr.public_key()
            _ = csr.extensions
        except _MALFORMED as exc:
            raise CaError(f"CSR is not a PEM certificate request ({exc})") from None
        if not signature_ok:
            raise CaError("CSR signature does not verify")
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            if public_key.curve.name not in ("secp256r1", "secp384r1"):
                raise CaError(f"CSR key curve {public_key.curve.name} is not allowed (P-256 or P-384)")
        elif isinstance(public_key, rsa.RSAPublicKey):
            if public_key.key_size < 2048:
                raise CaError(f"CSR RSA key has {public_key.key_size} bits; at least 2048 are required")
        else:
            raise CaError(f"CSR key type {type(public_key).__name__} is not allowed (ECDSA or RSA)")
        _check_csr_names(csr, identity)
        self.check_usable(now)
        not_after = min(now + ttl, self.not_after)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.signing_cert.subject)
            .public_key(public_key)
            .serial_number(_serial())
            .not_valid_before(now - CLOCK_SKEW_GRACE)
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]), critical=True
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(self._aki, critical=False)
            .sign(self.signing_key, signature_hash(self.signing_key))
        )
        return IssuedChain(_pem(leaf), self._intermediates_pem, self._roots_pem)

    def issue_with_key(
        self, identity: SpiffeId, now: datetime, ttl: timedelta | None = None, key_type: str = "ec-p256"
    ) -> tuple[IssuedChain, bytes]:
        """Generate a key and CSR, issue, and return the chain and the key as PKCS#8 PEM."""
        key = generate_key(key_type)
        chain = self.issue(make_csr(identity, key), identity, now, ttl)
        return chain, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def _check_csr_names(csr: x509.CertificateSigningRequest, identity: SpiffeId) -> None:
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    names = list(san)
    if names and names != [x509.UniformResourceIdentifier(str(identity))]:
        asked = ", ".join(str(n.value) for n in names)
        raise CaError(f"CSR asks for [{asked}] but the caller is authorised only for {identity}")


def _public_bytes(key: object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _fmt_td(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
