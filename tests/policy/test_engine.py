"""engine.py: the facade the proxies and `authz check` share, on configurations built in code.
Covers istio-ambient.md §6.1 (TestAuthorizationWaypointDefaultDeny), §4.4 attachment, §10.7, §10.9,
§10.12 and warnings."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from zerotunnel.config.model import (
    AuthorizationPolicy,
    JwtRule,
    ObjectMeta,
    PeerAuthentication,
    PolicyTargetReference,
    RequestAuthentication,
    Rule,
    Source,
    WorkloadSelector,
)
from zerotunnel.policy.engine import Engine
from zerotunnel.policy.l4 import L4Request
from zerotunnel.policy.l7 import L7Request

ROOT = "istio-system"
GW = PolicyTargetReference("gateway.networking.k8s.io", "Gateway", "waypoint")
GWC = PolicyTargetReference("gateway.networking.k8s.io", "GatewayClass", "istio-waypoint")
SLEEP = "spiffe://cluster.local/ns/demo/sa/sleep"
WAYPOINT_ID = "spiffe://cluster.local/ns/demo/sa/waypoint"
LABELS = {"app": "httpbin"}
NOW = datetime(2026, 11, 25, tzinfo=UTC)


def ap(
    name: str,
    *rules: Rule,
    ns: str = "demo",
    action: str = "ALLOW",
    selector: dict[str, str] | None = None,
    refs: tuple[PolicyTargetReference, ...] = (),
) -> AuthorizationPolicy:
    sel = WorkloadSelector(selector) if selector is not None else None
    return AuthorizationPolicy(ObjectMeta(name, ns), sel, refs, action, None, tuple(rules))


def l4(engine: Engine, identity: str | None, port: int = 8080) -> bool:
    return engine.check_l4("demo", LABELS, L4Request("10.0.0.1", "10.0.1.1", port, identity)).allowed


def l7(engine: Engine, path: str = "/", headers: tuple[tuple[str, str], ...] = ()) -> int:
    req = L7Request("GET", path, "httpbin", 8000, headers, SLEEP)
    return engine.check_l7("demo", "waypoint", req, now=NOW).status


def test_waypoint_default_deny() -> None:
    """§6.1: a root allow-nothing (no selector) denies at ztunnel; an ALLOW for the waypoint's identity
    restores; a GatewayClass-targeted policy with no rules denies at every waypoint."""
    allow_nothing = ap("allow-nothing", ns=ROOT)
    e = Engine.build([allow_nothing])
    assert not l4(e, WAYPOINT_ID)
    e = Engine.build([allow_nothing, ap("allow-wp", Rule(from_=(Source(principals=(WAYPOINT_ID[9:],)),)))])
    assert l4(e, WAYPOINT_ID)
    assert not l4(e, SLEEP)
    assert l7(e) == 200  # selector/namespace policies are not applied by the waypoint
    e = Engine.build([ap("wp-deny", ns=ROOT, refs=(GWC,))])
    assert l7(e) == 403
    # a GatewayClass ref outside the root namespace is not honoured
    assert l7(Engine.build([ap("wp-deny", refs=(GWC,))])) == 200


def test_targetref_policy_not_enforced_by_ztunnel() -> None:
    e = Engine.build([ap("l7", refs=(GW,))])
    assert l4(e, SLEEP)
    assert l7(e) == 403


def test_peer_authentication_and_authorization_compose() -> None:
    strict = PeerAuthentication(ObjectMeta("default", ROOT), None, "STRICT", {})
    allow_any = ap("allow-any", Rule())
    e = Engine.build([allow_any], [strict])
    assert not l4(e, None)
    assert l4(e, SLEEP)
    d = e.check_l4("demo", LABELS, L4Request("10.0.0.1", "10.0.1.1", 8080, None))
    assert d.reason == "explicitly denied by: istio-system/istio_converted_static_strict"


def test_status_warnings_reach_the_decision() -> None:
    e = Engine.build(
        [
            ap("http", Rule(to=()), Rule(from_=(Source(request_principals=("*",)),)), selector=LABELS),
            ap("audit", Rule(), action="AUDIT"),
        ]
    )
    d = e.check_l4("demo", LABELS, L4Request("10.0.0.1", "10.0.1.1", 8080, SLEEP))
    assert any(
        w.startswith("demo/http: ztunnel does not support HTTP attributes (found: requestPrincipals)")
        for w in d.warnings
    )
    assert "demo/audit: ztunnel does not support the AUDIT action (not sent to ztunnel)" in d.warnings


def test_destination_port_is_the_target_port() -> None:
    """§10.7: a policy on port 8080 (targetPort) — the Service port 8000 never appears at ztunnel."""
    from zerotunnel.config.model import Operation

    e = Engine.build([ap("p", Rule(to=(Operation(ports=("8000",)),)))])
    assert not l4(e, SLEEP, port=8080)


def test_trust_domain_aliases_not_honoured() -> None:
    """§10.9: a principal under an alias trust domain does not match a policy written for the main one."""
    e = Engine.build([ap("p", Rule(from_=(Source(principals=("cluster.local/ns/demo/sa/sleep",)),)))])
    assert not l4(e, "spiffe://old-td.local/ns/demo/sa/sleep")


def test_policy_change_re_evaluation() -> None:
    """§10.12: a connection admitted under one snapshot is re-checked against the next one."""
    request = L4Request("10.0.0.1", "10.0.1.1", 8080, SLEEP)
    before = Engine.build([])
    after = Engine.build([ap("deny", Rule(from_=(Source(namespaces=("demo",)),)), action="DENY")])
    assert before.check_l4("demo", LABELS, request).allowed
    assert not after.check_l4("demo", LABELS, request).allowed


def test_jwt_through_request_authentication_on_the_waypoint() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = json.dumps({"keys": [json.loads(RSAAlgorithm.to_jwk(key.public_key()))]})
    ra = RequestAuthentication(
        ObjectMeta("jwt", "demo"), None, (GW,), (JwtRule("https://issuer", jwks=jwks),)
    )
    require = ap("require-jwt", Rule(from_=(Source(request_principals=("*",)),)), refs=(GW,))
    e = Engine.build([require], [], [ra])
    good = jwt.encode(
        {"iss": "https://issuer", "sub": "a", "exp": int((NOW + timedelta(hours=1)).timestamp())},
        key,
        algorithm="RS256",
    )
    expired = jwt.encode(
        {"iss": "https://issuer", "sub": "a", "exp": int((NOW - timedelta(hours=1)).timestamp())},
        key,
        algorithm="RS256",
    )
    assert l7(e, headers=(("authorization", f"Bearer {good}"),)) == 200
    assert l7(e, headers=(("authorization", f"Bearer {expired}"),)) == 401
    assert l7(e) == 403  # no token: no request principal
    assert l7(e, path=f"/?access_token={good}") == 200


def test_tcp_stream_at_the_waypoint() -> None:
    """§4.6: the waypoint's TCP chain turns `DENY methods: [POST]` into deny-all for non-HTTP streams."""
    from zerotunnel.config.model import Operation

    e = Engine.build([ap("no-post", Rule(to=(Operation(methods=("POST",)),)), action="DENY", refs=(GW,))])
    d = e.check_l7_tcp("demo", "waypoint", L7Request("", "", "", 5432, (), SLEEP, "10.0.0.1"))
    assert (d.allowed, d.status, d.reason) == (False, 0, "explicitly denied by: demo/no-post")
    assert l7(e) == 200  # an HTTP GET is not denied
