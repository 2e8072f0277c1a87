"""Build the external-clients PKI of the seed's §8 case: two external CAs whose clients may enter, a
third CA nobody trusts, and the gateway's server certificate.

Writes, next to this file (the Secret one level up, where `zerotunnel up examples/seed` applies it):
  ../gateway-secret.yaml the gateway's Secret: tls.crt/tls.key (server), ca.crt (both partner CAs), ca.crl
  server-ca.crt          what clients trust for https://app-a.example.com
  clients/<name>.crt|key partner-a, partner-b (accepted), stranger (refused), revoked (refused)

Demo material only: the keys are written to disk (mode 0600) so that curl can use them.

    python examples/seed/gateway/make_certs.py
    curl --cacert server-ca.crt --cert clients/partner-a.crt --key clients/partner-a.key \
         --resolve app-a.example.com:443:<gateway IP> https://app-a.example.com/data
"""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).resolve().parent
NOW = datetime.now(UTC)
VALIDITY = timedelta(days=825)
HOST = "app-a.example.com"

Pair = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _name(org: str, cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def ca(org: str) -> Pair:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(org, f"{org} root CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def leaf(issuer: Pair, org: str, cn: str, dns: str, *, server: bool = False) -> Pair:
    key = ec.generate_private_key(ec.SECP256R1())
    eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(org, cn))
        .issuer_name(issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False
        )
        .sign(issuer[1], hashes.SHA256())
    )
    return cert, key


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_pair(name: str, pair: Pair) -> None:
    (HERE / "clients").mkdir(exist_ok=True)
    (HERE / "clients" / f"{name}.crt").write_bytes(pem(pair[0]))
    fd = os.open(HERE / "clients" / f"{name}.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem(pair[1]))


def main() -> None:
    server_ca, partner_a, partner_b, stranger = (
        ca("server-ca"),
        ca("partner-a"),
        ca("partner-b"),
        ca("stranger"),
    )
    server = leaf(server_ca, "zerotunnel", HOST, HOST, server=True)
    revoked = leaf(partner_a, "partner-a", "revoked-client", "revoked.partner-a.example")
    write_pair("partner-a", leaf(partner_a, "partner-a", "partner-a-client", "client.partner-a.example"))
    write_pair("partner-b", leaf(partner_b, "partner-b", "partner-b-client", "client.partner-b.example"))
    write_pair("stranger", leaf(stranger, "stranger", "stranger-client", "client.partner-a.example"))
    write_pair("revoked", revoked)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(partner_a[0].subject)
        .last_update(NOW - timedelta(hours=1))
        .next_update(NOW + VALIDITY)
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(revoked[0].serial_number)
            .revocation_date(NOW - timedelta(minutes=5))
            .build()
        )
        .sign(partner_a[1], hashes.SHA256())
    )
    (HERE / "server-ca.crt").write_bytes(pem(server_ca[0]))

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    (
        HERE.parent / "gateway-secret.yaml"
    ).write_text(f"""# Generated by make_certs.py: the gateway's credential (istio-ambient.md §7.2).
# ca.crt holds two external CAs (partner-a, partner-b): a client certificate from either is accepted.
apiVersion: v1
kind: Secret
metadata:
  name: app-a-credential
  namespace: istio-system
type: kubernetes.io/tls
data:
  tls.crt: {b64(pem(server[0]))}
  tls.key: {b64(key_pem(server[1]))}
  ca.crt: {b64(pem(partner_a[0]) + pem(partner_b[0]))}
  ca.crl: {b64(crl.public_bytes(serialization.Encoding.PEM))}
""")


if __name__ == "__main__":
    main()
