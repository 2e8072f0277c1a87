"""Fuzz targets: every parser that meets untrusted bytes, as `bytes -> None` functions.

security.md §4 item 30 and §2g. One definition serves both drivers: the Hypothesis tests in
tests/reliability/test_fuzz.py (short, in CI) and the atheris harness fuzz/run.py (coverage-guided,
`make fuzz SECONDS=...`). A target may raise only the error types listed in `ALLOWED[name]` (the
parser's declared refusal); anything else, or an input that takes longer than `SLOW_S`, is a finding.
Properties beyond "no crash" are asserted inside the target (they raise `PropertyViolation`).
"""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from cryptography import x509

from zerotunnel.config.errors import ConfigError
from zerotunnel.config.loader import load
from zerotunnel.hbone.authority import AuthorityError, parse_authority
from zerotunnel.hbone.headers import parse_baggage, parse_forwarded_host
from zerotunnel.hbone.protocol import HboneClientConnection, HboneServerConnection
from zerotunnel.identity.bundle import TrustBundle
from zerotunnel.identity.ca import CaError, CertificateAuthority
from zerotunnel.identity.spiffe import SpiffeId, SpiffeIdError
from zerotunnel.identity.verify import VerificationError, verify_peer
from zerotunnel.policy.normalize import MODES, BadRequest, normalize

SLOW_S = 1.0
MALFORMED_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
NOW = datetime(2026, 6, 1, tzinfo=UTC)


class PropertyViolation(AssertionError):
    """A parser returned, but what it returned breaks a stated property."""


def authority(data: bytes) -> None:
    """§1.2: `ip:port`, `[v6]:port` or `host:port`, nothing else; the result re-parses to itself
    and carries no byte a log line or a forwarded header could be split on."""
    parsed = parse_authority(data)
    if any(b <= 0x20 or b >= 0x7F for b in data):
        raise PropertyViolation(f"authority {data!r} with a control/space/non-ASCII byte was accepted")
    text = str(parsed)
    if any(c in text for c in "\r\n\t\x00 ") or not text.isascii():
        raise PropertyViolation(f"authority {data!r} parsed to {text!r}")
    if parse_authority(text) != parsed:
        raise PropertyViolation(f"authority {text!r} does not round-trip")


def headers(data: bytes) -> None:
    """baggage / forwarded are telemetry only (§1.3), but parsed from attacker bytes."""
    text = data.decode("latin-1")
    for key, value in parse_baggage(text).items():
        if "," in key or "," in value:
            raise PropertyViolation(f"baggage item {key!r}={value!r} kept a separator")
    host = parse_forwarded_host(text)
    if host is not None and (not host.isascii() or not host.isprintable()):
        raise PropertyViolation(f"forwarded host {host!r}")


def _feed(conn: HboneServerConnection | HboneClientConnection, data: bytes) -> None:
    # in a few pieces: frame boundaries then fall at arbitrary offsets, as on a real socket
    step = max(1, len(data) // 3)
    for i in range(0, len(data), step):
        conn.receive_data(data[i : i + step], float(i))
        conn.data_to_send()


def h2_server(data: bytes) -> None:
    """Bytes after the TLS handshake into the 15008 HTTP/2 core: it must never raise."""
    _feed(HboneServerConnection(), PREFACE + data)


def h2_server_raw(data: bytes) -> None:
    """The same without a valid preface (garbage from the first byte)."""
    _feed(HboneServerConnection(), data)


def h2_client(data: bytes) -> None:
    """What a hostile server can send back to our pool's connection."""
    conn = HboneClientConnection()
    conn.open_connect("127.0.0.1:8080")
    conn.data_to_send()
    _feed(conn, data)


def config(data: bytes) -> None:
    """YAML text from a user's file: a ConfigError with file/document/field, never a traceback."""
    load([("fuzz.yaml", data.decode("utf-8", "replace"))])


@functools.cache
def _ca() -> tuple[CertificateAuthority, TrustBundle]:
    root = CertificateAuthority.create_root("cluster.local", NOW - timedelta(days=1))
    return root, TrustBundle.from_certs("cluster.local", root.roots)


IDENTITY = SpiffeId.istio("cluster.local", "default", "fuzz")


def csr(data: bytes) -> None:
    """A CSR as the CA receives it over gRPC (PEM text), from an authenticated caller."""
    ca, _ = _ca()
    if not data.lstrip().startswith(b"-----BEGIN"):
        body = base64.encodebytes(data)
        data = b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"-----END CERTIFICATE REQUEST-----\n"
    issued = ca.issue(data, IDENTITY, NOW)
    leaf = x509.load_pem_x509_certificate(issued.leaf_pem)
    names = list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    if names != [x509.UniformResourceIdentifier(str(IDENTITY))]:  # security.md rule 7
        raise PropertyViolation(f"CA issued SANs {names} for a caller authorised as {IDENTITY}")


def verify(data: bytes) -> None:
    """A peer's leaf (DER or PEM) into the post-handshake verifier: refusal, never a crash; and no
    acceptance at all, since nothing but our own CA's issuance can chain to this root."""
    _, bundle = _ca()
    peer = verify_peer(data, [], bundle, NOW, None, peer_role="client")
    raise PropertyViolation(f"fuzzed bytes verified as {peer.spiffe_id}")


def spiffe(data: bytes) -> None:
    """SPIFFE IDs (security.md rule 2: strict parse, exact compare): parse → str → parse is stable."""
    text = data.decode("utf-8", "replace")
    sid = SpiffeId.parse(text)
    if SpiffeId.parse(str(sid)) != sid or str(sid) != text:
        raise PropertyViolation(f"SPIFFE ID {text!r} re-serialized as {sid}")


def path(data: bytes) -> None:
    """Path normalization (security.md §4 item 30): idempotent, no `..` segment survives."""
    mode = MODES[data[0] % len(MODES)] if data else "BASE"
    target = "/" + data[1:].decode("utf-8", "replace")
    first = normalize(target, mode)
    if MALFORMED_PERCENT.search(target.split("?", 1)[0].split("#", 1)[0]):
        # KNOWN, unfixed here (policy/ belongs to another owner): a '%' not followed by two hex
        # digits lets the single decoding pass *create* an escape (`/%%32%65` → `/%2e`), so the
        # result is not idempotent and a decoding backend can turn it into `..`
        # (tests/reliability/test_fuzz.py::test_double_encoding_creates_dot_segments, xfail).
        return
    if mode in ("NONE",):
        return
    again = normalize(first.path, mode)
    if again.path != first.path:
        raise PropertyViolation(
            f"normalize not idempotent ({mode}): {target!r} → {first.path!r} → {again.path!r}"
        )
    if ".." in first.path.split("/"):
        raise PropertyViolation(f"normalize kept a '..' segment ({mode}): {target!r} → {first.path!r}")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "authority": authority,
    "headers": headers,
    "h2_server": h2_server,
    "h2_server_raw": h2_server_raw,
    "h2_client": h2_client,
    "config": config,
    "csr": csr,
    "verify": verify,
    "spiffe": spiffe,
    "path": path,
}

ALLOWED: dict[str, tuple[type[BaseException], ...]] = {
    "authority": (AuthorityError,),
    "headers": (),
    "h2_server": (),
    "h2_server_raw": (),
    "h2_client": (),
    "config": (ConfigError,),
    "csr": (CaError,),
    "verify": (VerificationError,),
    "spiffe": (SpiffeIdError,),
    "path": (BadRequest,),
}
