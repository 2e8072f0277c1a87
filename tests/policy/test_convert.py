"""istio-ambient.md §4.4-§4.6 and §10.2-§10.4: AuthorizationPolicy → ztunnel L4 policy, as istiod
converts it, with the status text it writes. Each row: the policy, connections with the outcome the
converted policy gives them, and the exact status message (or None)."""

from __future__ import annotations

import pytest

from zerotunnel.config.model import (
    AuthorizationPolicy,
    Condition,
    ObjectMeta,
    Operation,
    PolicyTargetReference,
    Rule,
    Source,
    WorkloadSelector,
)
from zerotunnel.policy.convert import (
    HTTP_ALLOW_BOILERPLATE,
    HTTP_DENY_BOILERPLATE,
    HTTP_DENY_NOOP_BOILERPLATE,
    convert,
)
from zerotunnel.policy.l4 import L4Request, Scope, evaluate

SLEEP = "spiffe://cluster.local/ns/demo/sa/sleep"
OTHER = "spiffe://cluster.local/ns/other/sa/client"


def ap(
    *rules: Rule,
    action: str = "ALLOW",
    ns: str = "demo",
    name: str = "p",
    selector: dict[str, str] | None = None,
    target_refs: tuple[PolicyTargetReference, ...] = (),
    dry_run: bool = False,
) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        meta=ObjectMeta(name=name, namespace=ns),
        selector=WorkloadSelector(selector) if selector is not None else None,
        target_refs=target_refs,
        action=action,
        provider=None,
        rules=tuple(rules),
        dry_run=dry_run,
    )


def frm(**kw: tuple[str, ...]) -> tuple[Source, ...]:
    return (Source(**kw),)


def to(**kw: tuple[str, ...]) -> tuple[Operation, ...]:
    return (Operation(**kw),)


def status(found: str, boilerplate: str) -> str:
    return (
        f"ztunnel does not support HTTP attributes (found: {found}). In ambient mode you must use a "
        "waypoint proxy "
        f"to enforce HTTP rules. {boilerplate}"
    )


def conn(
    identity: str | None = SLEEP, port: int = 8080, src: str = "10.0.0.5", dst: str = "10.0.1.7"
) -> L4Request:
    return L4Request(src, dst, port, identity)


PLAIN = conn(None)
# The ALLOW rows are evaluated alone: "allowed" means the converted ALLOW matched.
# The DENY rows are evaluated alone: "allowed" False means the converted DENY fired.
CASES = [
    # case, policy, [(connection, allowed)], status
    (
        "ALLOW principals",
        ap(Rule(from_=frm(principals=("cluster.local/ns/demo/sa/sleep",)))),
        [(conn(), True), (conn(OTHER), False), (PLAIN, False)],
        None,
    ),
    (
        "ALLOW principals with spiffe:// never matches (ztunnel#1901)",
        ap(Rule(from_=frm(principals=(SLEEP,)))),
        [(conn(), False)],
        None,
    ),
    (
        "ALLOW principal '*' = any identity",
        ap(Rule(from_=frm(principals=("*",)))),
        [(conn(), True), (PLAIN, False)],
        None,
    ),
    (
        "ALLOW principal prefix",
        ap(Rule(from_=frm(principals=("cluster.local/ns/demo/*",)))),
        [(conn(), True), (conn(OTHER), False)],
        None,
    ),
    (
        "ALLOW principal suffix",
        ap(Rule(from_=frm(principals=("*/sa/client",)))),
        [(conn(), False), (conn(OTHER), True)],
        None,
    ),
    (
        "ALLOW namespaces",
        ap(Rule(from_=frm(namespaces=("demo",)))),
        [(conn(), True), (conn(OTHER), False)],
        None,
    ),
    (
        "ALLOW notNamespaces admits plaintext",
        ap(Rule(from_=frm(not_namespaces=("other",)))),
        [(conn(), True), (conn(OTHER), False), (PLAIN, True)],
        None,
    ),
    (
        "ALLOW serviceAccounts ns/sa",
        ap(Rule(from_=frm(service_accounts=("other/client",)))),
        [(conn(OTHER), True), (conn(), False)],
        None,
    ),
    (
        "ALLOW serviceAccounts bare sa = policy namespace",
        ap(Rule(from_=frm(service_accounts=("sleep",)))),
        [(conn(), True), (conn("spiffe://cluster.local/ns/x/sa/sleep"), False)],
        None,
    ),
    (
        "ALLOW ipBlocks address = /32",
        ap(Rule(from_=frm(ip_blocks=("10.0.0.5",)))),
        [(conn(), True), (conn(src="10.0.0.6"), False)],
        None,
    ),
    (
        "ALLOW ipBlocks CIDR",
        ap(Rule(from_=frm(ip_blocks=("10.0.0.0/8",)))),
        [(conn(src="10.9.9.9"), True)],
        None,
    ),
    (
        "ALLOW ipBlocks invalid entry dropped → empty Match → never",
        ap(Rule(from_=frm(ip_blocks=("nonsense",)))),
        [(conn(), False)],
        None,
    ),
    ("ALLOW notIpBlocks", ap(Rule(from_=frm(not_ip_blocks=("10.0.0.0/24",)))), [(conn(), False)], None),
    (
        "ALLOW ports numeric",
        ap(Rule(to=to(ports=("8080",)))),
        [(conn(), True), (conn(port=9090), False)],
        None,
    ),
    (
        "ALLOW notPorts",
        ap(Rule(to=to(not_ports=("8080",)))),
        [(conn(), False), (conn(port=9090), True)],
        None,
    ),
    (
        "§10.3 ALLOW named port dropped → empty Match → never allows, no status",
        ap(Rule(to=to(ports=("http",)))),
        [(conn(), False)],
        None,
    ),
    ("ALLOW port > 65535 dropped", ap(Rule(to=to(ports=("70000", "8080")))), [(conn(), True)], None),
    (
        "ALLOW from AND to",
        ap(Rule(from_=frm(principals=("cluster.local/ns/demo/sa/sleep",)), to=to(ports=("8080",)))),
        [(conn(), True), (conn(port=1), False), (conn(OTHER), False)],
        None,
    ),
    (
        "ALLOW from entries are OR",
        ap(Rule(from_=(Source(namespaces=("x",)), Source(namespaces=("demo",))))),
        [(conn(), True)],
        None,
    ),
    ("ALLOW rules: [{}] = allow all", ap(Rule()), [(conn(), True), (PLAIN, True)], None),
    ("ALLOW spec {} = allow nothing", ap(), [(conn(), False), (PLAIN, False)], None),
    (
        "when source.ip",
        ap(Rule(when=(Condition("source.ip", ("10.0.0.0/24",)),))),
        [(conn(), True), (conn(src="10.1.0.1"), False)],
        None,
    ),
    (
        "when source.namespace notValues",
        ap(Rule(when=(Condition("source.namespace", (), ("demo",)),))),
        [(conn(), False), (conn(OTHER), True)],
        None,
    ),
    (
        "when source.principal",
        ap(Rule(when=(Condition("source.principal", ("cluster.local/ns/other/*",)),))),
        [(conn(OTHER), True), (conn(), False)],
        None,
    ),
    (
        "when destination.ip",
        ap(Rule(when=(Condition("destination.ip", ("10.0.1.7",)),))),
        [(conn(), True), (conn(dst="10.0.1.8"), False)],
        None,
    ),
    (
        "when destination.port",
        ap(Rule(when=(Condition("destination.port", ("8080",)),))),
        [(conn(), True), (conn(port=80), False)],
        None,
    ),
    (
        "when conditions are ANDed",
        ap(Rule(when=(Condition("destination.port", ("8080",)), Condition("source.namespace", ("other",))))),
        [(conn(), False), (conn(OTHER), True)],
        None,
    ),
    (
        "trustDomains silently ignored → empty Match → never, no status",
        ap(Rule(from_=frm(trust_domains=("cluster.local",)))),
        [(conn(), False)],
        None,
    ),
    # ALLOW with HTTP attributes: the rule is dropped whole
    (
        "ALLOW methods: rule dropped → allow nothing",
        ap(Rule(to=to(methods=("GET",)))),
        [(conn(), False), (PLAIN, False)],
        status("methods", HTTP_ALLOW_BOILERPLATE),
    ),
    (
        "ALLOW L7 rule dropped, L4 rule kept",
        ap(Rule(to=to(paths=("/x",))), Rule(from_=frm(namespaces=("other",)))),
        [(conn(), False), (conn(OTHER), True)],
        status("paths", HTTP_ALLOW_BOILERPLATE),
    ),
    (
        "ALLOW remoteIpBlocks is HTTP-only (§10.4)",
        ap(Rule(from_=frm(remote_ip_blocks=("10.0.0.0/8",)))),
        [(conn(), False)],
        status("remoteIpBlocks", HTTP_ALLOW_BOILERPLATE),
    ),
    (
        "ALLOW requestPrincipals + when header: found list sorted",
        ap(
            Rule(
                from_=frm(request_principals=("*",)),
                to=to(hosts=("a",), not_paths=("/b",)),
                when=(Condition("request.headers[x-env]", ("prod",)),),
            )
        ),
        [(conn(), False)],
        status("hosts, notPaths, request.headers[x-env], requestPrincipals", HTTP_ALLOW_BOILERPLATE),
    ),
    (
        "ALLOW when request.auth.presenter",
        ap(Rule(when=(Condition("request.auth.presenter", ("x",)),))),
        [(conn(), False)],
        status("request.auth.presenter", HTTP_ALLOW_BOILERPLATE),
    ),
    # DENY with HTTP attributes: stripped, left-empty entries never match
    (
        "§10.2 DENY methods only: no-op at ztunnel",
        ap(Rule(to=to(methods=("POST",))), action="DENY"),
        [(conn(), True), (PLAIN, True)],
        status("methods", HTTP_DENY_NOOP_BOILERPLATE),
    ),
    (
        "DENY from principal + to methods: to-clause empty → rule never fires",
        ap(
            Rule(from_=frm(principals=("cluster.local/ns/demo/sa/sleep",)), to=to(methods=("POST",))),
            action="DENY",
        ),
        [(conn(), True)],
        status("methods", HTTP_DENY_NOOP_BOILERPLATE),
    ),
    (
        "DENY ports + methods: methods stripped, denies all of 8080 (more restrictive)",
        ap(Rule(to=to(ports=("8080",), methods=("POST",))), action="DENY"),
        [(conn(), False), (conn(port=9090), True)],
        status("methods", HTTP_DENY_BOILERPLATE),
    ),
    (
        "DENY one L7-only entry, one L4 entry in the same to: the L4 entry still fires",
        ap(Rule(to=(Operation(methods=("POST",)), Operation(ports=("9090",)))), action="DENY"),
        [(conn(), True), (conn(port=9090), False)],
        status("methods", HTTP_DENY_BOILERPLATE),
    ),
    (
        "DENY when header: when clause empty → no-op",
        ap(
            Rule(from_=frm(namespaces=("demo",)), when=(Condition("request.headers[x]", ("1",)),)),
            action="DENY",
        ),
        [(conn(), True)],
        status("request.headers[x]", HTTP_DENY_NOOP_BOILERPLATE),
    ),
    (
        "DENY named port: never denies, no status",
        ap(Rule(to=to(ports=("http",))), action="DENY"),
        [(conn(), True)],
        None,
    ),
    (
        "DENY principals",
        ap(Rule(from_=frm(principals=("cluster.local/ns/other/sa/client",))), action="DENY"),
        [(conn(OTHER), False), (conn(), True)],
        None,
    ),
    (
        "DENY notPrincipals '*' = deny plaintext",
        ap(Rule(from_=frm(not_principals=("*",))), action="DENY"),
        [(PLAIN, False), (conn(), True)],
        None,
    ),
    ("DENY rules: [{}] = deny all", ap(Rule(), action="DENY"), [(conn(), False)], None),
    ("DENY spec {} = never denies", ap(action="DENY"), [(conn(), True)], None),
]


@pytest.mark.parametrize(("case", "policy", "checks", "expected_status"), CASES, ids=[c[0] for c in CASES])
def test_conversion(
    case: str, policy: AuthorizationPolicy, checks: list[tuple[L4Request, bool]], expected_status: str | None
) -> None:
    conv = convert(policy)
    assert conv.policy is not None
    assert conv.status == expected_status
    for request, allowed in checks:
        assert evaluate([conv.policy], request).allowed is allowed, request


def test_not_sent_to_ztunnel() -> None:
    gw = PolicyTargetReference("gateway.networking.k8s.io", "Gateway", "waypoint")
    assert convert(ap(Rule(), target_refs=(gw,))).policy is None
    assert convert(ap(Rule(), target_refs=(gw,))).status is None
    audit = convert(ap(Rule(), action="AUDIT"))
    assert (audit.policy, audit.status) == (None, "ztunnel does not support the AUDIT action")
    custom = convert(ap(Rule(), action="CUSTOM"))
    assert (custom.policy, custom.status) == (None, "ztunnel does not support the CUSTOM action")


def test_scopes_and_dry_run() -> None:
    c = convert(ap(Rule()))
    assert c.policy is not None
    assert c.policy.scope is Scope.NAMESPACE
    c = convert(ap(Rule(), ns="istio-system"))
    assert c.policy is not None
    assert c.policy.scope is Scope.GLOBAL
    c = convert(ap(Rule(), selector={"app": "x"}))
    assert c.policy is not None
    assert (c.policy.scope, c.policy.selector) == (Scope.WORKLOAD_SELECTOR, (("app", "x"),))
    c = convert(ap(Rule(), dry_run=True))
    assert c.policy is not None
    assert c.policy.dry_run


def test_seed_first_example_is_allow_nothing_at_ztunnel() -> None:
    """seed §6 `app-a-allow-app-b-only`: methods+paths at a node proxy ⇒ the rule is dropped and the ALLOW
    policy allows nothing — even app-b is refused."""
    seed = ap(
        Rule(
            from_=frm(principals=("cluster.local/ns/namespace-b/sa/service-account-b",)),
            to=to(methods=("GET",), paths=("/data",)),
        ),
        ns="namespace-a",
        name="app-a-allow-app-b-only",
        selector={"app": "app-a"},
    )
    conv = convert(seed)
    assert conv.policy is not None
    assert conv.policy.rules == ()
    assert conv.status == status("methods, paths", HTTP_ALLOW_BOILERPLATE)
    d = evaluate([conv.policy], conn("spiffe://cluster.local/ns/namespace-b/sa/service-account-b"))
    assert (d.allowed, d.reason) == (False, "allow policies exist, but none allowed")
