"""Trust bundles: the roots each trust domain is verified against (spec/istio-ambient.md §3.5).

A trust domain may have several roots at once (root rotation is add-new → reissue → drop-old,
security.md rule 16), the mesh may trust other trust domains (several CAs), and a trust-domain alias
(`meshConfig.trustDomainAliases`) is verified with the roots of the domain it stands for. Which roots
verify a peer is picked by the *peer's* trust domain; an unknown trust domain has no roots at all
(users-spiffe-conventions.md §3.2: "no bundle → untrusted").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from zerotunnel.errors import InputError
from zerotunnel.identity.spiffe import SpiffeIdError, validate_trust_domain


class BundleError(InputError):
    """A bundle that cannot be built: no certificates, a non-CA root, a bad trust domain name."""


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _check_td(td: str) -> None:
    reason = validate_trust_domain(td)
    if reason:
        raise SpiffeIdError(f"spiffe://{td}", reason)


def _check_root(cert: x509.Certificate) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        name = cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"
        raise BundleError(
            f"trust bundle certificate {name} is not a CA (basicConstraints CA=true is required)"
        )


@dataclass(frozen=True, slots=True, eq=False)
class TrustBundle:
    """Roots per trust domain plus aliases (alias → the trust domain whose roots it uses)."""

    roots: Mapping[str, tuple[x509.Certificate, ...]] = field(default_factory=lambda: MappingProxyType({}))
    aliases: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_certs(cls, trust_domain: str, certs: Iterable[x509.Certificate]) -> TrustBundle:
        """A bundle for one trust domain; every cert must be a CA; duplicates are dropped."""
        _check_td(trust_domain)
        unique: dict[bytes, x509.Certificate] = {}
        for cert in certs:
            _check_root(cert)
            unique.setdefault(_der(cert), cert)
        if not unique:
            raise BundleError(f"trust bundle for {trust_domain} holds no certificates")
        return cls(MappingProxyType({trust_domain: tuple(unique.values())}))

    @classmethod
    def from_pem(cls, trust_domain: str, pem: bytes) -> TrustBundle:
        """Parse a PEM bundle (one or more roots, e.g. `root-cert.pem`) for `trust_domain`."""
        try:
            certs = x509.load_pem_x509_certificates(pem)
        except ValueError as exc:
            raise BundleError(f"trust bundle for {trust_domain}: not PEM certificates ({exc})") from None
        return cls.from_certs(trust_domain, certs)

    def merge(self, other: TrustBundle) -> TrustBundle:
        """The union: roots of a trust domain in both are combined (rotation overlap), aliases too."""
        roots: dict[str, tuple[x509.Certificate, ...]] = dict(self.roots)
        for td, certs in other.roots.items():
            seen = {_der(c) for c in roots.get(td, ())}
            roots[td] = roots.get(td, ()) + tuple(c for c in certs if _der(c) not in seen)
        aliases = dict(self.aliases)
        for alias, target in other.aliases.items():
            if aliases.get(alias, target) != target:
                raise BundleError(f"trust domain alias {alias} points at both {aliases[alias]} and {target}")
            aliases[alias] = target
        return TrustBundle(MappingProxyType(roots), MappingProxyType(aliases))

    def with_alias(self, alias: str, trust_domain: str) -> TrustBundle:
        """Treat `alias` as another name of `trust_domain`: its IDs verify with `trust_domain`'s roots."""
        _check_td(alias)
        _check_td(trust_domain)
        if alias == trust_domain:
            return self
        if alias in self.roots:
            raise BundleError(f"{alias} has roots of its own and cannot also be an alias of {trust_domain}")
        return self.merge(TrustBundle(aliases=MappingProxyType({alias: trust_domain})))

    def without(self, trust_domain: str, cert: x509.Certificate) -> TrustBundle:
        """Drop one root (the last step of a root rotation)."""
        drop = _der(cert)
        roots = dict(self.roots)
        kept = tuple(c for c in roots.get(trust_domain, ()) if _der(c) != drop)
        if kept:
            roots[trust_domain] = kept
        else:
            roots.pop(trust_domain, None)
        return TrustBundle(MappingProxyType(roots), self.aliases)

    def resolve(self, trust_domain: str) -> str:
        """The trust domain whose roots verify `trust_domain` (itself unless it is an alias)."""
        return self.aliases.get(trust_domain, trust_domain)

    def roots_for(self, trust_domain: str) -> tuple[x509.Certificate, ...]:
        """The roots that verify an ID in `trust_domain`; () when the mesh does not trust it."""
        return self.roots.get(self.resolve(trust_domain), ())

    @property
    def trust_domains(self) -> frozenset[str]:
        """Every trust domain this bundle verifies, aliases included."""
        return frozenset(self.roots) | frozenset(a for a, t in self.aliases.items() if t in self.roots)

    def pem_for(self, trust_domain: str) -> bytes:
        """The roots of `trust_domain` as concatenated PEM (a `root-cert.pem`)."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.roots_for(trust_domain))
