"""External clients' certificates at the ingress gateway: the checks after the handshake, and XFCC.

istio-ambient.md §7.1/§7.3, security.md §1c. OpenSSL (stdlib `ssl`) checks during the handshake that
the client chain ends at one of the CAs in `ca.crt` (a bundle of several external CAs) and that it is
within its validity. Then, with `cryptography`: the leaf must not be a CA (stdlib accepts a CA
certificate as a client leaf, DESIGN.md §6), must be valid *now*, must carry clientAuth when it has an
EKU, must not be revoked by its issuer's CRL in `ca.crl` (a CRL counts only if its signature verifies
with that issuer's key), and one of its SANs must equal one of `subjectAltNames` when given (Envoy's
exact `match_subject_alt_names`, any SAN type). A CA without a CRL in `ca.crl` revokes nothing
(ztunnel's documented fail-open for unknown status, security.md §3).

XFCC (§7.3, gateway default SANITIZE_SET): the client's header is always dropped; when the client
presented a verified certificate the gateway sets `By` (its own SPIFFE ID), `Hash`, `Subject`, `URI`
and `DNS`. Cert-derived values are quoted as the format requires and left out when they contain
control characters, `"` or `\\` (CVE-2023-27493: a SAN must never inject header bytes or split the
element).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from zerotunnel.errors import ZerotunnelError
from zerotunnel.gateway.config import load_crls


class ClientCertRejected(ZerotunnelError):
    """The client's certificate is refused; `message` is the reason logged."""


@dataclass(frozen=True, slots=True)
class ClientCert:
    """A verified external client certificate."""

    cert: x509.Certificate
    issuer: x509.Certificate

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.cert.public_bytes(Encoding.DER)).hexdigest()

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()

    def sans(self) -> list[tuple[str, str]]:
        try:
            ext = self.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return []
        out: list[tuple[str, str]] = []
        for name in ext:
            if isinstance(name, x509.DNSName):
                out.append(("DNS", name.value))
            elif isinstance(name, x509.UniformResourceIdentifier):
                out.append(("URI", name.value))
            elif isinstance(name, x509.RFC822Name):
                out.append(("EMAIL", name.value))
            elif isinstance(name, x509.IPAddress):
                out.append(("IP", str(name.value)))
        return out


def _issuer(leaf: x509.Certificate, cas: list[x509.Certificate]) -> x509.Certificate | None:
    for ca in cas:
        if ca.subject != leaf.issuer:
            continue
        try:
            leaf.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return ca
    return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def verify_client_cert(
    leaf_der: bytes,
    ca_pem: bytes,
    crl_pem: bytes | None,
    subject_alt_names: tuple[str, ...],
    now: datetime,
) -> ClientCert:
    """The post-handshake checks; raises ClientCertRejected with the reason."""
    leaf = x509.load_der_x509_certificate(leaf_der)
    cas = x509.load_pem_x509_certificates(ca_pem)
    if _is_ca(leaf):
        raise ClientCertRejected("client certificate is a CA certificate, not a leaf")
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise ClientCertRejected(
            f"client certificate expired or not yet valid (valid {leaf.not_valid_before_utc}"
            f" to {leaf.not_valid_after_utc})"
        )
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise ClientCertRejected("client certificate lacks the clientAuth extended key usage")
    issuer = _issuer(leaf, cas)
    if issuer is None:
        raise ClientCertRejected(
            f"client certificate issuer {leaf.issuer.rfc4514_string()} is not a trusted CA"
        )
    if crl_pem:
        for crl in load_crls(crl_pem):
            if crl.issuer != issuer.subject:
                continue
            public_key = issuer.public_key()
            if not crl.is_signature_valid(public_key):  # type: ignore[arg-type]
                continue
            revoked = crl.get_revoked_certificate_by_serial_number(leaf.serial_number)
            if revoked is not None:
                raise ClientCertRejected(
                    f"client certificate serial {leaf.serial_number:x} is revoked by "
                    f"{issuer.subject.rfc4514_string()} (since {revoked.revocation_date_utc})"
                )
    client = ClientCert(leaf, issuer)
    if subject_alt_names:
        values = {v for _, v in client.sans()}
        if not values & set(subject_alt_names):
            raise ClientCertRejected(
                f"client certificate SANs {sorted(values)} match none of "
                f"subjectAltNames {list(subject_alt_names)}"
            )
    return client


def _safe(value: str) -> bool:
    """Printable ASCII without `"` or `\\`: quoting then never depends on how a reader treats
    backslashes (a value that would need them is left out rather than risk splitting the header)."""
    return all(0x20 <= ord(ch) < 0x7F and ch not in '"\\' for ch in value)


def _quote(value: str, *, always: bool = False) -> str:
    if always or any(ch in value for ch in ",;="):
        return f'"{value}"'
    return value


def xfcc(by: str | None, client: ClientCert) -> str:
    """One XFCC element (§7.3): `By`, `Hash`, `Subject` (quoted), `URI`, one `DNS` per DNS SAN."""
    parts: list[str] = []
    if by:
        parts.append(f"By={_quote(by)}")
    parts.append(f"Hash={client.sha256}")
    subject = client.subject
    if _safe(subject):
        parts.append(f"Subject={_quote(subject, always=True)}")
    sans = client.sans()
    uri = next((v for k, v in sans if k == "URI" and _safe(v)), None)
    if uri is not None:
        parts.append(f"URI={_quote(uri)}")
    for kind, value in sans:
        if kind == "DNS" and _safe(value):
            parts.append(f"DNS={_quote(value)}")
    return ";".join(parts)
