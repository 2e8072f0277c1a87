"""Workload keys and CSRs shaped like ztunnel's (spec/istio-ambient.md §3.3).

ztunnel's CSR has an empty subject and one critical URI SAN naming the requested identity; the CA
ignores that SAN and uses the authorised identity instead, but sending it keeps our CSRs identical to
the ones an Istio CA already accepts.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from zerotunnel.errors import InputError
from zerotunnel.identity.spiffe import SpiffeId

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-4096")


def generate_key(key_type: str = "ec-p256") -> PrivateKey:
    """A fresh private key; ECDSA P-256 is Istio's workload default, RSA is for plug-in CAs."""
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type in ("rsa-2048", "rsa-4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise InputError(f"unknown key type {key_type!r} (choose one of {', '.join(KEY_TYPES)})")


def key_type_of(key: object) -> str:
    """The KEY_TYPES name of a public or private key, or a description when it is not one of ours."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name, f"ec-{key.curve.name}")
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    return type(key).__name__


def signature_hash(key: object) -> hashes.SHA256 | hashes.SHA384:
    """The hash a key signs with: SHA-384 for P-384 (webpki pairs curve and hash), SHA-256 otherwise."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size == 384:
        return hashes.SHA384()
    return hashes.SHA256()


def private_key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM: what Istio's `ca-key.pem`, `tls.key` and SDS hold."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(pem: bytes, what: str = "private key") -> PrivateKey:
    """Parse an unencrypted PEM key of a type we sign with; InputError naming `what` otherwise."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{what} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise InputError(f"{what} is a {type(key).__name__}; only ECDSA and RSA keys are supported")
    return key


def make_csr(identity: SpiffeId, key: PrivateKey) -> bytes:
    """PEM CSR: empty subject, one critical URI SAN = `identity`, signed by `key` (§3.3)."""
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]), critical=True
        )
    )
    return builder.sign(key, signature_hash(key)).public_bytes(serialization.Encoding.PEM)
