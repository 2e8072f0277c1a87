"""PKI for the node tests: a mesh CA (root → intermediate), plus the bad peers security.md asks for."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from zerotunnel.identity.bundle import TrustBundle
from zerotunnel.identity.ca import CertificateAuthority
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.node.tls import WorkloadCredentials

TD = "cluster.local"
NOW = datetime.now(UTC)


@dataclass
class Pki:
    ca: CertificateAuthority
    bundle: TrustBundle

    def creds(self, ns: str, sa: str, td: str = TD, ca: CertificateAuthority | None = None,
              bundle: TrustBundle | None = None) -> WorkloadCredentials:
        ident = SpiffeId.istio(td, ns, sa)
        chain, key = (ca or self.ca).issue_with_key(ident, NOW - timedelta(minutes=1), timedelta(hours=2))
        return WorkloadCredentials.from_pem(ident, chain.chain_pem, key, bundle or self.bundle)


@pytest.fixture(scope="session")
def pki() -> Pki:
    root = CertificateAuthority.create_root(TD, NOW - timedelta(days=1))
    inter = CertificateAuthority.create_intermediate(root, NOW - timedelta(days=1))
    bundle = TrustBundle.from_certs(TD, root.roots)
    return Pki(inter, bundle)


@pytest.fixture(scope="session")
def other_root_creds(pki: Pki) -> WorkloadCredentials:
    """Same trust domain name, another root (not in our bundle)."""
    other = CertificateAuthority.create_root(TD, NOW - timedelta(days=1))
    bundle = TrustBundle.from_certs(TD, other.roots)
    return pki.creds("default", "evil", ca=other, bundle=bundle)


@pytest.fixture(scope="session")
def ca_as_leaf_creds(pki: Pki) -> WorkloadCredentials:
    """The mesh's own signing CA certificate and key presented as a client leaf."""
    cert = pki.ca.signing_cert
    key = pki.ca.signing_key_pem()
    chain = cert.public_bytes(serialization.Encoding.PEM) + b"".join(pki.ca.intermediates_pem)
    return WorkloadCredentials(SpiffeId.istio(TD, "default", "ca"), chain, key, pki.bundle,
                               tuple(x509.load_pem_x509_certificates(chain)[1:]))


@pytest.fixture(scope="session")
def other_td_creds(pki: Pki) -> WorkloadCredentials:
    """A valid SVID of another trust domain whose root we do trust (federated bundle)."""
    other = CertificateAuthority.create_root("clusterset.local", NOW - timedelta(days=1))
    return pki.creds("default", "foreign", td="clusterset.local", ca=other,
                     bundle=TrustBundle.from_certs("clusterset.local", other.roots).merge(pki.bundle))
