"""istio-ambient.md §5 and §10.10: PeerAuthentication in ambient, as the DENY policies istiod derives.
Rows follow §5.3's observable table (baseline_test.go TestPeerAuthentication) plus the precedence rules
of §5.1 and the conversion shapes of §5.2."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from zerotunnel.config.model import ObjectMeta, PeerAuthentication, WorkloadSelector
from zerotunnel.policy.l4 import Action, Clause, L4Policy, L4Request, Match, Rule, Scope, evaluate
from zerotunnel.policy.peerauth import STATIC_STRICT_NAME, effective

ROOT = "istio-system"
LABELS = {"app": "server"}
MTLS = "spiffe://cluster.local/ns/demo/sa/client"


def pa(
    mode: str = "UNSET",
    ns: str = "demo",
    name: str = "pa",
    selector: dict[str, str] | None = None,
    ports: dict[int, str] | None = None,
    created: int = 0,
) -> PeerAuthentication:
    return PeerAuthentication(
        meta=ObjectMeta(
            name=name, namespace=ns, creation_timestamp=datetime(2026, 1, 1 + created, tzinfo=UTC)
        ),
        selector=WorkloadSelector(selector) if selector is not None else None,
        mtls_mode=mode,
        port_level_mtls=ports or {},
    )


def mesh(mode: str) -> PeerAuthentication:
    return pa(mode, ns=ROOT, name="mesh")


def wl(mode: str, ports: dict[int, str] | None = None) -> PeerAuthentication:
    return pa(mode, name="wl", selector=LABELS, ports=ports)


def allowed(pas: list[PeerAuthentication], port: int, identity: str | None) -> bool:
    result = effective(pas, "demo", LABELS, ROOT)
    return evaluate(result.policies, L4Request("10.0.0.9", "10.0.1.7", port, identity)).allowed


# case, PeerAuthentications, {port: plaintext allowed}, mTLS always allowed
CASES = [
    ("no PeerAuthentication: PERMISSIVE", [], {8080: True}),
    ("mesh PERMISSIVE", [mesh("PERMISSIVE")], {8080: True}),
    ("mesh STRICT", [mesh("STRICT")], {8080: False}),
    ("namespace STRICT", [pa("STRICT")], {8080: False}),
    (
        "workload STRICT + ports 18080,19090 PERMISSIVE",
        [wl("STRICT", {18080: "PERMISSIVE", 19090: "PERMISSIVE"})],
        {18080: True, 19090: True, 8080: False},
    ),
    (
        "mesh STRICT + workload (mode unset) ports PERMISSIVE",
        [mesh("STRICT"), wl("UNSET", {18080: "PERMISSIVE", 19090: "PERMISSIVE"})],
        {18080: True, 19090: True, 8080: False},
    ),
    (
        "mesh PERMISSIVE + workload ports STRICT",
        [mesh("PERMISSIVE"), wl("UNSET", {18080: "STRICT", 19090: "STRICT"})],
        {18080: False, 19090: False, 8080: True},
    ),
    (
        "workload PERMISSIVE + port STRICT (no parent)",
        [wl("PERMISSIVE", {9090: "STRICT"})],
        {9090: False, 8080: True},
    ),
    ("DISABLE ≡ PERMISSIVE: namespace DISABLE", [pa("DISABLE")], {8080: True}),
    ("mesh STRICT, namespace DISABLE overrides", [mesh("STRICT"), pa("DISABLE")], {8080: True}),
    ("mesh STRICT, namespace UNSET inherits", [mesh("STRICT"), pa("UNSET")], {8080: False}),
    ("namespace STRICT, workload PERMISSIVE wins", [pa("STRICT"), wl("PERMISSIVE")], {8080: True}),
    ("mesh PERMISSIVE, workload STRICT", [mesh("PERMISSIVE"), wl("STRICT")], {8080: False}),
    ("workload STRICT + port DISABLE", [wl("STRICT", {8080: "DISABLE"})], {8080: True, 9090: False}),
    (
        "namespace STRICT + workload UNSET port PERMISSIVE",
        [pa("STRICT"), wl("UNSET", {8080: "PERMISSIVE"})],
        {8080: True, 9090: False},
    ),
    (
        "namespace STRICT + workload UNSET port STRICT: redundant",
        [pa("STRICT"), wl("UNSET", {8080: "STRICT"})],
        {8080: False, 9090: False},
    ),
    (
        "workload STRICT, all ports STRICT: static strict only",
        [wl("STRICT", {8080: "STRICT"})],
        {8080: False, 9090: False},
    ),
    (
        "workload DISABLE + port PERMISSIVE: nothing to do",
        [wl("DISABLE", {8080: "PERMISSIVE"})],
        {8080: True},
    ),
    (
        "root-namespace selector PeerAuthentication is ignored",
        [pa("STRICT", ns=ROOT, selector=LABELS)],
        {8080: True},
    ),
    ("selector not matching the workload", [pa("STRICT", selector={"app": "other"})], {8080: True}),
    (
        "namespace level: the oldest wins (STRICT older)",
        [pa("PERMISSIVE", name="new", created=5), pa("STRICT", name="old", created=1)],
        {8080: False},
    ),
    (
        "namespace level: the oldest wins (PERMISSIVE older)",
        [pa("PERMISSIVE", name="old", created=1), pa("STRICT", name="new", created=5)],
        {8080: True},
    ),
    (
        "workload level: the oldest wins",
        [
            pa("PERMISSIVE", name="a", selector=LABELS, created=1),
            pa("STRICT", name="b", selector=LABELS, created=2),
        ],
        {8080: True},
    ),
    ("other namespace's policy does not apply", [pa("STRICT", ns="other")], {8080: True}),
    # istiod code, operator precedence included (convertPeerAuthentication): a STRICT port under a mesh STRICT
    # parent is skipped even when the workload itself is PERMISSIVE, so plaintext passes on that port.
    (
        "quirk: mesh STRICT + workload PERMISSIVE + port STRICT → port not enforced",
        [mesh("STRICT"), wl("PERMISSIVE", {9090: "STRICT"})],
        {9090: True, 8080: True},
    ),
]


@pytest.mark.parametrize(("case", "pas", "plaintext"), CASES, ids=[c[0] for c in CASES])
def test_peer_authentication(case: str, pas: list[PeerAuthentication], plaintext: dict[int, bool]) -> None:
    for port, ok in plaintext.items():
        assert allowed(pas, port, None) is ok, port
        assert allowed(pas, port, MTLS) is True, port


def test_static_strict_policy_shape() -> None:
    r = effective([mesh("STRICT")], "demo", LABELS, ROOT)
    assert r.policies == (
        L4Policy(
            STATIC_STRICT_NAME,
            ROOT,
            Scope.WORKLOAD_SELECTOR,
            Action.DENY,
            (
                Rule(
                    (
                        Clause(
                            (
                                Match(
                                    not_principals=(
                                        r.policies[0].rules[0].clauses[0].matches[0].not_principals
                                    )
                                ),
                            )
                        ),
                    )
                ),
            ),
            source="PeerAuthentication",
        ),
    )
    assert r.policies[0].rules[0].clauses[0].matches[0].not_principals[0].kind == "presence"
    d = evaluate(r.policies, L4Request("10.0.0.9", "10.0.1.7", 80, None))
    assert d.reason == "explicitly denied by: istio-system/istio_converted_static_strict"
    assert r.mode == "STRICT"


def test_converted_port_policy_shape() -> None:
    """§5.2: STRICT + exempt ports = one rule: [not_principals presence] AND one clause per exempt port."""
    r = effective([wl("STRICT", {18080: "PERMISSIVE", 19090: "PERMISSIVE"})], "demo", LABELS, ROOT)
    assert [p.key for p in r.policies] == ["demo/converted_peer_authentication_wl"]
    (rule,) = r.policies[0].rules
    assert [c.matches[0].not_destination_ports for c in rule.clauses[1:]] == [(18080,), (19090,)]
    assert rule.clauses[0].matches[0].not_principals[0].kind == "presence"
    # PERMISSIVE top + STRICT ports: one rule per strict port
    r = effective([wl("PERMISSIVE", {1: "STRICT", 2: "STRICT"})], "demo", LABELS, ROOT)
    assert [rl.clauses[0].matches[0].destination_ports for rl in r.policies[0].rules] == [(1,), (2,)]
    assert r.mode_for_port(1) == "STRICT"
    assert r.mode_for_port(3) == "PERMISSIVE"


def test_strict_composes_with_other_deny_and_allow() -> None:
    """§10.10: STRICT is a DENY, so it beats an ALLOW that would admit plaintext."""
    r = effective([mesh("STRICT")], "demo", LABELS, ROOT)
    allow_all = L4Policy("allow-all", "demo", Scope.NAMESPACE, Action.ALLOW, (Rule(()),))
    d = evaluate([allow_all, *r.policies], L4Request("10.0.0.9", "10.0.1.7", 80, None))
    assert (d.allowed, d.policy) == (False, "istio-system/istio_converted_static_strict")
