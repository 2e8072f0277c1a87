"""Write the seed corpus (fuzz/corpus/<target>/seed-*): valid and near-valid inputs per target.

Envoy's practice (security.md §2g): one seed per frame type / input shape, and every finding
minimized into the same directory (`finding-*`), where tests/reliability/test_fuzz.py replays it.
Run from the repository root: `.venv/bin/python fuzz/make_corpus.py`.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import targets

from zerotunnel.identity.ca import CertificateAuthority
from zerotunnel.identity.csr import generate_key, make_csr

CORPUS = Path(__file__).resolve().parent / "corpus"


def _connect(authority: str, method: str = "CONNECT") -> bytes:
    return bytes(hpack.Encoder().encode([(":method", method), (":authority", authority)]))


def seeds() -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    out["authority"] = [b"127.0.0.1:8080", b"[::1]:15008", b"svc.ns.svc.cluster.local:80", b"10.0.0.1:0",
                        b"10.0.0.1:65536", b"[fe80::1%eth0]:80", b"user@10.0.0.1:80", b"10.0.0.1:80\n",
                        b"a..b:80", b"::1:80"]
    out["headers"] = [b"k8s.namespace.name=default,k8s.pod.name=a,service.name=x",
                      b"for=10.0.0.1;host=\"example.com\";proto=https", b"host=\xff", b"=,=,,"]
    h2 = {
        "connect": HeadersFrame(1, _connect("127.0.0.1:8080"), flags=["END_HEADERS"]).serialize()
        + DataFrame(1, b"hello", flags=["END_STREAM"]).serialize(),
        "get": HeadersFrame(1, _connect("x:1", "GET"), flags=["END_HEADERS", "END_STREAM"]).serialize(),
        "rst": HeadersFrame(1, _connect("127.0.0.1:1"), flags=["END_HEADERS"]).serialize()
        + RstStreamFrame(1, error_code=8).serialize(),
        "continuation": HeadersFrame(1, _connect("127.0.0.1:1")[:2]).serialize()
        + ContinuationFrame(1, _connect("127.0.0.1:1")[2:], flags=["END_HEADERS"]).serialize(),
        "settings": SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0}).serialize(),
        "ping": PingFrame(0, opaque_data=b"12345678").serialize(),
        "window": WindowUpdateFrame(0, window_increment=2**31 - 1).serialize(),
        "goaway": GoAwayFrame(0, last_stream_id=0, error_code=0).serialize(),
    }
    out["h2_server"] = [SettingsFrame(0).serialize() + v for v in h2.values()]
    out["h2_server_raw"] = [b"\x16\x03\x01\x00\x05hello", b"GET / HTTP/1.1\r\n\r\n"]
    response = bytes(hpack.Encoder().encode([(":status", "200")]))
    out["h2_client"] = [
        SettingsFrame(0).serialize() + HeadersFrame(1, response, flags=["END_HEADERS"]).serialize()
        + DataFrame(1, b"x", flags=["END_STREAM"]).serialize(),
        SettingsFrame(0, settings={SettingsFrame.MAX_CONCURRENT_STREAMS: 0}).serialize()
        + GoAwayFrame(0, last_stream_id=0, error_code=11).serialize(),
    ]
    root = Path(__file__).resolve().parents[1]
    out["config"] = [p.read_bytes() for p in sorted((root / "examples").rglob("*.yaml"))][:6]
    out["config"].append(b"apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {enabled: yes}\n")
    key = generate_key()
    out["csr"] = [make_csr(targets.IDENTITY, key),
                  make_csr(targets.IDENTITY.__class__.parse("spiffe://cluster.local/ns/x/sa/y"), key)]
    other = CertificateAuthority.create_root("cluster.local", targets.NOW - timedelta(days=1))
    chain, _ = other.issue_with_key(targets.IDENTITY, targets.NOW)
    out["verify"] = [chain.leaf_pem, other.root_bundle_pem, b"\x30\x82\x01\x00"]
    out["spiffe"] = [b"spiffe://cluster.local/ns/default/sa/a", b"spiffe://cluster.local",
                     b"spiffe://cluster.local/ns/../sa/a", b"SPIFFE://x/y", b"spiffe://x/y%2F",
                     b"spiffe://x:80/y", b"spiffe://x/y/"]
    out["path"] = [bytes([i]) + p.encode() for i, p in enumerate([
        "/admin", "//admin", "/%2Fadmin", "/%2fadmin", "/%5cadmin", "\\admin", "/./admin", "/x/../admin",
        "/%2e%2e/admin", "/%61dmin", "/admin/", "/admin;jsessionid=1", "/admin#x", "/admin?x",
        "/admin%00", "/admin%2500"])]
    return out


def findings() -> dict[str, dict[str, bytes]]:
    """Minimized reproducers of what the fuzzers found (each fixed; replayed by test_fuzz.py)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = generate_key()
    csr_der = x509.load_pem_x509_csr(make_csr(targets.IDENTITY, key)).public_bytes(serialization.Encoding.DER)
    ca = CertificateAuthority.create_root("cluster.local", targets.NOW - timedelta(days=1))
    chain, _ = ca.issue_with_key(targets.IDENTITY, targets.NOW)
    leaf = x509.load_pem_x509_certificate(chain.leaf_pem).public_bytes(serialization.Encoding.DER)
    uri = str(targets.IDENTITY).encode()
    san_tag = b"\x86" + bytes([len(uri)]) + uri
    assert san_tag in leaf and b"\x03B\x00\x04" in csr_der
    # two extensions with 3-byte OIDs; renaming inhibitAnyPolicy (2.5.29.54) to basicConstraints
    # (2.5.29.19) gives a duplicate extension, which cryptography reports only when it is read
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    dup_builder = (
        x509.CertificateBuilder().subject_name(x509.Name([]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(targets.NOW - timedelta(days=1)).not_valid_after(targets.NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.InhibitAnyPolicy(0), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri.decode())]),
                       critical=True)
    )
    dup_der = dup_builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    assert b"\x06\x03\x55\x1d\x36" in dup_der
    dup_leaf = dup_der.replace(b"\x06\x03\x55\x1d\x36", b"\x06\x03\x55\x1d\x13", 1)
    csr_dup = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.InhibitAnyPolicy(0), critical=False)
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    csr_dup = csr_dup.replace(b"\x06\x03\x55\x1d\x36", b"\x06\x03\x55\x1d\x13", 1)
    return {
        # cryptography parses CSR keys/versions lazily: ValueError, UnsupportedAlgorithm, InvalidVersion
        "csr": {
            "invalid-ec-point": csr_der.replace(b"\x03B\x00\x04", b"\x03B\x00\x00", 1),
            "unknown-key-oid": csr_der.replace(b"*\x86H\xce=\x02\x01", b"\x00\x86H\xce=\x02\x01", 1),
            "version-1": csr_der.replace(b"\x02\x01\x00", b"\x02\x01\x01", 1),
            "duplicate-extension": csr_dup,
        },
        "verify": {  # a leaf whose SAN fails to parse only when read (ValueError out of verify_peer)
            "san-bad-tag": leaf.replace(san_tag, b"\x00" + san_tag[1:], 1),
            "duplicate-extension": dup_leaf,  # atheris, verify target
        },
        "authority": {  # `$` matched before a trailing newline
            "trailing-newline-host": b"a.b\n:80",
            "trailing-newline-port": b"10.0.0.1:80\n",
        },
    }


def main() -> None:
    for name, items in seeds().items():
        d = CORPUS / name
        d.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(items):
            (d / f"seed-{i:02d}").write_bytes(data)
    for name, found in findings().items():
        for label, data in found.items():
            (CORPUS / name / f"finding-{label}").write_bytes(data)
    print(f"wrote seeds for {len(seeds())} targets into {CORPUS}")


if __name__ == "__main__":
    main()
