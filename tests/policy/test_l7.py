"""istio-ambient.md §6.2-§6.3 and security.md §1a: L7 matching at a waypoint, the path-normalization
bypass matrix, and the waypoint decision order. Every row states the expected status."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zerotunnel.config.model import (
    AuthorizationPolicy,
    Condition,
    ObjectMeta,
    Operation,
    PolicyTargetReference,
    Rule,
    Source,
)
from zerotunnel.policy.authn import AuthnResult
from zerotunnel.policy.l7 import L7Index, L7Policy, L7Request, canonical_host, evaluate, evaluate_tcp

GW = PolicyTargetReference("gateway.networking.k8s.io", "Gateway", "waypoint")
SLEEP = "spiffe://cluster.local/ns/demo/sa/sleep"


def ap(
    *rules: Rule,
    action: str = "ALLOW",
    name: str = "p",
    ns: str = "demo",
    dry: bool = False,
    refs: tuple[PolicyTargetReference, ...] = (GW,),
) -> AuthorizationPolicy:
    return AuthorizationPolicy(ObjectMeta(name, ns), None, refs, action, None, tuple(rules), dry)


def op(**kw: tuple[str, ...]) -> tuple[Operation, ...]:
    return (Operation(**kw),)


def src(**kw: tuple[str, ...]) -> tuple[Source, ...]:
    return (Source(**kw),)


def get(
    path: str = "/",
    method: str = "GET",
    host: str = "httpbin.demo",
    port: int = 8000,
    headers: tuple[tuple[str, str], ...] = (),
    identity: str | None = SLEEP,
    ip: str = "10.0.0.5",
) -> L7Request:
    return L7Request(method, path, host, port, headers, identity, ip)


def status(
    policies: list[AuthorizationPolicy],
    request: L7Request,
    mode: str = "BASE",
    authn: AuthnResult | None = None,
) -> int:
    return evaluate(
        [L7Policy.compile(p) for p in policies], request, path_normalization=mode, authn=authn
    ).status


# ------------------------------------------------------------------ bypass matrix (security.md §1a)

DENY_ADMIN = [ap(Rule(to=op(paths=("/admin",))), action="DENY")]
DENY_ADMIN_PREFIX = [ap(Rule(to=op(paths=("/admin*",))), action="DENY")]
ALLOW_NOT_ADMIN = [ap(Rule(to=op(not_paths=("/admin*",))))]

# case, policies, raw path, {mode: expected status}. 200 where a known bypass remains in that mode is
# written down on purpose: it is what Istio does, and why DECODE_AND_MERGE_SLASHES is recommended.
BYPASS = [
    (
        "/admin",
        DENY_ADMIN,
        "/admin",
        {"NONE": 403, "BASE": 403, "MERGE_SLASHES": 403, "DECODE_AND_MERGE_SLASHES": 403},
    ),
    (
        "//admin (CVE-2021-31920)",
        DENY_ADMIN,
        "//admin",
        {"NONE": 200, "BASE": 200, "MERGE_SLASHES": 403, "DECODE_AND_MERGE_SLASHES": 403},
    ),
    (
        "/%2Fadmin (CVE-2021-31920)",
        DENY_ADMIN,
        "/%2Fadmin",
        {"NONE": 200, "BASE": 200, "MERGE_SLASHES": 200, "DECODE_AND_MERGE_SLASHES": 403},
    ),
    (
        "/%5Cadmin",
        DENY_ADMIN,
        "/%5Cadmin",
        {"NONE": 200, "BASE": 200, "MERGE_SLASHES": 200, "DECODE_AND_MERGE_SLASHES": 403},
    ),
    (
        "\\admin",
        DENY_ADMIN,
        "\\admin",
        {"NONE": 200, "BASE": 403, "MERGE_SLASHES": 403, "DECODE_AND_MERGE_SLASHES": 403},
    ),
    (
        "/public/../admin (CVE-2019-9901)",
        DENY_ADMIN,
        "/public/../admin",
        {"NONE": 200, "BASE": 403, "MERGE_SLASHES": 403, "DECODE_AND_MERGE_SLASHES": 403},
    ),
    (
        "/public/%2e%2e/admin",
        DENY_ADMIN,
        "/public/%2e%2e/admin",
        {"NONE": 200, "BASE": 403, "MERGE_SLASHES": 403, "DECODE_AND_MERGE_SLASHES": 403},
    ),
    (
        "/%61dmin unreserved escape",
        DENY_ADMIN,
        "/%61dmin",
        {"NONE": 200, "BASE": 403, "MERGE_SLASHES": 403, "DECODE_AND_MERGE_SLASHES": 403},
    ),
    (
        "/admin#frag (CVE-2021-39156)",
        DENY_ADMIN,
        "/admin#frag",
        {"NONE": 403, "BASE": 403, "MERGE_SLASHES": 403, "DECODE_AND_MERGE_SLASHES": 403},
    ),
    (
        "/admin?x=1 (CVE-2020-8595)",
        DENY_ADMIN,
        "/admin?x=1",
        {"NONE": 403, "BASE": 403, "MERGE_SLASHES": 403, "DECODE_AND_MERGE_SLASHES": 403},
    ),
    (
        "/ADMIN: paths are case-sensitive",
        DENY_ADMIN,
        "/ADMIN",
        {"NONE": 200, "BASE": 200, "MERGE_SLASHES": 200, "DECODE_AND_MERGE_SLASHES": 200},
    ),
    (
        "/admin;x matrix param: not stripped (Envoy CVE-2026-73511 class)",
        DENY_ADMIN,
        "/admin;x",
        {"NONE": 200, "BASE": 200, "MERGE_SLASHES": 200, "DECODE_AND_MERGE_SLASHES": 200},
    ),
    (
        "/admin%00 is rejected",
        DENY_ADMIN,
        "/admin%00",
        {"NONE": 400, "BASE": 400, "MERGE_SLASHES": 400, "DECODE_AND_MERGE_SLASHES": 400},
    ),
    (
        "prefix DENY /admin*: //admin/x",
        DENY_ADMIN_PREFIX,
        "//admin/x",
        {"NONE": 200, "BASE": 200, "MERGE_SLASHES": 403, "DECODE_AND_MERGE_SLASHES": 403},
    ),
    (
        "ALLOW notPaths /admin*: //admin (bypass via notPaths)",
        ALLOW_NOT_ADMIN,
        "//admin",
        {"NONE": 200, "BASE": 200, "MERGE_SLASHES": 403, "DECODE_AND_MERGE_SLASHES": 403},
    ),
    (
        "ALLOW notPaths /admin*: /x/../admin",
        ALLOW_NOT_ADMIN,
        "/x/../admin",
        {"NONE": 200, "BASE": 403, "MERGE_SLASHES": 403, "DECODE_AND_MERGE_SLASHES": 403},
    ),
]


@pytest.mark.parametrize(("case", "policies", "raw", "expected"), BYPASS, ids=[c[0] for c in BYPASS])
def test_path_normalization_bypass_matrix(
    case: str, policies: list[AuthorizationPolicy], raw: str, expected: dict[str, int]
) -> None:
    assert {mode: status(policies, get(raw), mode) for mode in expected} == expected


PUBLIC = [ap(Rule(to=op(paths=("/public*",), methods=("GET",))))]
PUBLIC_VECTORS = [  # authz_test.go TestAuthz_PathNormalization
    ("/public", 200),
    ("/public/../public", 200),
    ("/private", 403),
    ("/public/../private", 403),
    ("/public/./../private", 403),
    ("/public/.././private", 403),
    ("/public/%2E%2E/private", 403),
    ("/public/%2e%2e/private", 403),
    ("/public/%2E/%2E%2E/private", 403),
    ("/public/%2e/%2e%2e/private", 403),
    ("/public/%2E%2E/%2E/private", 403),
    ("/public/%2e%2e/%2e/private", 403),
]


@pytest.mark.parametrize(("path", "expected"), PUBLIC_VECTORS)
def test_istio_path_normalization_vectors(path: str, expected: int) -> None:
    assert status(PUBLIC, get(path)) == expected


# ------------------------------------------------------------------------- L7 matching (§6.2)

ID_B = "spiffe://cluster.local/ns/demo/sa/cert-manager.io"
L7_CASES = [
    # case, policy (ALLOW unless stated), request, status
    ("method exact", ap(Rule(to=op(methods=("GET",)))), get(), 200),
    ("method other", ap(Rule(to=op(methods=("GET",)))), get(method="POST"), 403),
    ("notMethods", ap(Rule(to=op(not_methods=("POST",)))), get(method="POST"), 403),
    ("lower-case method is a 400", ap(Rule()), get(method="get"), 400),
    ("path exact", ap(Rule(to=op(paths=("/data",)))), get("/data"), 200),
    ("path exact ignores query", ap(Rule(to=op(paths=("/data",)))), get("/data?x=1"), 200),
    ("path exact is not a prefix", ap(Rule(to=op(paths=("/data",)))), get("/data/1"), 403),
    ("path prefix*", ap(Rule(to=op(paths=("/api/*",)))), get("/api/v1"), 200),
    ("path *suffix", ap(Rule(to=op(paths=("*.png",)))), get("/a/b.png"), 200),
    ("path * presence", ap(Rule(to=op(paths=("*",)))), get("/anything"), 200),
    (
        "template {*} one segment",
        ap(Rule(to=op(paths=("/users/{*}/profile",)))),
        get("/users/42/profile"),
        200,
    ),
    (
        "template {*} not two segments",
        ap(Rule(to=op(paths=("/users/{*}/profile",)))),
        get("/users/4/2/profile"),
        403,
    ),
    ("template {*} not empty", ap(Rule(to=op(paths=("/users/{*}/profile",)))), get("/users//profile"), 403),
    ("template {**} many segments", ap(Rule(to=op(paths=("/files/{**}",)))), get("/files/a/b/c.txt"), 200),
    ("template {**} zero segments", ap(Rule(to=op(paths=("/files/{**}",)))), get("/files/"), 200),
    ("template {**} other root", ap(Rule(to=op(paths=("/files/{**}",)))), get("/etc/passwd"), 403),
    (
        "host case-insensitive (CVE-2021-39155)",
        ap(Rule(to=op(hosts=("httpbin.demo",)))),
        get(host="HttpBin.Demo"),
        200,
    ),
    (
        "host exact does not match host:port",
        ap(Rule(to=op(hosts=("httpbin.demo",)))),
        get(host="httpbin.demo:8000"),
        403,
    ),
    (
        "host:* matches host:port",
        ap(Rule(to=op(hosts=("httpbin.demo", "httpbin.demo:*")))),
        get(host="httpbin.demo:8000"),
        200,
    ),
    ("host *.suffix", ap(Rule(to=op(hosts=("*.demo",)))), get(host="x.DEMO"), 200),
    (
        "host trailing dot canonicalized",
        ap(Rule(to=op(hosts=("httpbin.demo",)))),
        get(host="httpbin.demo."),
        200,
    ),
    ("notHosts case-insensitive", ap(Rule(to=op(not_hosts=("Admin.Demo",)))), get(host="admin.demo"), 403),
    ("ports", ap(Rule(to=op(ports=("8000",)))), get(), 200),
    ("ports other", ap(Rule(to=op(ports=("9000",)))), get(), 403),
    ("named port never matches at the waypoint", ap(Rule(to=op(ports=("http",)))), get(), 403),
    (
        "principals: spiffe:// prepended to the value",
        ap(Rule(from_=src(principals=("cluster.local/ns/demo/sa/sleep",)))),
        get(),
        200,
    ),
    ("principals written with spiffe:// never match", ap(Rule(from_=src(principals=(SLEEP,)))), get(), 403),
    ("principals, no client identity", ap(Rule(from_=src(principals=("*",)))), get(identity=None), 403),
    ("namespaces", ap(Rule(from_=src(namespaces=("demo",)))), get(), 200),
    (
        "serviceAccounts exact: '.' is not a wildcard (CVE-2026-39350)",
        ap(Rule(from_=src(service_accounts=("demo/cert-manager.io",)))),
        get(identity="spiffe://cluster.local/ns/demo/sa/cert-managerXio"),
        403,
    ),
    (
        "serviceAccounts exact match",
        ap(Rule(from_=src(service_accounts=("demo/cert-manager.io",)))),
        get(identity=ID_B),
        200,
    ),
    ("trustDomains", ap(Rule(from_=src(trust_domains=("cluster.local",)))), get(), 200),
    ("trustDomains other", ap(Rule(from_=src(trust_domains=("example.org",)))), get(), 403),
    ("ipBlocks = direct peer", ap(Rule(from_=src(ip_blocks=("10.0.0.0/24",)))), get(), 200),
    (
        "remoteIpBlocks uses remote ip",
        ap(Rule(from_=src(remote_ip_blocks=("192.168.0.0/16",)))),
        L7Request("GET", "/", "h", 80, (), SLEEP, "10.0.0.5", "192.168.1.1"),
        200,
    ),
    (
        "header when, name case-insensitive",
        ap(Rule(when=(Condition("request.headers[X-Env]", ("prod",)),))),
        get(headers=(("x-env", "prod"),)),
        200,
    ),
    (
        "duplicate headers joined with ','",
        ap(Rule(when=(Condition("request.headers[x-env]", ("prod,dev",)),))),
        get(headers=(("x-env", "prod"), ("X-Env", "dev"))),
        200,
    ),
    (
        "header prefix value",
        ap(Rule(when=(Condition("request.headers[user-agent]", ("curl/*",)),))),
        get(headers=(("User-Agent", "curl/8.0"),)),
        200,
    ),
    (
        "header missing: values fail",
        ap(Rule(when=(Condition("request.headers[x-env]", ("prod",)),))),
        get(),
        403,
    ),
    (
        "header missing: notValues pass",
        ap(Rule(when=(Condition("request.headers[x-env]", (), ("prod",)),))),
        get(),
        200,
    ),
    ("header name with whitespace → 400", ap(Rule()), get(headers=(("x env", "1"),)), 400),
    ("NUL in header value → 400", ap(Rule()), get(headers=(("x", "a\x00b"),)), 400),
    ("when source.namespace", ap(Rule(when=(Condition("source.namespace", ("demo",)),))), get(), 200),
    (
        "when source.principal",
        ap(Rule(when=(Condition("source.principal", ("cluster.local/ns/demo/sa/sleep",)),))),
        get(),
        200,
    ),
    ("when source.ip", ap(Rule(when=(Condition("source.ip", ("10.0.0.5",)),))), get(), 200),
    ("when destination.port", ap(Rule(when=(Condition("destination.port", ("8000",)),))), get(), 200),
    (
        "unknown when key never matches",
        ap(Rule(when=(Condition("experimental.envoy.filters.x", ("1",)),))),
        get(),
        403,
    ),
    (
        "from AND to AND when",
        ap(
            Rule(
                from_=src(namespaces=("demo",)),
                to=op(methods=("GET",)),
                when=(Condition("request.headers[x]", ("1",)),),
            )
        ),
        get(),
        403,
    ),
    ("ALLOW spec {}: allow nothing", ap(), get(), 403),
    ("ALLOW rules [{}]: allow all", ap(Rule()), get(), 200),
    (
        "DENY methods POST at the waypoint denies POST",
        ap(Rule(to=op(methods=("POST",))), action="DENY"),
        get(method="POST"),
        403,
    ),
    ("DENY methods POST lets GET through", ap(Rule(to=op(methods=("POST",))), action="DENY"), get(), 200),
    ("AUDIT never decides", ap(Rule(), action="AUDIT"), get(), 200),
    ("CUSTOM is ignored (reported)", ap(Rule(), action="CUSTOM"), get(), 200),
    ("dry-run DENY not enforced", ap(Rule(), action="DENY", dry=True), get(), 200),
]


@pytest.mark.parametrize(("case", "policy", "request_", "expected"), L7_CASES, ids=[c[0] for c in L7_CASES])
def test_l7_matching(case: str, policy: AuthorizationPolicy, request_: L7Request, expected: int) -> None:
    assert status([policy], request_) == expected


JWT_CLAIMS = {
    "iss": "https://issuer",
    "sub": "alice",
    "aud": ["api"],
    "azp": "web",
    "groups": ["admin", "dev"],
    "nested": {"role": "ops"},
}
AUTHN_CASES = [
    ("requestPrincipals '*' needs a valid JWT", ap(Rule(from_=src(request_principals=("*",)))), None, 403),
    (
        "requestPrincipals '*' with a valid JWT",
        ap(Rule(from_=src(request_principals=("*",)))),
        JWT_CLAIMS,
        200,
    ),
    (
        "requestPrincipals iss/sub",
        ap(Rule(from_=src(request_principals=("https://issuer/alice",)))),
        JWT_CLAIMS,
        200,
    ),
    (
        "requestPrincipals other sub",
        ap(Rule(from_=src(request_principals=("https://issuer/bob",)))),
        JWT_CLAIMS,
        403,
    ),
    (
        "notRequestPrincipals '*' denies tokenless in DENY",
        ap(Rule(from_=src(not_request_principals=("*",))), action="DENY"),
        None,
        403,
    ),
    (
        "claims list contains",
        ap(Rule(when=(Condition("request.auth.claims[groups]", ("admin",)),))),
        JWT_CLAIMS,
        200,
    ),
    (
        "nested claims",
        ap(Rule(when=(Condition("request.auth.claims[nested][role]", ("ops",)),))),
        JWT_CLAIMS,
        200,
    ),
    (
        "nested claims other",
        ap(Rule(when=(Condition("request.auth.claims[nested][role]", ("dev",)),))),
        JWT_CLAIMS,
        403,
    ),
    ("audiences", ap(Rule(when=(Condition("request.auth.audiences", ("api",)),))), JWT_CLAIMS, 200),
    ("presenter", ap(Rule(when=(Condition("request.auth.presenter", ("web",)),))), JWT_CLAIMS, 200),
    (
        "request.auth.principal",
        ap(Rule(when=(Condition("request.auth.principal", ("https://issuer/alice",)),))),
        JWT_CLAIMS,
        200,
    ),
]


@pytest.mark.parametrize(
    ("case", "policy", "claims", "expected"), AUTHN_CASES, ids=[c[0] for c in AUTHN_CASES]
)
def test_request_principals_and_claims(
    case: str, policy: AuthorizationPolicy, claims: dict[str, object] | None, expected: int
) -> None:
    assert status([policy], get(), authn=AuthnResult(claims=claims)) == expected


def test_invalid_jwt_is_401_before_any_policy() -> None:
    d = evaluate([L7Policy.compile(ap(Rule()))], get(), authn=AuthnResult(error="Jwt is expired"))
    assert (d.allowed, d.status, d.reason) == (False, 401, "jwt authentication failed: Jwt is expired")


def test_decision_reasons() -> None:
    deny = L7Policy.compile(ap(Rule(to=op(paths=("/admin",))), action="DENY", name="no-admin"))
    allow = L7Policy.compile(ap(Rule(to=op(methods=("GET",))), name="get-only"))
    d = evaluate([deny, allow], get("/admin"))
    assert (d.allowed, d.policy, d.rule, d.reason, d.status) == (
        False,
        "demo/no-admin",
        0,
        "explicitly denied by: demo/no-admin",
        403,
    )
    d = evaluate([deny, allow], get("/x", method="POST"))
    assert (d.allowed, d.policy, d.reason, d.status) == (
        False,
        None,
        "allow policies exist, but none allowed",
        403,
    )
    d = evaluate([deny, allow], get("/x"))
    assert (d.allowed, d.policy, d.reason) == (True, "demo/get-only", "allowed by: demo/get-only")
    d = evaluate([L7Policy.compile(ap(Rule(), action="DENY", name="dry", dry=True))], get())
    assert d.dry_run_hits == ("dry-run: deny policy match demo/dry (rule 0)",)
    d = evaluate([L7Policy.compile(ap(Rule(), action="CUSTOM", name="ext"))], get())
    assert any("CUSTOM" in w for w in d.warnings)


def test_index_attachment() -> None:
    """§4.4/§6.1: Gateway (same ns), Service (same ns), GatewayClass (root ns only); selector ignored."""
    svc = PolicyTargetReference("", "Service", "httpbin")
    cls = PolicyTargetReference("gateway.networking.k8s.io", "GatewayClass", "istio-waypoint")
    pols = [
        ap(Rule(), name="on-gw"),
        ap(Rule(), name="on-svc", refs=(svc,)),
        ap(Rule(), name="on-class", ns="istio-system", refs=(cls,)),
        ap(Rule(), name="class-wrong-ns", refs=(cls,)),
        ap(Rule(), name="selector-only", refs=()),
        ap(Rule(), name="other-ns-gw", ns="other"),
    ]
    idx = L7Index.build(pols)
    names = sorted(p.key for p in idx.for_waypoint("demo", "waypoint", service=("demo", "httpbin")))
    assert names == ["demo/on-gw", "demo/on-svc", "istio-system/on-class"]
    names = sorted(p.key for p in idx.for_waypoint("demo", "waypoint"))
    assert names == ["demo/on-gw", "istio-system/on-class"]


def test_canonical_host() -> None:
    assert canonical_host("Example.COM.") == "example.com"
    assert canonical_host("Example.com.:8080") == "example.com:8080"
    assert canonical_host("[::1]") == "[::1]"


# ------------------------------------------------------------------------------ Hypothesis invariants

_OPS = st.builds(
    Operation,
    methods=st.lists(st.sampled_from(["GET", "POST"]), max_size=1).map(tuple),
    paths=st.lists(st.sampled_from(["/admin*", "/api/{*}", "/x"]), max_size=1).map(tuple),
)
_SRCS = st.builds(Source, namespaces=st.lists(st.sampled_from(["demo", "other"]), max_size=1).map(tuple))
_RULES = st.builds(
    Rule, from_=st.lists(_SRCS, max_size=1).map(tuple), to=st.lists(_OPS, max_size=1).map(tuple)
)


@st.composite
def _policies(draw: st.DrawFn) -> list[AuthorizationPolicy]:
    n = draw(st.integers(0, 4))
    return [
        ap(
            *draw(st.lists(_RULES, max_size=2)),
            action=draw(st.sampled_from(["ALLOW", "DENY"])),
            name=f"p{i}",
            dry=draw(st.booleans()),
        )
        for i in range(n)
    ]


_REQS = st.builds(
    get,
    path=st.sampled_from(["/admin/x", "/api/1", "/x", "//admin", "/api/1/2"]),
    method=st.sampled_from(["GET", "POST"]),
    identity=st.sampled_from([SLEEP, "spiffe://cluster.local/ns/other/sa/c", None]),
)


@settings(max_examples=120, deadline=None)
@given(_policies(), _REQS, st.randoms())
def test_l7_invariants(pols: list[AuthorizationPolicy], request_: L7Request, rnd: random.Random) -> None:
    compiled = [L7Policy.compile(p) for p in pols]
    base = evaluate(compiled, request_)
    shuffled = list(compiled)
    rnd.shuffle(shuffled)
    assert evaluate(shuffled, request_) == base  # order never matters
    deny_all = L7Policy.compile(ap(Rule(), action="DENY", name="zz-deny"))
    assert evaluate([*compiled, deny_all], request_).status == 403  # a matching DENY always wins
    nothing = L7Policy.compile(ap(action="DENY", name="zz-nothing"))
    assert evaluate([*compiled, nothing], request_).allowed is base.allowed  # matches nothing: no change
    enforced = [c for c in compiled if not c.source.dry_run]
    dry = [
        L7Policy.compile(ap(*c.source.rules, action=c.action, name=f"dry-{c.key}", dry=True))
        for c in compiled
    ]
    a, b = evaluate(enforced, request_), evaluate([*enforced, *dry], request_)
    assert (a.allowed, a.policy, a.status) == (b.allowed, b.policy, b.status)  # dry-run never changes it


# ------------------------------------------------------------- non-HTTP traffic at the waypoint (§4.6)

TCP_CASES = [
    # case, policy, identity, port, (allowed, status)
    (
        "DENY methods: POST denies every TCP stream (unlike ztunnel's no-op, §10.2)",
        ap(Rule(to=op(methods=("POST",))), action="DENY"),
        SLEEP,
        8000,
        (False, 0),
    ),
    (
        "DENY ports + methods: denies all TCP on that port",
        ap(Rule(to=op(ports=("8000",), methods=("POST",))), action="DENY"),
        SLEEP,
        8000,
        (False, 0),
    ),
    (
        "DENY ports + methods: other port passes",
        ap(Rule(to=op(ports=("9000",), methods=("POST",))), action="DENY"),
        SLEEP,
        8000,
        (True, 200),
    ),
    (
        "ALLOW methods: rule skipped → nothing allowed",
        ap(Rule(to=op(methods=("GET",)))),
        SLEEP,
        8000,
        (False, 0),
    ),
    (
        "ALLOW principals: TCP-capable, allowed",
        ap(Rule(from_=src(principals=("cluster.local/ns/demo/sa/sleep",)))),
        SLEEP,
        8000,
        (True, 200),
    ),
    (
        "ALLOW when header: rule skipped",
        ap(Rule(when=(Condition("request.headers[x]", ("1",)),))),
        SLEEP,
        8000,
        (False, 0),
    ),
    (
        "DENY namespaces + header: header ignored → denies the namespace",
        ap(
            Rule(from_=src(namespaces=("demo",)), when=(Condition("request.headers[x]", ("1",)),)),
            action="DENY",
        ),
        SLEEP,
        8000,
        (False, 0),
    ),
    (
        "DENY requestPrincipals only: match-any → denies",
        ap(Rule(from_=src(request_principals=("*",))), action="DENY"),
        None,
        8000,
        (False, 0),
    ),
]


@pytest.mark.parametrize(
    ("case", "policy", "identity", "port", "expected"), TCP_CASES, ids=[c[0] for c in TCP_CASES]
)
def test_tcp_at_waypoint(
    case: str, policy: AuthorizationPolicy, identity: str | None, port: int, expected: tuple[bool, int]
) -> None:
    d = evaluate_tcp([L7Policy.compile(policy)], L7Request("", "", "", port, (), identity, "10.0.0.5"))
    assert (d.allowed, d.status) == expected


def test_claims_carried_on_the_request() -> None:
    policy = L7Policy.compile(ap(Rule(from_=src(request_principals=("https://issuer/alice",)))))
    with_claims = L7Request("GET", "/", "h", 80, (), SLEEP, "10.0.0.5", jwt_claims=JWT_CLAIMS)
    assert evaluate([policy], with_claims).status == 200
    assert evaluate([policy], get()).status == 403
