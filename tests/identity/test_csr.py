"""CSRs look like ztunnel's (istio-ambient.md §3.3); key types and PEM helpers."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from zerotunnel.errors import InputError
from zerotunnel.identity.csr import generate_key, key_type_of, load_private_key, make_csr, private_key_pem
from zerotunnel.identity.spiffe import SpiffeId

SID = SpiffeId.istio("cluster.local", "default", "sleep")


def test_csr_shape() -> None:
    key = generate_key()
    csr = x509.load_pem_x509_csr(make_csr(SID, key))
    assert csr.is_signature_valid
    assert csr.subject == x509.Name([])
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(SID)]
    assert isinstance(csr.public_key(), ec.EllipticCurvePublicKey)


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "rsa-2048"])
def test_key_types_round_trip(key_type: str) -> None:
    key = generate_key(key_type)
    assert key_type_of(key) == key_type
    assert key_type_of(load_private_key(private_key_pem(key))) == key_type
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)


def test_unknown_key_type() -> None:
    with pytest.raises(InputError, match="unknown key type 'dsa'"):
        generate_key("dsa")


def test_load_private_key_rejects_garbage() -> None:
    with pytest.raises(InputError, match=r"ca-key.pem is not an unencrypted PEM private key"):
        load_private_key(b"nope", "ca-key.pem")
