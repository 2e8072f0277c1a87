"""Verify a peer's X.509-SVID: RFC 5280 path validation plus the SPIFFE leaf rules.

Path building and validation are cryptography's (`cryptography.x509.verification`, the webpki
profile); we never write our own. Around it we check what path validation alone does not
(spec/users-spiffe-conventions.md §3.3, spec/security.md §1c and rules 2-4): exactly one URI SAN, which
is a valid SPIFFE ID with a path; the leaf is not a CA; key usage and EKU fit the peer's TLS role; the
trust domain picks the roots. The leaf rules run *before* path validation, so a rejected peer is told
the specific rule (tests assert each `Reason`), and a failed path is diagnosed afterwards (unknown root
versus broken chain versus an expired CA) by walking the chain ourselves.

SPIFFE leaves have no DNS name, so the workload path uses cryptography's client verifier (no
name matching) and, for the server role, swaps its clientAuth EKU check for serverAuth.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    Subject,
)
from cryptography.x509.verification import VerificationError as _PathError

from zerotunnel.errors import ZerotunnelError
from zerotunnel.identity.bundle import TrustBundle
from zerotunnel.identity.ca import signed_by
from zerotunnel.identity.spiffe import SpiffeId, SpiffeIdError

# What cryptography raises for certificates/CSRs whose fields parse lazily (found by fuzzing, see
# tests/reliability/test_fuzz.py and fuzz/corpus/*/finding-*): a malformed input, never a crash.
_MALFORMED = (ValueError, UnsupportedAlgorithm, x509.InvalidVersion, x509.DuplicateExtension,
              x509.UnsupportedGeneralNameType)

PeerRole = Literal["client", "server"]
"""The TLS role of the peer being verified: a server checks a `client` peer (needs clientAuth)."""

DEFAULT_MAX_CHAIN_DEPTH = 8
"""Caps path building (security.md §1c: path-depth exhaustion); root→int→int→leaf needs 2."""


class Reason(StrEnum):
    """Why a peer certificate was rejected; stable strings that logs, metrics and tests use."""

    MALFORMED = "malformed-certificate"
    LEAF_IS_CA = "leaf-is-ca"
    BAD_KEY_USAGE = "bad-key-usage"
    NO_URI_SAN = "no-uri-san"
    MULTIPLE_URI_SANS = "multiple-uri-sans"
    NON_SPIFFE_URI = "non-spiffe-uri"
    INVALID_SPIFFE_ID = "invalid-spiffe-id"
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"
    WRONG_EKU = "wrong-eku"
    WRONG_TRUST_DOMAIN = "wrong-trust-domain"
    UNKNOWN_ROOT = "unknown-root"
    BROKEN_CHAIN = "broken-chain"
    PATH_VALIDATION = "path-validation-failed"
    UNEXPECTED_ID = "unexpected-identity"


class VerificationError(ZerotunnelError):
    """A peer certificate we do not accept; `reason` is a `Reason` value, the message says why exactly."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason}: {message}", status=401)
        self.reason: str = reason
        self.detail = message


@dataclass(frozen=True, slots=True)
class VerifiedPeer:
    """An authenticated peer: its identity, leaf, expiry and the validated chain (leaf first, root last)."""

    spiffe_id: SpiffeId
    leaf: x509.Certificate
    not_after: datetime
    chain: tuple[x509.Certificate, ...] = ()


def _describe(cert: x509.Certificate) -> str:
    subject = cert.subject.rfc4514_string()
    return f"'{subject}'" if subject else f"serial {cert.serial_number:x}"


def load_cert_list(data: x509.Certificate | bytes, what: str) -> list[x509.Certificate]:
    """Certificates from an object, PEM (one or several) or DER; VerificationError when malformed."""
    if isinstance(data, x509.Certificate):
        return [data]
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise VerificationError(Reason.MALFORMED, f"{what} is not a certificate ({exc})") from None


# -- path validation (cryptography) ----------------------------------------------------------------


def _ee_server_eku(_policy: Policy, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
    if eku is not None and ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        raise ValueError("required EKU serverAuth not found")


def _ca_server_eku(_policy: Policy, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
    if eku is not None and not {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    } & set(eku):
        raise ValueError("CA certificate's EKU permits neither serverAuth nor anyExtendedKeyUsage")


def validate_path(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: datetime,
    *,
    peer_role: PeerRole = "client",
    server_name: Subject | None = None,
    max_chain_depth: int | None = DEFAULT_MAX_CHAIN_DEPTH,
) -> list[x509.Certificate]:
    """RFC 5280 / webpki path validation by cryptography; returns leaf → … → trust anchor.

    This is the one path validator the mesh uses; tests/test_limbo.py runs x509-limbo through it.
    `server_name` (DNS or IP) adds hostname matching for a `server` peer that has one; SPIFFE peers
    are checked without it. Raises cryptography's VerificationError (or ValueError for a bad name).
    """
    builder = PolicyBuilder().store(Store(list(roots))).time(now)
    if max_chain_depth is not None:
        builder = builder.max_chain_depth(max_chain_depth)
    if peer_role == "server" and server_name is not None:
        return builder.build_server_verifier(server_name).verify(leaf, list(intermediates))
    if peer_role == "server":
        builder = builder.extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca().may_be_present(
                x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _ca_server_eku
            ),
            ee_policy=ExtensionPolicy.webpki_defaults_ee().may_be_present(
                x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _ee_server_eku
            ),
        )
    return builder.build_client_verifier().verify(leaf, list(intermediates)).chain


# -- SVID leaf profile (§3.3) -----------------------------------------------------------------------


def svid_identity(leaf: x509.Certificate) -> SpiffeId:
    """The one SPIFFE ID in `leaf`'s URI SANs, or the reason there is not exactly one (security rule 2)."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise VerificationError(Reason.NO_URI_SAN, "leaf has no subjectAltName extension") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        raise VerificationError(Reason.NO_URI_SAN, "leaf has no URI SAN")
    if len(uris) > 1:
        raise VerificationError(
            Reason.MULTIPLE_URI_SANS, f"leaf has {len(uris)} URI SANs; an X509-SVID has exactly one"
        )
    uri = uris[0]
    if uri.partition(":")[0].lower() != "spiffe":
        raise VerificationError(Reason.NON_SPIFFE_URI, f"leaf URI SAN {uri!r} is not a spiffe:// URI")
    try:
        identity = SpiffeId.parse(uri)
    except SpiffeIdError as exc:
        raise VerificationError(Reason.INVALID_SPIFFE_ID, exc.message) from None
    if identity.is_trust_domain_id:
        raise VerificationError(Reason.INVALID_SPIFFE_ID, f"leaf SPIFFE ID {uri} has no path")
    return identity


def _check_leaf_profile(leaf: x509.Certificate, peer_role: PeerRole) -> None:
    exts = leaf.extensions
    try:
        if exts.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise VerificationError(Reason.LEAF_IS_CA, "leaf has basicConstraints CA=true")
    except x509.ExtensionNotFound:
        pass
    try:
        ku = exts.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise VerificationError(Reason.BAD_KEY_USAGE, "leaf has no keyUsage extension") from None
    if ku.key_cert_sign or ku.crl_sign:
        raise VerificationError(Reason.LEAF_IS_CA, "leaf key usage asserts keyCertSign or cRLSign")
    if not ku.digital_signature:
        raise VerificationError(Reason.BAD_KEY_USAGE, "leaf key usage lacks digitalSignature")
    try:
        eku = exts.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    wanted = ExtendedKeyUsageOID.CLIENT_AUTH if peer_role == "client" else ExtendedKeyUsageOID.SERVER_AUTH
    if wanted not in eku:
        have = ", ".join(getattr(oid, "_name", oid.dotted_string) for oid in eku) or "none"
        raise VerificationError(
            Reason.WRONG_EKU, f"a {peer_role} peer needs EKU {wanted._name}; the leaf has {have}"
        )


def _check_validity(cert: x509.Certificate, now: datetime, what: str) -> None:
    if now < cert.not_valid_before_utc:
        raise VerificationError(
            Reason.NOT_YET_VALID, f"{what} is not valid before {cert.not_valid_before_utc.isoformat()}"
        )
    if now > cert.not_valid_after_utc:
        raise VerificationError(Reason.EXPIRED, f"{what} expired at {cert.not_valid_after_utc.isoformat()}")


def _diagnose(
    leaf: x509.Certificate,
    *,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: datetime,
    trust_domain: str,
    error: Exception,
) -> VerificationError:
    """Turn a failed path into the most specific reason by walking leaf → issuer ourselves."""
    current, used = leaf, set[int]()
    for _ in range(len(intermediates) + 1):
        anchor = next((r for r in roots if signed_by(current, r)), None)
        if anchor is not None:
            break
        nxt = next((c for i, c in enumerate(intermediates) if i not in used and signed_by(current, c)), None)
        if nxt is None:
            if any(c.subject == current.issuer for c in intermediates):
                return VerificationError(
                    Reason.BROKEN_CHAIN,
                    f"the signature on {_describe(current)} does not "
                    f"verify with the key of its named issuer {current.issuer.rfc4514_string()!r}",
                )
            if any(r.subject == current.issuer for r in roots):
                # Every Istio root of a trust domain is named `O=<td>`: a same-named root whose key
                # does not verify is another CA, not a damaged chain.
                return VerificationError(
                    Reason.UNKNOWN_ROOT,
                    f"{_describe(current)} was signed by a CA named {current.issuer.rfc4514_string()!r} "
                    f"whose key is not among the roots trusted for {trust_domain}",
                )
            if signed_by(current, current):
                return VerificationError(
                    Reason.UNKNOWN_ROOT,
                    f"the chain ends at self-signed {_describe(current)}, "
                    f"which is not a root trusted for {trust_domain}",
                )
            if len(used) < len(intermediates):
                return VerificationError(
                    Reason.BROKEN_CHAIN,
                    f"no certificate issued {_describe(current)} (issuer "
                    f"{current.issuer.rfc4514_string()!r}); the intermediates sent do not link",
                )
            return VerificationError(
                Reason.UNKNOWN_ROOT,
                f"issuer {current.issuer.rfc4514_string()!r} of "
                f"{_describe(current)} is not a root trusted for {trust_domain}",
            )
        used.add(intermediates.index(nxt))
        try:
            _check_validity(nxt, now, f"intermediate {_describe(nxt)}")
        except VerificationError as exc:
            return exc
        current = nxt
    else:
        return VerificationError(Reason.BROKEN_CHAIN, "the intermediates sent do not reach a trusted root")
    try:
        _check_validity(anchor, now, f"root {_describe(anchor)}")
    except VerificationError as exc:
        return exc
    return VerificationError(Reason.PATH_VALIDATION, str(error))


def _check_ca_trust_domains(
    chain: Sequence[x509.Certificate], trust_domain: str, bundle: TrustBundle
) -> None:
    """A CA that names a SPIFFE trust domain (§3.3: an ID without path) must name the peer's."""
    for cert in chain[1:]:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            continue
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if not uri.startswith("spiffe://"):
                continue
            try:
                ca_td = SpiffeId.parse(uri).trust_domain
            except SpiffeIdError:
                raise VerificationError(
                    Reason.INVALID_SPIFFE_ID, f"CA {_describe(cert)} has bad URI SAN {uri!r}"
                ) from None
            if bundle.resolve(ca_td) != bundle.resolve(trust_domain):
                raise VerificationError(
                    Reason.WRONG_TRUST_DOMAIN,
                    f"CA {_describe(cert)} belongs to {ca_td}, the peer claims {trust_domain}",
                )


def verify_peer(
    leaf: x509.Certificate | bytes,
    intermediates: Sequence[x509.Certificate | bytes],
    bundle: TrustBundle,
    now: datetime,
    expected_ids: Collection[SpiffeId] | None = None,
    *,
    peer_role: PeerRole = "client",
) -> VerifiedPeer:
    """Authenticate a peer from its leaf and the intermediates it sent, at `now`.

    `peer_role` is the TLS role of the peer: "client" when we are the server (its leaf needs
    clientAuth), "server" when we dialled it. `expected_ids` (None = any identity) is the set the
    caller will accept, e.g. the destination's identities on an outbound connection. Raises
    VerificationError with a `Reason`.

    cryptography parses extensions lazily, so a certificate that loads can still raise ValueError
    when its SAN or key usage is read (found by tests/reliability/test_fuzz.py): that is a
    MALFORMED refusal like any other, never an exception escaping into the TLS shell.
    """
    try:
        return _verify_peer(leaf, intermediates, bundle, now, expected_ids, peer_role)
    except _MALFORMED as exc:
        raise VerificationError(Reason.MALFORMED, f"malformed certificate ({exc})") from None


def _verify_peer(
    leaf: x509.Certificate | bytes,
    intermediates: Sequence[x509.Certificate | bytes],
    bundle: TrustBundle,
    now: datetime,
    expected_ids: Collection[SpiffeId] | None,
    peer_role: PeerRole,
) -> VerifiedPeer:
    leaf_cert = load_cert_list(leaf, "leaf")
    if len(leaf_cert) != 1:
        raise VerificationError(Reason.MALFORMED, f"expected one leaf certificate, got {len(leaf_cert)}")
    cert = leaf_cert[0]
    chain_in = [c for i, item in enumerate(intermediates) for c in load_cert_list(item, f"intermediate {i}")]
    _check_leaf_profile(cert, peer_role)
    identity = svid_identity(cert)
    _check_validity(cert, now, "leaf")
    roots = bundle.roots_for(identity.trust_domain)
    if not roots:
        trusted = ", ".join(sorted(bundle.trust_domains)) or "none"
        raise VerificationError(
            Reason.WRONG_TRUST_DOMAIN,
            f"trust domain {identity.trust_domain} is not trusted (trusted: {trusted})",
        )
    try:
        chain = validate_path(cert, chain_in, roots, now, peer_role=peer_role)
    except (_PathError, ValueError) as exc:
        raise _diagnose(
            cert, intermediates=chain_in, roots=roots, now=now, trust_domain=identity.trust_domain, error=exc
        ) from None
    _check_ca_trust_domains(chain, identity.trust_domain, bundle)
    if expected_ids is not None and identity not in expected_ids:
        wanted = ", ".join(sorted(str(i) for i in expected_ids)) or "none"
        raise VerificationError(Reason.UNEXPECTED_ID, f"peer is {identity}, expected one of: {wanted}")
    return VerifiedPeer(identity, cert, cert.not_valid_after_utc, tuple(chain))
