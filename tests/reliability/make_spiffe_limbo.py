"""Generate tests/reliability/data/spiffe-limbo.json: SPIFFE-specific X.509 cases in x509-limbo's format.

x509-limbo has no URI-SAN identity cases (security.md §2i, §4 items 1 and 3), so these add them in
the same schema (`version`, `testcases[]` with `id`, `description`, `validation_kind`,
`trusted_certs`, `untrusted_intermediates`, `peer_certificate`, `validation_time`,
`expected_result`, `expected_peer_names`, `extended_key_usage`, `features`, `importance`) with two
local additions the limbo schema lacks: peer-name kind "URI" (the SPIFFE ID), and
`spiffe_trust_domains`, which names the trust domain of each trusted root (SPIFFE bundles are per
trust domain). Certificates are valid 2026-01-01 .. 2036-01-01 and validated at 2026-06-01, so the
committed file does not age. Run: `.venv/bin/python tests/reliability/make_spiffe_limbo.py`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

OUT = Path(__file__).resolve().parent / "data" / "spiffe-limbo.json"
NOT_BEFORE = datetime(2026, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime(2036, 1, 1, tzinfo=UTC)
VALIDATION_TIME = datetime(2026, 6, 1, tzinfo=UTC)
TD = "cluster.local"
GOOD_ID = f"spiffe://{TD}/ns/default/sa/client"


@dataclass
class Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(name: str, issuer: Ca | None = None, *, pathlen: int | None = None, ca_flag: bool = True,
            key_cert_sign: bool = True, constraints: x509.NameConstraints | None = None,
            td: str = TD) -> Ca:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, td),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=pathlen if ca_flag else None),
                       critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     key_cert_sign=key_cert_sign, crl_sign=key_cert_sign, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=True)
    return Ca(builder.sign(signer_key, hashes.SHA256()), key)


def make_leaf(issuer: Ca, *, uris: Sequence[str] = (GOOD_ID,), dns: Sequence[str] = (), ca: bool = False,
              key_cert_sign: bool = False, ekus: Sequence[x509.ObjectIdentifier] | None = (
                  ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
              not_before: datetime = NOT_BEFORE, not_after: datetime = NOT_AFTER,
              cn: str | None = None) -> str:
    key = _key()
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                     data_encipherment=False, key_agreement=False,
                                     key_cert_sign=key_cert_sign or ca, crl_sign=ca, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                       critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=not cn)
    if ekus is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
    return builder.sign(issuer.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def case(id_: str, description: str, *, roots: Sequence[Ca], peer: str, intermediates: Sequence[Ca] = (),
         ok: bool, peer_id: str | None = None, tds: dict[str, list[int]] | None = None,
         importance: str = "high", features: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "id": f"zerotunnel::spiffe::{id_}",
        "description": description,
        "validation_kind": "CLIENT",
        "trusted_certs": [r.pem for r in roots],
        "untrusted_intermediates": [i.pem for i in intermediates],
        "peer_certificate": peer,
        "peer_certificate_key": None,
        "validation_time": VALIDATION_TIME.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "signature_algorithms": [],
        "key_usage": ["digital_signature"],
        "extended_key_usage": ["client_auth"],
        "expected_result": "SUCCESS" if ok else "FAILURE",
        "expected_peer_name": None,
        "expected_peer_names": [{"kind": "URI", "value": peer_id or GOOD_ID}] if ok else [],
        "max_chain_depth": None,
        "crls": [],
        "features": list(features),
        "importance": importance,
        "conflicts_with": [],
        "spiffe_trust_domains": tds or {TD: list(range(len(roots)))},
    }


def cases() -> list[dict[str, Any]]:
    root = make_ca("root")
    inter = make_ca("intermediate", root)
    other_td_root = make_ca("other root", td="other.td")
    same_td_other_root = make_ca("rogue root")
    out: list[dict[str, Any]] = []
    add = out.append

    add(case("valid-direct", "control: a valid SVID issued by the root", roots=[root], peer=make_leaf(root),
             ok=True))
    add(case("valid-via-intermediate", "control: root → intermediate → SVID", roots=[root],
             intermediates=[inter], peer=make_leaf(inter), ok=True))
    # rule 2: exactly one SPIFFE URI SAN
    add(case("two-uri-sans", "two SPIFFE URI SANs: no usable identity (X509-SVID §2)", roots=[root],
             peer=make_leaf(root, uris=[GOOD_ID, f"spiffe://{TD}/ns/kube-system/sa/admin"]), ok=False))
    add(case("spiffe-and-https-uri", "one SPIFFE and one https URI SAN", roots=[root],
             peer=make_leaf(root, uris=[GOOD_ID, "https://example.com/"]), ok=False))
    add(case("uri-not-spiffe", "a single URI SAN with another scheme", roots=[root],
             peer=make_leaf(root, uris=[f"https://{TD}/ns/default/sa/client"]), ok=False))
    add(case("no-san", "no SAN at all; identity only in the subject CN", roots=[root],
             peer=make_leaf(root, uris=[], cn=GOOD_ID), ok=False))
    add(case("spiffe-id-in-dns-san", "the SPIFFE ID put in a DNS SAN instead of a URI SAN (type confusion, "
             "Envoy CVE-2022-21656)", roots=[root], peer=make_leaf(root, uris=[], dns=["client.default.svc"]),
             ok=False))
    for label, bad in {
        "dot-dot": f"spiffe://{TD}/ns/../sa/client", "dot": f"spiffe://{TD}/ns/./sa/client",
        "pct-2f": f"spiffe://{TD}/ns/default%2Fsa/client", "query": f"spiffe://{TD}/ns/default/sa/client?x=1",
        "fragment": f"spiffe://{TD}/ns/default/sa/client#x", "port": f"spiffe://{TD}:443/ns/default/sa/client",
        "userinfo": f"spiffe://admin@{TD}/ns/default/sa/client", "uppercase-td": "spiffe://Cluster.Local/ns/a/sa/b",
        "uppercase-scheme": f"SPIFFE://{TD}/ns/default/sa/client", "empty-path": f"spiffe://{TD}",
        "trailing-slash": f"spiffe://{TD}/ns/default/sa/client/", "empty-segment": f"spiffe://{TD}/ns//sa/client",
    }.items():
        add(case(f"malformed-id-{label}", f"malformed SPIFFE ID ({label}): {bad}", roots=[root],
                 peer=make_leaf(root, uris=[bad]), ok=False))
    # rule 3: not a CA, EKU, validity
    add(case("ca-as-leaf", "basicConstraints CA=true in the leaf position (accepted by OpenSSL, §2j)",
             roots=[root], peer=make_leaf(root, ca=True), ok=False))
    add(case("leaf-key-cert-sign", "CA=false but keyCertSign asserted", roots=[root],
             peer=make_leaf(root, key_cert_sign=True), ok=False))
    add(case("eku-server-only", "a client peer whose leaf allows serverAuth only", roots=[root],
             peer=make_leaf(root, ekus=[ExtendedKeyUsageOID.SERVER_AUTH]), ok=False))
    add(case("eku-email-only", "emailProtection EKU (Envoy GHSA-837m-wjrv-vm5g)", roots=[root],
             peer=make_leaf(root, ekus=[ExtendedKeyUsageOID.EMAIL_PROTECTION]), ok=False))
    add(case("expired-by-1s", "expired one second before the validation time", roots=[root],
             peer=make_leaf(root, not_after=VALIDATION_TIME - timedelta(seconds=1)), ok=False))
    add(case("not-yet-valid-by-1s", "valid from one second after the validation time", roots=[root],
             peer=make_leaf(root, not_before=VALIDATION_TIME + timedelta(seconds=1)), ok=False))
    # rule 4: trust domains
    add(case("td-mismatch-same-root", "an ID in other.td signed by our cluster.local root",
             roots=[root], peer=make_leaf(root, uris=["spiffe://other.td/ns/default/sa/client"]), ok=False))
    add(case("td-claims-ours-signed-by-foreign-root", "claims cluster.local, chains to the (trusted) "
             "other.td root: a federated CA must not mint our identities",
             roots=[root, other_td_root], peer=make_leaf(other_td_root), ok=False,
             tds={TD: [0], "other.td": [1]}))
    add(case("federated-td-valid", "control: an other.td SVID chaining to the other.td root (the verifier "
             "accepts; the 15008 server then applies its own trust-domain rule)",
             roots=[root, other_td_root], peer=make_leaf(other_td_root, uris=["spiffe://other.td/ns/a/sa/b"]),
             ok=True, peer_id="spiffe://other.td/ns/a/sa/b", tds={TD: [0], "other.td": [1]}))
    add(case("unknown-root-same-td", "same trust domain name, root not in the bundle", roots=[root],
             peer=make_leaf(same_td_other_root), ok=False))
    add(case("multi-root-bundle", "control: two roots for one trust domain (rotation overlap, rule 16)",
             roots=[root, same_td_other_root], peer=make_leaf(same_td_other_root), ok=True))
    # path length and intermediates
    int0 = make_ca("int pathlen 0", root, pathlen=0)
    int0_child = make_ca("below pathlen 0", int0)
    add(case("pathlen-exceeded", "root → intermediate(pathLen 0) → intermediate → leaf", roots=[root],
             intermediates=[int0, int0_child], peer=make_leaf(int0_child), ok=False))
    add(case("pathlen-0-ok", "control: root → intermediate(pathLen 0) → leaf", roots=[root],
             intermediates=[int0], peer=make_leaf(int0), ok=True))
    not_ca = make_ca("intermediate without CA flag", root, ca_flag=False)
    add(case("intermediate-not-ca", "an intermediate whose basicConstraints says CA=false", roots=[root],
             intermediates=[not_ca], peer=make_leaf(not_ca), ok=False))
    no_kcs = make_ca("intermediate without keyCertSign", root, key_cert_sign=False)
    add(case("intermediate-no-keycertsign", "an intermediate CA without keyCertSign", roots=[root],
             intermediates=[no_kcs], peer=make_leaf(no_kcs), ok=False))
    add(case("missing-intermediate", "the leaf's issuer is not sent and not trusted", roots=[root],
             peer=make_leaf(inter), ok=False))
    # name constraints (PKITS 4.13 in SPIFFE terms: the URI host is the trust domain)
    excl = make_ca("excludes cluster.local", root, constraints=x509.NameConstraints(
        permitted_subtrees=None, excluded_subtrees=[x509.UniformResourceIdentifier(TD)]))
    add(case("name-constraint-excluded-uri", "the intermediate excludes URI host cluster.local",
             roots=[root], intermediates=[excl], peer=make_leaf(excl), ok=False))
    perm_other = make_ca("permits other.td only", root, constraints=x509.NameConstraints(
        permitted_subtrees=[x509.UniformResourceIdentifier("other.td")], excluded_subtrees=None))
    add(case("name-constraint-not-permitted-uri", "the intermediate permits URI host other.td only",
             roots=[root], intermediates=[perm_other], peer=make_leaf(perm_other), ok=False))
    perm_ours = make_ca("permits cluster.local", root, constraints=x509.NameConstraints(
        permitted_subtrees=[x509.UniformResourceIdentifier(TD)], excluded_subtrees=None))
    add(case("name-constraint-permitted-uri", "the intermediate permits URI host cluster.local (RFC 5280 "
             "says valid; a validator without URI constraint support may refuse: fail closed)",
             roots=[root], intermediates=[perm_ours], peer=make_leaf(perm_ours), ok=True,
             features=["uri-name-constraints"], importance="low"))
    dns_only = make_ca("dns constraint only", root, constraints=x509.NameConstraints(
        permitted_subtrees=[x509.DNSName("example.com")], excluded_subtrees=None))
    add(case("name-constraint-other-type", "a DNS-only constraint does not restrict URI SANs (RFC 5280 "
             "§4.2.1.10)", roots=[root], intermediates=[dns_only], peer=make_leaf(dns_only), ok=True,
             features=["uri-name-constraints"], importance="low"))
    return out


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"version": 1, "testcases": cases()}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
