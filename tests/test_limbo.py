"""x509-limbo (C2SP) against the mesh's path validator, `zerotunnel.identity.verify.validate_path`.

Every case runs through the same cryptography `PolicyBuilder` configuration that `verify_peer`
uses (store = the case's trust anchors, validation time, max chain depth, webpki extension policies).
SERVER cases add hostname matching (`server_name`), which SPIFFE peers do not use but which keeps the
name-constraint and path-building cases meaningful; CLIENT cases use the client verifier exactly as
the mesh does. The model is Go's `x509limbo_test.go` and the pyca harness: a documented skip list,
every other case must give the expected result, and every explicitly skipped id must really diverge
(a skip that has become unnecessary fails the suite). See /work/shared/testdata/x509-limbo/README.md.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import warnings
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.verification import Subject
from cryptography.x509.verification import VerificationError as PathError

from zerotunnel.identity.verify import DEFAULT_MAX_CHAIN_DEPTH, PeerRole, validate_path

LIMBO = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "x509-limbo" / "limbo.json"
if not LIMBO.exists():
    LIMBO = Path("/work/shared/testdata/x509-limbo/limbo.json")

# Features we do not evaluate, each with the reason it is irrelevant to SPIFFE workload identity.
SKIP_FEATURES: dict[str, str] = {
    "has-crl": "workload SVID validation does no CRL checks (neither does ztunnel: short-lived certs "
    "are the revocation story); the ingress gateway's CRL support is tested separately",
    "has-policy-constraints": "certificate policies are not used by SPIFFE or Istio, and cryptography does "
    "not process policy constraints",
    "name-constraint-dn": "cryptography does not support directory-name constraints; SPIFFE identity is the "
    "URI SAN, never the subject DN",
    "pedantic-public-suffix-wildcard": "DNS wildcard policy on public suffixes is irrelevant to URI-SAN "
    "identities and impractical for every validator",
    "pedantic-webpki-eku": "CABF's finer EKU conditions: we require the TLS EKU of the peer's role, which "
    "tests/identity/test_verify.py covers",
    "pedantic-webpki-subscriber-key": "CABF subscriber key rules (leaf key sizes/encodings) are not enforced "
    "by webpki validators; our CA issues P-256 keys",
    "pedantic-rfc5280": "strict RFC 5280 readings that deployed validators (and cryptography) ignore",
    "rfc5280-incompatible-with-webpki": "we follow the webpki profile where it departs from RFC 5280",
    "pedantic-serial-number": "zero serials are accepted by cryptography for trust-store compatibility; "
    "our CA always issues 128-bit random serials",
}

# Individual divergences, by id (or id prefix ending in '::'), each with its reason.
SKIP_IDS: dict[str, str] = {
    "rfc5280::ca-as-leaf": "deliberate: a CA certificate in the leaf position is rejected (X509-SVID §3.3 "
    "and security.md §1c); RFC 5280 alone permits it",
    "pathlen::validation-ignores-pathlen-in-leaf": "the leaf is a CA certificate, which we reject "
    "deliberately (as for rfc5280::ca-as-leaf)",
    "pathlen::self-issued-certs-pathlen": "cryptography (like Go and webpki) counts self-issued "
    "intermediates toward pathLen; stricter than RFC 5280, never looser",
    "pathlen::max-chain-depth-1-self-issued": "as above: self-issued intermediates count toward the depth",
    "rfc5280::aki::intermediate-missing-aki": "plug-in intermediates without an AKI are accepted (as Go "
    "and webpki do); our CA always writes AKI and SKI",
    "rfc5280::ski::root-missing-ski": "CAs without an SKI are accepted (as Go and webpki do); our CA "
    "always writes SKI",
    "rfc5280::ski::intermediate-missing-ski": "as above, for an intermediate",
    "webpki::aki::root-with-aki-authoritycertissuer": "trust anchors are taken as configured; their own "
    "AKI is not policed",
    "webpki::aki::root-with-aki-authoritycertserialnumber": "as above",
    "webpki::aki::root-with-aki-all-fields": "as above",
    "webpki::aki::root-with-aki-ski-mismatch": "as above",
    "webpki::forbidden-rsa-not-divisible-by-8-in-root": "RSA modulus granularity in a configured trust "
    "anchor is not checked by any validator",
    "webpki::cn::": "CABF rules tying the subject CN to the SAN: the mesh never reads the CN (identity is "
    "the URI SAN), and cryptography ignores the CN",
}


@dataclass(frozen=True, slots=True)
class Outcome:
    id: str
    expected: str
    actual: str  # SUCCESS | FAILURE | SKIPPED
    context: str


@functools.cache
def _testcases() -> list[dict[str, Any]]:
    with LIMBO.open("rb") as fh:
        data = json.load(fh)
    assert data["version"] == 1
    cases: list[dict[str, Any]] = data["testcases"]
    return cases


def _skip_reason(tc: dict[str, Any]) -> str | None:
    for feature in tc["features"]:
        if feature in SKIP_FEATURES:
            return f"feature {feature}: {SKIP_FEATURES[feature]}"
    for key, reason in SKIP_IDS.items():
        if tc["id"] == key or (key.endswith("::") and tc["id"].startswith(key)):
            return reason
    if tc["signature_algorithms"] or tc["key_usage"]:
        return "per-case signature-algorithm/key-usage constraints are not a validator input we expose"
    return None


def _peer_name(tc: dict[str, Any]) -> Subject | None:
    peer = tc["expected_peer_name"]
    if tc["validation_kind"] != "SERVER" or peer is None:
        return None
    if peer["kind"] == "DNS":
        return x509.DNSName(peer["value"])
    return x509.IPAddress(ipaddress.ip_address(peer["value"]))


def _evaluate(tc: dict[str, Any]) -> tuple[str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero/negative serials: parsed, with a deprecation warning
        leaf = x509.load_pem_x509_certificate(tc["peer_certificate"].encode())
        intermediates = [x509.load_pem_x509_certificate(c.encode()) for c in tc["untrusted_intermediates"]]
        roots = [x509.load_pem_x509_certificate(c.encode()) for c in tc["trusted_certs"]]
    when = datetime.fromisoformat(tc["validation_time"]) if tc["validation_time"] else datetime.now(UTC)
    depth = tc["max_chain_depth"] if tc["max_chain_depth"] is not None else DEFAULT_MAX_CHAIN_DEPTH
    role: PeerRole = "server" if tc["validation_kind"] == "SERVER" else "client"
    try:
        validate_path(
            leaf,
            intermediates,
            roots,
            when,
            peer_role=role,
            server_name=_peer_name(tc),
            max_chain_depth=depth,
        )
    except (PathError, ValueError) as exc:
        return "FAILURE", str(exc)[:300]
    return "SUCCESS", "chain built"


@functools.cache
def _outcomes() -> dict[str, Outcome]:
    results: dict[str, Outcome] = {}
    for tc in _testcases():
        reason = _skip_reason(tc)
        if reason is not None:
            results[tc["id"]] = Outcome(tc["id"], tc["expected_result"], "SKIPPED", reason)
            continue
        if tc["validation_kind"] == "SERVER" and tc["expected_peer_name"] is None:
            results[tc["id"]] = Outcome(tc["id"], tc["expected_result"], "SKIPPED", "no peer name given")
            continue
        actual, context = _evaluate(tc)
        results[tc["id"]] = Outcome(tc["id"], tc["expected_result"], actual, context)
    return results


def _group(case_id: str) -> str:
    parts = case_id.split("::")
    return "::".join(parts[:2]) if parts[0] == "bettertls" else parts[0]


def _groups() -> list[str]:
    if not LIMBO.exists():
        return []
    return sorted({_group(tc["id"]) for tc in _testcases()})


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not LIMBO.exists(), reason="x509-limbo corpus not present"),
]


@pytest.mark.parametrize("group", _groups())
def test_limbo_group_matches_expected(group: str) -> None:
    outcomes = [o for o in _outcomes().values() if _group(o.id) == group]
    mismatches = [o for o in outcomes if o.actual != "SKIPPED" and o.actual != o.expected]
    assert outcomes
    assert not mismatches, "\n".join(
        f"{o.id}: expected {o.expected}, got {o.actual} ({o.context})" for o in mismatches
    )


def test_limbo_runs_almost_everything() -> None:
    outcomes = _outcomes()
    by_kind: dict[str, int] = defaultdict(int)
    for o in outcomes.values():
        by_kind[o.actual] += 1
    assert len(outcomes) == len(_testcases()) >= 9000
    assert by_kind["SKIPPED"] <= 60, by_kind
    assert by_kind["SUCCESS"] >= 800 and by_kind["FAILURE"] >= 8000, by_kind


def test_every_skipped_id_really_diverges() -> None:
    """A skip by id must hide a real divergence; one that now matches must leave the list."""
    stale = []
    for tc in _testcases():
        reason = _skip_reason(tc)
        if reason is None or reason.startswith("feature ") or reason.startswith("per-case"):
            continue
        actual, _ = _evaluate(tc)
        if actual == tc["expected_result"]:
            stale.append(tc["id"])
    assert not stale, f"skipped but matching (remove from SKIP_IDS): {stale}"


def test_every_skip_key_is_used() -> None:
    ids = [tc["id"] for tc in _testcases()]
    for key in SKIP_IDS:
        assert any(i == key or (key.endswith("::") and i.startswith(key)) for i in ids), key
    features = {f for tc in _testcases() for f in tc["features"]}
    assert set(SKIP_FEATURES) <= features
