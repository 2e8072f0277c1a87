"""`zerotunnel ca`: create, use and inspect a mesh CA from the command line (issue 2, "CLI").

Exit status: 0 success (for `verify`: the certificate is valid), 1 `verify` found the certificate
invalid (the reason is printed), 2 bad input: one line on stderr naming what is wrong (raised as
InputError and printed by `zerotunnel.cli.main`). Nothing is half-written on failure (castore).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from zerotunnel.control import castore
from zerotunnel.errors import InputError
from zerotunnel.identity.bundle import TrustBundle
from zerotunnel.identity.ca import MAX_WORKLOAD_TTL, signed_by
from zerotunnel.identity.csr import KEY_TYPES, key_type_of
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.identity.verify import VerificationError, svid_identity, verify_peer

_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_EKU_NAMES = {
    "1.3.6.1.5.5.7.3.1": "serverAuth",
    "1.3.6.1.5.5.7.3.2": "clientAuth",
    "1.3.6.1.5.5.7.3.3": "codeSigning",
    "1.3.6.1.5.5.7.3.4": "emailProtection",
    "2.5.29.37.0": "anyExtendedKeyUsage",
}
_KU_FIELDS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
)


def parse_duration(text: str) -> timedelta:
    """`30m`, `24h`, `90d`, `3600s` (one number and one unit) → timedelta; InputError otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise InputError(f"--ttl {text!r}: expected a number and a unit, e.g. 3600s, 30m, 24h or 90d")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise InputError(f"--ttl {text!r}: must be positive")
    return timedelta(seconds=seconds)


def _now() -> datetime:
    return datetime.now(UTC)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{what} {path}: no such file") from None
    except OSError as exc:
        raise InputError(f"{what} {path}: {exc.strerror}") from None


def _certs(path: str, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        certs = (
            x509.load_pem_x509_certificates(data)
            if b"-----BEGIN" in data
            else [x509.load_der_x509_certificate(data)]
        )
    except ValueError:
        raise InputError(f"{what} {path}: not a PEM or DER certificate") from None
    return certs


@click.group()
def ca() -> None:
    """Manage the mesh CA: Istio `cacerts` layout, SPIFFE X.509-SVIDs."""


@ca.command("init")
@click.option("--dir", "directory", required=True, type=click.Path(), help="CA directory to create.")
@click.option("--trust-domain", default=None, help="Root CA trust domain (default cluster.local).")
@click.option("--key-type", type=click.Choice(KEY_TYPES), default="ec-p256", show_default=True)
@click.option("--ttl", default=None, help="CA lifetime, e.g. 3650d (root default 10 years).")
@click.option(
    "--intermediate-of",
    "parent",
    type=click.Path(),
    default=None,
    help="Make an intermediate signed by the CA in this directory (plug-in CA).",
)
def init(
    directory: str, trust_domain: str | None, key_type: str, ttl: str | None, parent: str | None
) -> None:
    """Create a root CA (or, with --intermediate-of, an intermediate) in Istio's cacerts layout."""
    lifetime = parse_duration(ttl) if ttl else None
    if parent is not None and trust_domain is not None:
        raise InputError("--trust-domain applies to a root; an intermediate keeps its parent's trust domain")
    trust_domain = trust_domain or "cluster.local"
    SpiffeId(trust_domain, "")  # validates the trust domain name with a precise reason
    now = _now()
    if parent is not None:
        made = castore.init_intermediate(Path(directory), Path(parent), now, key_type=key_type, ttl=lifetime)
    else:
        made = castore.init_root(Path(directory), trust_domain, now, key_type=key_type, ttl=lifetime)
    kind = "intermediate CA" if parent else "root CA"
    click.echo(
        f"{kind} {made.signing_cert.subject.rfc4514_string()} written to {directory} "
        f"(expires {made.not_after.isoformat()})"
    )


@ca.command("issue")
@click.option("--dir", "directory", required=True, type=click.Path(), help="CA directory.")
@click.option("--spiffe-id", required=True, help="Identity to put in the certificate.")
@click.option("--ttl", default=None, help="Lifetime, e.g. 24h (default 24h, at most 90d).")
@click.option("--cert-out", required=True, type=click.Path(), help="Write leaf + intermediates here.")
@click.option("--key-out", type=click.Path(), default=None, help="Write the new private key here (0600).")
@click.option(
    "--csr", "csr_path", type=click.Path(), default=None, help="Sign this CSR instead of making a key."
)
def issue(
    *,
    directory: str,
    spiffe_id: str,
    ttl: str | None,
    cert_out: str,
    key_out: str | None,
    csr_path: str | None,
) -> None:
    """Issue a workload X.509-SVID for --spiffe-id, from a new key or from --csr."""
    identity = SpiffeId.parse(spiffe_id)
    lifetime = parse_duration(ttl) if ttl else None
    if lifetime is not None and lifetime > MAX_WORKLOAD_TTL:
        raise InputError(f"--ttl {ttl}: greater than the max allowed TTL 90d")
    if csr_path is None and key_out is None:
        raise InputError("--key-out is required unless --csr is given")
    if csr_path is not None and key_out is not None:
        raise InputError("--key-out cannot be used with --csr (the key stays with whoever made the CSR)")
    now = _now()
    authority = castore.load_ca(Path(directory), now)
    files: dict[Path, tuple[bytes, int]] = {}
    if csr_path is not None:
        chain = authority.issue(_read(csr_path, "--csr"), identity, now, lifetime)
    else:
        assert key_out is not None
        chain, key_pem = authority.issue_with_key(identity, now, lifetime)
        files[Path(key_out)] = (key_pem, castore.KEY_MODE)
    files[Path(cert_out)] = (chain.chain_pem, castore.CERT_MODE)
    castore.write_files(files)
    leaf = x509.load_pem_x509_certificate(chain.leaf_pem)
    click.echo(f"issued {identity} to {cert_out} (expires {leaf.not_valid_after_utc.isoformat()})")


def _san_strings(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out: list[str] = []
    for name in san:
        kinds: dict[type, str] = {
            x509.UniformResourceIdentifier: "URI",
            x509.DNSName: "DNS",
            x509.IPAddress: "IP",
            x509.RFC822Name: "email",
        }
        kind = kinds.get(type(name), type(name).__name__)
        out.append(f"{kind}:{name.value}")
    return out


def _describe_cert(cert: x509.Certificate, now: datetime) -> dict[str, Any]:
    exts = cert.extensions
    try:
        bc = exts.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        ku = exts.get_extension_for_class(x509.KeyUsage).value
        usages = [f for f in _KU_FIELDS if getattr(ku, f)]
    except x509.ExtensionNotFound:
        usages = []
    try:
        eku = [
            _EKU_NAMES.get(o.dotted_string, o.dotted_string)
            for o in exts.get_extension_for_class(x509.ExtendedKeyUsage).value
        ]
    except x509.ExtensionNotFound:
        eku = []
    try:
        spiffe_id: str | None = str(svid_identity(cert))
    except VerificationError:
        spiffe_id = None
    left = cert.not_valid_after_utc - now
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "sans": _san_strings(cert),
        "spiffe_id": spiffe_id,
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "time_left": _fmt_left(left),
        "expired": left.total_seconds() < 0,
        "key_type": key_type_of(cert.public_key()),
        "is_ca": is_ca,
        "key_usage": usages,
        "extended_key_usage": eku,
        "sha256_fingerprint": hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
    }


def _fmt_left(left: timedelta) -> str:
    seconds = int(left.total_seconds())
    sign, seconds = ("-", -seconds) if seconds < 0 else ("", seconds)
    days, rem = divmod(seconds, 86400)
    hours, rem = divmod(rem, 3600)
    return f"{sign}{days}d{hours}h{rem // 60}m"


@ca.command("inspect")
@click.argument("file", type=click.Path())
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
def inspect(file: str, output: str) -> None:
    """Show each certificate in FILE and whether they form a chain in order (leaf first)."""
    certs = _certs(file, "certificate file")
    now = _now()
    described = [_describe_cert(c, now) for c in certs]
    links = [signed_by(child, parent) for child, parent in itertools.pairwise(certs)]
    report = {"file": file, "certificates": described, "chain_in_order": all(links), "links": links}
    if output == "json":
        click.echo(json.dumps(report, indent=2))
        return
    for index, info in enumerate(described):
        click.echo(f"[{index}] {'CA' if info['is_ca'] else 'leaf'}")
        for key in (
            "subject",
            "issuer",
            "spiffe_id",
            "sans",
            "serial",
            "not_before",
            "not_after",
            "time_left",
            "key_type",
            "key_usage",
            "extended_key_usage",
            "sha256_fingerprint",
        ):
            value = info[key]
            if isinstance(value, list):
                value = ", ".join(value) or "-"
            click.echo(f"    {key:<20} {value if value not in (None, '') else '-'}")
    if len(certs) > 1:
        click.echo(
            f"chain order: {'ok (each certificate is signed by the next)' if all(links) else 'BROKEN'}"
        )


@ca.command("verify")
@click.option("--bundle", "bundle_path", required=True, type=click.Path(), help="Root bundle (PEM).")
@click.option("--cert", "cert_path", required=True, type=click.Path(), help="Leaf, then intermediates (PEM).")
@click.option("--expect-id", "expect_ids", multiple=True, help="Accept only this SPIFFE ID (repeatable).")
@click.option(
    "--trust-domain",
    default=None,
    help="Trust domain the bundle is for (default: that of --expect-id, else cluster.local).",
)
@click.option(
    "--role",
    type=click.Choice(["client", "server"]),
    default="client",
    show_default=True,
    help="TLS role the certificate's owner plays (decides the EKU required).",
)
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
def verify(
    *,
    bundle_path: str,
    cert_path: str,
    expect_ids: tuple[str, ...],
    trust_domain: str | None,
    role: str,
    output: str,
) -> None:
    """Verify an X.509-SVID against a bundle: exit 0 valid, 1 invalid (with the reason), 2 bad input."""
    expected = [SpiffeId.parse(i) for i in expect_ids]
    td = trust_domain or (expected[0].trust_domain if expected else "cluster.local")
    bundle = TrustBundle.from_pem(td, _read(bundle_path, "--bundle"))
    certs = _certs(cert_path, "--cert")
    try:
        peer = verify_peer(
            certs[0],
            certs[1:],
            bundle,
            _now(),
            expected or None,
            peer_role="server" if role == "server" else "client",
        )
    except VerificationError as exc:
        if output == "json":
            click.echo(json.dumps({"valid": False, "reason": exc.reason, "message": exc.detail}))
        else:
            click.echo(f"invalid: {exc.reason}: {exc.detail}")
        # SystemExit, not click's Exit: with standalone_mode=False click *returns* an Exit's code,
        # and cli.main.main() discards that return value.
        sys.exit(1)
    result = {
        "valid": True,
        "spiffe_id": str(peer.spiffe_id),
        "not_after": peer.not_after.isoformat(),
        "chain": [c.subject.rfc4514_string() for c in peer.chain],
    }
    if output == "json":
        click.echo(json.dumps(result))
    else:
        click.echo(f"valid: {peer.spiffe_id} (expires {result['not_after']})")
