"""istio-ambient.md §4.2-§4.3 (and §10.1, §10.5, §10.6): ztunnel's match and decision algorithm,
one table row per case with the expected outcome written down, plus Hypothesis invariants."""

from __future__ import annotations

import ipaddress
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zerotunnel.policy.decision import NOT_ALLOWED
from zerotunnel.policy.l4 import (
    Action,
    Clause,
    L4Policy,
    L4Request,
    Match,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    evaluate,
)

SLEEP = "spiffe://cluster.local/ns/demo/sa/sleep"
OTHER = "spiffe://cluster.local/ns/other/sa/client"
FOREIGN_TD = "spiffe://example.org/ns/demo/sa/sleep"


def net(s: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(s)


def pol(
    *rules: Rule, action: Action = Action.ALLOW, name: str = "p", ns: str = "demo", dry: bool = False
) -> L4Policy:
    return L4Policy(name, ns, Scope.NAMESPACE, action, tuple(rules), dry)


def rule(*matches_per_clause: tuple[Match, ...]) -> Rule:
    return Rule(tuple(Clause(ms) for ms in matches_per_clause))


def req(
    identity: str | None = SLEEP, src: str = "10.0.0.5", dst: str = "10.0.1.7", port: int = 8080
) -> L4Request:
    return L4Request(src, dst, port, identity)


def exact(v: str) -> StringMatch:
    return StringMatch("exact", v)


# (case, policy, request, allowed) — every row is a single ALLOW policy, so allowed == "policy matched"
MATCH_CASES = [
    ("zero rules never match (allow-nothing)", pol(), req(), False),
    ("rule with zero clauses matches everything", pol(Rule(())), req(), True),
    ("clause [] matches everything", pol(rule(())), req(), True),
    ("clause [{}] never matches: empty Match skipped", pol(rule((Match(),))), req(), False),
    (
        "clause [{}, match] matches through the non-empty Match",
        pol(rule((Match(), Match(principals=(exact(SLEEP[9:]),))))),
        req(),
        True,
    ),
    (
        "principal exact, spiffe:// stripped from peer",
        pol(rule((Match(principals=(exact(SLEEP[9:]),)),))),
        req(),
        True,
    ),
    (
        "principal exact, other identity",
        pol(rule((Match(principals=(exact(SLEEP[9:]),)),))),
        req(OTHER),
        False,
    ),
    (
        "principal written with spiffe:// never matches",
        pol(rule((Match(principals=(exact(SLEEP),)),))),
        req(),
        False,
    ),
    (
        "principal exact, plaintext (no identity) fails",
        pol(rule((Match(principals=(exact(SLEEP[9:]),)),))),
        req(None),
        False,
    ),
    (
        "principal presence, plaintext fails",
        pol(rule((Match(principals=(StringMatch("presence"),)),))),
        req(None),
        False,
    ),
    (
        "principal presence, any mTLS identity",
        pol(rule((Match(principals=(StringMatch("presence"),)),))),
        req(OTHER),
        True,
    ),
    (
        "not_principals exact, plaintext passes",
        pol(rule((Match(not_principals=(exact(SLEEP[9:]),)),))),
        req(None),
        True,
    ),
    (
        "not_principals exact, that identity fails",
        pol(rule((Match(not_principals=(exact(SLEEP[9:]),)),))),
        req(),
        False,
    ),
    (
        "principal prefix",
        pol(rule((Match(principals=(StringMatch("prefix", "cluster.local/ns/demo/"),)),))),
        req(),
        True,
    ),
    ("principal suffix", pol(rule((Match(principals=(StringMatch("suffix", "/sa/sleep"),)),))), req(), True),
    (
        "principal suffix, other sa",
        pol(rule((Match(principals=(StringMatch("suffix", "/sa/sleep"),)),))),
        req(OTHER),
        False,
    ),
    (
        "trust domain only via the principal string (foreign td)",
        pol(rule((Match(principals=(exact(SLEEP[9:]),)),))),
        req(FOREIGN_TD),
        False,
    ),
    ("namespaces from identity", pol(rule((Match(namespaces=(exact("demo"),)),))), req(), True),
    (
        "namespaces, plaintext has namespace ''",
        pol(rule((Match(namespaces=(exact("demo"),)),))),
        req(None),
        False,
    ),
    (
        "namespaces presence, plaintext fails",
        pol(rule((Match(namespaces=(StringMatch("presence"),)),))),
        req(None),
        False,
    ),
    (
        "not_namespaces, plaintext passes",
        pol(rule((Match(not_namespaces=(exact("demo"),)),))),
        req(None),
        True,
    ),
    (
        "service_accounts exact pair",
        pol(rule((Match(service_accounts=(ServiceAccountMatch("demo", "sleep"),)),))),
        req(),
        True,
    ),
    (
        "service_accounts other ns",
        pol(rule((Match(service_accounts=(ServiceAccountMatch("other", "sleep"),)),))),
        req(),
        False,
    ),
    (
        "service_accounts, plaintext never",
        pol(rule((Match(service_accounts=(ServiceAccountMatch("", ""),)),))),
        req(None),
        False,
    ),
    (
        "not_service_accounts, plaintext passes",
        pol(rule((Match(not_service_accounts=(ServiceAccountMatch("demo", "sleep"),)),))),
        req(None),
        True,
    ),
    ("source_ips CIDR contains", pol(rule((Match(source_ips=(net("10.0.0.0/24"),)),))), req(), True),
    ("source_ips CIDR outside", pol(rule((Match(source_ips=(net("10.9.0.0/24"),)),))), req(), False),
    ("not_source_ips excludes", pol(rule((Match(not_source_ips=(net("10.0.0.5/32"),)),))), req(), False),
    ("destination_ips = pod ip", pol(rule((Match(destination_ips=(net("10.0.1.7/32"),)),))), req(), True),
    ("not_destination_ips", pol(rule((Match(not_destination_ips=(net("10.0.1.0/24"),)),))), req(), False),
    ("destination_ports equality", pol(rule((Match(destination_ports=(8080,)),))), req(), True),
    ("destination_ports other", pol(rule((Match(destination_ports=(9090,)),))), req(), False),
    ("not_destination_ports", pol(rule((Match(not_destination_ports=(8080,)),))), req(), False),
    ("positive list is OR", pol(rule((Match(destination_ports=(1, 8080)),))), req(), True),
    ("negative list is NOR", pol(rule((Match(not_destination_ports=(1, 8080)),))), req(), False),
    (
        "AND across field types: port ok, principal not",
        pol(rule((Match(destination_ports=(8080,), principals=(exact("x"),)),))),
        req(),
        False,
    ),
    (
        "clause is OR across Matches",
        pol(rule((Match(destination_ports=(1,)), Match(destination_ports=(8080,))))),
        req(),
        True,
    ),
    (
        "rule is AND across clauses",
        pol(rule((Match(destination_ports=(8080,)),), (Match(principals=(exact("x"),)),))),
        req(),
        False,
    ),
    (
        "policy is OR across rules",
        pol(rule((Match(destination_ports=(1,)),)), rule((Match(destination_ports=(8080,)),))),
        req(),
        True,
    ),
    ("IPv6 source", pol(rule((Match(source_ips=(net("fd00::/64"),)),))), req(src="fd00::5"), True),
    ("'' never matches exact ''", pol(rule((Match(principals=(exact(""),)),))), req(None), False),
]


@pytest.mark.parametrize(
    ("case", "policy", "request_", "allowed"), MATCH_CASES, ids=[c[0] for c in MATCH_CASES]
)
def test_match_semantics(case: str, policy: L4Policy, request_: L4Request, allowed: bool) -> None:
    assert evaluate([policy], request_).allowed is allowed


def any_rule() -> Rule:
    return Rule(())


def no_match_rule() -> Rule:
    return rule((Match(destination_ports=(1,)),))


D_MATCH = pol(any_rule(), action=Action.DENY, name="deny-all")
D_NOMATCH = pol(no_match_rule(), action=Action.DENY, name="deny-none")
A_MATCH = pol(any_rule(), name="allow-all")
A_NOMATCH = pol(no_match_rule(), name="allow-none")
D_DRY = pol(any_rule(), action=Action.DENY, name="deny-dry", dry=True)
A_DRY = pol(any_rule(), name="allow-dry", dry=True)
A_DRY_NOMATCH = pol(no_match_rule(), name="allow-dry-none", dry=True)

# (case, policies, allowed, deciding policy, reason, status, dry-run hits)
DECISION_CASES = [
    ("no policies: allow", [], True, None, "no allow policies exist", 200, ()),
    (
        "matching DENY: explicitly denied",
        [D_MATCH],
        False,
        "demo/deny-all",
        "explicitly denied by: demo/deny-all",
        401,
        (),
    ),
    (
        "DENY wins over a matching ALLOW",
        [A_MATCH, D_MATCH],
        False,
        "demo/deny-all",
        "explicitly denied by: demo/deny-all",
        401,
        (),
    ),
    ("non-matching DENY alone: allow", [D_NOMATCH], True, None, "no allow policies exist", 200, ()),
    (
        "matching ALLOW: allowed by it",
        [A_MATCH],
        True,
        "demo/allow-all",
        "allowed by: demo/allow-all",
        200,
        (),
    ),
    ("ALLOW exists, none matches: not allowed", [A_NOMATCH], False, None, NOT_ALLOWED, 401, ()),
    (
        "one of two ALLOWs matches",
        [A_NOMATCH, A_MATCH],
        True,
        "demo/allow-all",
        "allowed by: demo/allow-all",
        200,
        (),
    ),
    (
        "dry-run DENY reported, not enforced",
        [D_DRY],
        True,
        None,
        "no allow policies exist",
        200,
        ("dry-run: deny policy match demo/deny-dry (rule 0)",),
    ),
    (
        "dry-run ALLOW does not count as an ALLOW",
        [A_DRY_NOMATCH],
        True,
        None,
        "no allow policies exist",
        200,
        ("dry-run: no allow policies match",),
    ),
    (
        "dry-run ALLOW match reported",
        [A_DRY],
        True,
        None,
        "no allow policies exist",
        200,
        ("dry-run: allow policy match demo/allow-dry (rule 0)",),
    ),
    (
        "dry-run ALLOW cannot rescue a real ALLOW miss",
        [A_NOMATCH, A_DRY],
        False,
        None,
        NOT_ALLOWED,
        401,
        ("dry-run: allow policy match demo/allow-dry (rule 0)",),
    ),
]


@pytest.mark.parametrize(
    ("case", "policies", "allowed", "policy", "reason", "status", "hits"),
    DECISION_CASES,
    ids=[c[0] for c in DECISION_CASES],
)
def test_decision_algorithm(
    case: str,
    policies: list[L4Policy],
    allowed: bool,
    policy: str | None,
    reason: str,
    status: int,
    hits: tuple[str, ...],
) -> None:
    d = evaluate(policies, req())
    assert (d.allowed, d.policy, d.reason, d.status, d.dry_run_hits) == (
        allowed,
        policy,
        reason,
        status,
        hits,
    )


def test_rule_index_is_reported() -> None:
    d = evaluate([pol(no_match_rule(), any_rule())], req())
    assert (d.allowed, d.rule) == (True, 1)


def test_never_matches_helper() -> None:
    assert pol().never_matches()
    assert pol(rule((Match(),))).never_matches()
    assert not pol(any_rule()).never_matches()


# ------------------------------------------------------------------------------- Hypothesis invariants

IDENTITIES = [None, SLEEP, OTHER, FOREIGN_TD]
PORTS = [80, 8080, 9090]

matches = st.builds(
    Match,
    principals=st.lists(
        st.sampled_from([exact(SLEEP[9:]), StringMatch("presence"), exact(OTHER[9:])]), max_size=2
    ).map(tuple),
    not_principals=st.lists(st.sampled_from([exact(SLEEP[9:]), StringMatch("presence")]), max_size=1).map(
        tuple
    ),
    destination_ports=st.lists(st.sampled_from(PORTS), max_size=2).map(tuple),
    source_ips=st.lists(st.sampled_from([net("10.0.0.0/24"), net("10.1.0.0/16")]), max_size=1).map(tuple),
)
clauses = st.builds(Clause, st.lists(matches, max_size=2).map(tuple))
rules = st.builds(Rule, st.lists(clauses, max_size=2).map(tuple))


@st.composite
def policies(draw: st.DrawFn) -> L4Policy:
    return L4Policy(
        name=f"p{draw(st.integers(0, 10_000))}",
        namespace="demo",
        scope=Scope.NAMESPACE,
        action=draw(st.sampled_from([Action.ALLOW, Action.DENY])),
        rules=tuple(draw(st.lists(rules, max_size=2))),
        dry_run=draw(st.booleans()),
    )


requests = st.builds(
    L4Request,
    src_ip=st.sampled_from(["10.0.0.5", "10.1.2.3", "192.168.0.1"]),
    dst_ip=st.just("10.0.1.7"),
    dst_port=st.sampled_from(PORTS),
    src_identity=st.sampled_from(IDENTITIES),
)
policy_lists = st.lists(policies(), max_size=6, unique_by=lambda p: p.name)


@settings(max_examples=150, deadline=None)
@given(policy_lists, requests)
def test_matching_deny_always_wins(pols: list[L4Policy], r: L4Request) -> None:
    deny = L4Policy("zz-deny", "demo", Scope.NAMESPACE, Action.DENY, (Rule(()),))
    assert not evaluate([*pols, deny], r).allowed


@settings(max_examples=150, deadline=None)
@given(policy_lists, requests)
def test_adding_a_policy_that_matches_nothing_never_changes_the_decision(
    pols: list[L4Policy], r: L4Request
) -> None:
    before = evaluate(pols, r)
    nothing_deny = L4Policy("zz-nothing", "demo", Scope.NAMESPACE, Action.DENY, ())
    assert evaluate([*pols, nothing_deny], r).allowed is before.allowed
    if any(p.action is Action.ALLOW and not p.dry_run for p in pols):
        # with an ALLOW already present, another ALLOW that matches nothing changes nothing
        nothing_allow = L4Policy(
            "zz-nothing-allow", "demo", Scope.NAMESPACE, Action.ALLOW, (rule((Match(),)),)
        )
        assert evaluate([*pols, nothing_allow], r) == before


@settings(max_examples=150, deadline=None)
@given(policy_lists, requests, st.randoms())
def test_policy_order_never_matters(pols: list[L4Policy], r: L4Request, rnd: random.Random) -> None:
    shuffled = list(pols)
    rnd.shuffle(shuffled)
    assert evaluate(shuffled, r) == evaluate(pols, r)


@settings(max_examples=150, deadline=None)
@given(policy_lists, policy_lists, requests)
def test_dry_run_never_changes_the_outcome(pols: list[L4Policy], extra: list[L4Policy], r: L4Request) -> None:
    enforced = [p for p in pols if not p.dry_run]
    dry = [L4Policy(f"dry-{p.name}", p.namespace, p.scope, p.action, p.rules, True) for p in extra]
    a, b = evaluate(enforced, r), evaluate([*enforced, *dry], r)
    assert (a.allowed, a.policy, a.reason, a.status) == (b.allowed, b.policy, b.reason, b.status)
