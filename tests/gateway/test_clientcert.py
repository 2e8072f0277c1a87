"""The gateway's post-handshake client certificate checks and the XFCC element (§7.1, §7.3)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives import serialization

from tests.gateway.conftest import ExternalPki, issue, make_ca, make_crl
from zerotunnel.gateway.clientcert import ClientCert, ClientCertRejected, verify_client_cert, xfcc

NOW = datetime.now(UTC)


def der(cert: object) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)  # type: ignore[attr-defined,no-any-return]


def bundle(ext: ExternalPki) -> bytes:
    return ext.partner_a.cert_pem + ext.partner_b.cert_pem


def test_clients_of_either_ca_accepted(ext: ExternalPki) -> None:
    for client, issuer in ((ext.client_a, ext.partner_a), (ext.client_b, ext.partner_b)):
        verified = verify_client_cert(der(client.cert), bundle(ext), ext.crl(), (), NOW)
        assert verified.issuer == issuer.cert


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unknown", "is not a trusted CA"),
        ("revoked", "is revoked by CN=partner-a root CA,O=partner-a"),
        ("expired", "expired or not yet valid"),
        ("ca_as_leaf", "is a CA certificate"),
        ("server_eku", "lacks the clientAuth"),
        ("wrong_san", "match none of subjectAltNames"),
    ],
)
def test_refusals(ext: ExternalPki, case: str, reason: str) -> None:
    certs = {
        "unknown": ext.client_unknown.cert,
        "revoked": ext.client_revoked.cert,
        "expired": ext.client_expired.cert,
        "ca_as_leaf": ext.partner_a.cert,
        "server_eku": issue(ext.partner_a, "srv", dns=("client-a.partner-a.example",), server=True).cert,
        "wrong_san": ext.client_wrong_san.cert,
    }
    sans = ("client-a.partner-a.example", "client-b.partner-b.example") if case == "wrong_san" else ()
    with pytest.raises(ClientCertRejected, match=reason):
        verify_client_cert(der(certs[case]), bundle(ext), ext.crl(), sans, NOW)


def test_crl_must_be_signed_by_the_issuer(ext: ExternalPki) -> None:
    """A CRL naming partner-a but signed by another key revokes nothing; a CRL of partner-b does not
    touch partner-a's clients; several CRLs in one ca.crl are all read."""
    forger = make_ca("partner-a")  # same subject name, different key
    forged = make_crl(forger, [ext.client_a.cert])
    verify_client_cert(der(ext.client_a.cert), bundle(ext), forged, (), NOW)
    b_crl = make_crl(ext.partner_b, [ext.client_b.cert])
    verify_client_cert(der(ext.client_a.cert), bundle(ext), b_crl, (), NOW)
    with pytest.raises(ClientCertRejected, match="revoked"):
        verify_client_cert(der(ext.client_b.cert), bundle(ext), ext.crl() + b_crl, (), NOW)


def test_san_allow_list_matches_any_san_type(ext: ExternalPki) -> None:
    verify_client_cert(
        der(ext.client_a.cert), bundle(ext), None, ("https://client-a.partner-a.example",), NOW
    )


def test_xfcc_element(ext: ExternalPki) -> None:
    client = ClientCert(ext.client_a.cert, ext.partner_a.cert)
    value = xfcc("spiffe://cluster.local/ns/istio-system/sa/gw", client)
    digest = hashlib.sha256(der(ext.client_a.cert)).hexdigest()
    assert value == (
        f'By=spiffe://cluster.local/ns/istio-system/sa/gw;Hash={digest};Subject="CN=client-a,O=clients";'
        "URI=https://client-a.partner-a.example;DNS=client-a.partner-a.example"
    )


def test_xfcc_quotes_and_refuses_injection(ext: ExternalPki) -> None:
    odd = issue(
        ext.partner_a,
        'a"b;c',
        dns=("x.example", "bad\r\nx-injected: 1.example"),
        uri=("https://u.example/p?a=1;b=2",),
    )
    value = xfcc(None, ClientCert(odd.cert, ext.partner_a.cert))
    assert "Subject=" not in value  # RFC 4514 escapes (\\" \\;) would need backslashes: left out
    assert 'URI="https://u.example/p?a=1;b=2"' in value
    assert "\r" not in value and "\n" not in value and "injected" not in value
    assert "DNS=x.example" in value
