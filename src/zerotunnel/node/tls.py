"""TLS for HBONE: contexts built from PEM bytes in memory, and the post-handshake re-verification.

spec/istio-ambient.md §1.6-1.7 and security.md rules 2-6: TLS 1.3 only, AES-GCM suites only, ALPN
`h2`, no SNI, no session tickets, client certificate mandatory. OpenSSL (through stdlib `ssl`)
checks the chain during the handshake, but it accepts a CA certificate as a client leaf and knows
nothing of SPIFFE (DESIGN.md §6), so every handshake is followed by `verify_peer` with
`cryptography`: the leaf profile, the path, then the trust domain (server side, aliases honoured —
an improvement on Istio, §10.9) or the expected identities (client side, §1.7).

Private keys never touch a file system: `ssl` only loads keys from a path, so the key goes into an
anonymous `memfd` read through `/proc/self/fd/N` and closed at once (security.md rule 17).
"""

from __future__ import annotations

import _ssl
import contextlib
import ctypes
import os
import ssl
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509

from zerotunnel.errors import ZerotunnelError
from zerotunnel.identity.bundle import TrustBundle
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.identity.verify import VerificationError, VerifiedPeer, verify_peer

ALPN_H2 = "h2"
TLS13_SUITES = "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"


class TlsIdentityError(ZerotunnelError):
    """The peer finished the handshake but is not who we accept; the connection is dropped.

    Client side the text is Istio's: `identity verification error: peer did not present the
    expected SAN (...), got ...` (spec/istio-ambient.md §8.2); flag IDENTITY_ERROR (§8.1)."""

    response_flag = "IDENTITY_ERROR"

    def __init__(self, message: str, *, reason: str = "identity", response_flag: str | None = None) -> None:
        super().__init__(message, response_flag=response_flag)
        self.reason = reason  # a short, bounded label for metrics (a verify Reason value or similar)


@dataclass(frozen=True, slots=True)
class WorkloadCredentials:
    """One identity's certificate material as the certificate manager hands it over (PEM bytes)."""

    identity: SpiffeId
    chain_pem: bytes  # leaf then intermediates, what we present
    key_pem: bytes
    bundle: TrustBundle
    intermediates: tuple[x509.Certificate, ...] = field(default=())

    @classmethod
    def from_pem(
        cls, identity: SpiffeId, chain_pem: bytes, key_pem: bytes, bundle: TrustBundle
    ) -> WorkloadCredentials:
        certs = x509.load_pem_x509_certificates(chain_pem)
        return cls(identity, chain_pem, key_pem, bundle, tuple(certs[1:]))

    not_after: datetime = field(init=False, compare=False)
    """The leaf's NotAfter, parsed once: the node proxy checks it on every new tunnel."""

    def __post_init__(self) -> None:
        leaf = x509.load_pem_x509_certificates(self.chain_pem)[0]
        object.__setattr__(self, "not_after", leaf.not_valid_after_utc)

    def roots_pem(self) -> str:
        return "".join(self.bundle.pem_for(td).decode() for td in sorted(self.bundle.roots))

    def __repr__(self) -> str:
        return f"WorkloadCredentials({self.identity})"


def _load_chain_and_key(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """`load_cert_chain` wants a path: hand it an anonymous memory file, never a disk file."""
    blob = chain_pem + b"\n" + key_pem
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("zt-svid", os.MFD_CLOEXEC)
        try:
            os.write(fd, blob)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    # Portable fallback: a 0600 file in a fresh 0700 directory, removed before we return.
    with tempfile.TemporaryDirectory(prefix="zt-") as tmp:
        path = os.path.join(tmp, "svid.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, blob)
        finally:
            os.close(fd)
        try:
            ctx.load_cert_chain(path)
        finally:
            os.unlink(path)


def _restrict_tls13_suites(ctx: ssl.SSLContext) -> None:
    """Python < 3.13 has no API for TLS 1.3 suites; call OpenSSL's `SSL_CTX_set_ciphersuites` on
    the context's `SSL_CTX*` (the first field after the object header) and check that it took."""
    try:
        lib = ctypes.CDLL(_ssl.__file__)
        setter = lib.SSL_CTX_set_ciphersuites
    except (OSError, AttributeError):
        return
    setter.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    setter.restype = ctypes.c_int
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        return
    setter(ptr, TLS13_SUITES.encode())
    names = {c["name"] for c in ctx.get_ciphers() if c.get("protocol") == "TLSv1.3"}
    if names - set(TLS13_SUITES.split(":")):
        raise ZerotunnelError(f"could not restrict TLS 1.3 cipher suites (have {sorted(names)})")


def _base_context(purpose: int, creds: WorkloadCredentials) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols([ALPN_H2])
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=creds.roots_pem())
    _load_chain_and_key(ctx, creds.chain_pem, creds.key_pem)
    _restrict_tls13_suites(ctx)
    return ctx


def update_context(ctx: ssl.SSLContext, creds: WorkloadCredentials) -> None:
    """Rotate a live context in place (new handshakes use the new cert; roots are added). Removed
    roots are still enforced: the post-handshake re-verification uses `creds.bundle` only."""
    ctx.load_verify_locations(cadata=creds.roots_pem())
    _load_chain_and_key(ctx, creds.chain_pem, creds.key_pem)


def server_context(creds: WorkloadCredentials) -> ssl.SSLContext:
    """15008's context (§1.6): client cert mandatory, no session tickets at all (rule 5)."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, creds)
    ctx.num_tickets = 0
    return ctx


def client_context(creds: WorkloadCredentials) -> ssl.SSLContext:
    """Outbound HBONE context (§1.6): no hostname check (identity is checked after the handshake)
    and no SNI — callers pass `server_hostname=""` to asyncio."""
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, creds)
    ctx.check_hostname = False
    return ctx


def peer_certificates(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> tuple[bytes, list[bytes]]:
    """The peer's leaf (DER) and whatever intermediates the ssl module can show us.

    Python 3.13 exposes the chain the peer sent; 3.11 only the leaf, so the caller adds the
    intermediates of our own mesh CA as candidates (cryptography still builds and checks the path).
    """
    leaf = ssl_object.getpeercert(binary_form=True)
    if not leaf:
        raise TlsIdentityError(
            "tls error: peer presented no certificate", reason="no-certificate", response_flag="TLS_FAILURE"
        )
    extra: list[bytes] = []
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is not None:
        with contextlib.suppress(Exception):
            for cert in getter() or []:
                der = cert if isinstance(cert, bytes) else cert.public_bytes(_ssl.ENCODING_DER)
                if der != leaf:
                    extra.append(der)
    return leaf, extra


def _check_alpn(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> None:
    if ssl_object.selected_alpn_protocol() != ALPN_H2:
        raise TlsIdentityError(
            "tls error: peer did not negotiate ALPN h2", reason="alpn", response_flag="TLS_FAILURE"
        )


def _intermediates(creds: WorkloadCredentials, extra: Sequence[bytes]) -> list[x509.Certificate | bytes]:
    return [*extra, *creds.intermediates]


def verify_client_peer(
    ssl_object: ssl.SSLObject | ssl.SSLSocket, creds: WorkloadCredentials, now: datetime
) -> VerifiedPeer:
    """Server side (§1.6): a valid SVID of our own trust domain (or an alias of it). Authorization
    decides the rest, using the identity returned here (§1.7: the peer leaf's SPIFFE URI SAN)."""
    _check_alpn(ssl_object)
    leaf, extra = peer_certificates(ssl_object)
    try:
        peer = verify_peer(leaf, _intermediates(creds, extra), creds.bundle, now, None, peer_role="client")
    except VerificationError as exc:
        raise TlsIdentityError(
            f"tls error: {exc.message}", reason=str(exc.reason), response_flag="TLS_FAILURE"
        ) from None
    ours = creds.bundle.resolve(creds.identity.trust_domain)
    if creds.bundle.resolve(peer.spiffe_id.trust_domain) != ours:
        raise TlsIdentityError(
            f"tls error: peer did not present the expected trustdomain ({creds.identity.trust_domain}), "
            f"got {peer.spiffe_id.trust_domain}",
            reason="wrong-trust-domain",
            response_flag="TLS_FAILURE",
        )
    return peer


def verify_server_peer(
    ssl_object: ssl.SSLObject | ssl.SSLSocket,
    creds: WorkloadCredentials,
    expected: Collection[SpiffeId],
    now: datetime,
) -> VerifiedPeer:
    """Client side (§1.7): a valid SVID whose identity is exactly one of `expected`."""
    _check_alpn(ssl_object)
    leaf, extra = peer_certificates(ssl_object)
    try:
        peer = verify_peer(leaf, _intermediates(creds, extra), creds.bundle, now, None, peer_role="server")
    except VerificationError as exc:
        raise TlsIdentityError(
            f"tls error: {exc.message}", reason=str(exc.reason), response_flag="TLS_FAILURE"
        ) from None
    if peer.spiffe_id not in expected:
        wanted = ", ".join(sorted(str(i) for i in expected))
        raise TlsIdentityError(
            f"identity verification error: peer did not present the expected SAN ({wanted}), "
            f"got {peer.spiffe_id}",
            reason="unexpected-identity",
        )
    return peer
