"""The waypoint end to end on loopback: real TLS, real HBONE clients, the demo app behind a node proxy."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.waypoint.conftest import (
    SEED,
    SEED_POLICY,
    TD,
    WAYPOINT_YAML,
    Mesh,
    Pki,
    seed_with_waypoint,
    start_mesh,
)
from zerotunnel.config import load
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.node.hbone_client import HboneConnectError
from zerotunnel.waypoint.http import exchange


async def test_seed_policy_allows_get_data_from_app_b(mesh: Mesh) -> None:
    response = await mesh.request("GET", "/data")
    assert response.status == 200, response.body
    echo = json.loads(response.body)
    assert echo["path"] == "/data"
    assert echo["name"] == "app-a"
    # the destination node proxy saw the waypoint's identity, not app-b's (§6.1)
    assert [str(r.source_identity) for r in mesh.seen] == [f"spiffe://{TD}/ns/namespace-a/sa/waypoint"]
    assert mesh.waypoint.identity == SpiffeId.istio(TD, "namespace-a", "waypoint")


async def test_seed_policy_denies_post_and_app_c(mesh: Mesh) -> None:
    post = await mesh.request("POST", "/data", body=b"x")
    assert (post.status, post.body) == (403, b"RBAC: access denied")
    other = await mesh.request("GET", "/data", ns="namespace-c", sa="service-account-c")
    assert (other.status, other.body) == (403, b"RBAC: access denied")
    assert mesh.seen == []  # nothing denied ever reached the destination
    denied = [line for line in mesh.logs if line["response_code"] == 403]
    assert len(denied) == 2
    assert denied[0]["reason"] == "allow policies exist, but none allowed"
    assert denied[0]["response_code_details"] == "rbac_access_denied_matched_policy[none]"
    assert denied[1]["src_identity"].endswith("/ns/namespace-c/sa/service-account-c")


# -- the L7 allow/deny matrix of istio-ambient.md §6.2 ---------------------------------------------

JWT_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ISSUER = "https://issuer.example"


def _jwks(key: rsa.RSAPrivateKey) -> str:
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "k1"
    return json.dumps({"keys": [jwk]})


def _token(key: rsa.RSAPrivateKey = JWT_KEY, *, expired: bool = False, sub: str = "alice") -> str:
    now = datetime.now(UTC)
    exp = now - timedelta(minutes=5) if expired else now + timedelta(hours=1)
    body = {"iss": ISSUER, "sub": sub, "aud": "app-a", "exp": int(exp.timestamp())}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"})


MATRIX_POLICIES = f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-matrix, namespace: namespace-a}}
spec:
  targetRefs: [{{kind: Service, group: "", name: app-a}}]
  action: ALLOW
  rules:
    - to: [{{operation: {{methods: [GET, HEAD], paths: ["/public*"]}}}}]
    - to: [{{operation: {{methods: [GET], paths: ["/api/{{*}}/info", "/files/{{**}}"]}}}}]
    - to: [{{operation: {{methods: [POST], paths: [/submit]}}}}]
      when: [{{key: "request.headers[x-token]", values: [secret]}}]
    - to: [{{operation: {{hosts: [app-a.namespace-a.svc.cluster.local], paths: [/hosted]}}}}]
    - from: [{{source: {{requestPrincipals: ["{ISSUER}/alice"]}}}}]
      to: [{{operation: {{paths: [/jwt]}}}}]
    - from: [{{source: {{principals: [cluster.local/ns/namespace-c/sa/service-account-c]}}}}]
      to: [{{operation: {{paths: [/from-c]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: namespace-a}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
  action: DENY
  rules:
    - to: [{{operation: {{paths: ["/public/admin*"]}}}}]
    - when: [{{key: "request.headers[x-evil]", values: ["*"]}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: namespace-a}}
spec:
  targetRefs: [{{kind: Service, group: "", name: app-a}}]
  jwtRules:
    - issuer: {ISSUER}
      audiences: [app-a]
      jwks: '{_jwks(JWT_KEY)}'
"""

HOST = "app-a.namespace-a.svc.cluster.local"
B = ("namespace-b", "service-account-b")
C = ("namespace-c", "service-account-c")

# (case, source, method, path, host, headers, expected status)
MATRIX: list[tuple[str, tuple[str, str], str, str, str, list[tuple[str, str]], int]] = [
    ("method+prefix allowed", B, "GET", "/public/x", HOST, [], 200),
    ("HEAD allowed", B, "HEAD", "/public", HOST, [], 200),
    ("method not listed", B, "DELETE", "/public/x", HOST, [], 403),
    ("path outside prefix", B, "GET", "/private", HOST, [], 403),
    ("query ignored for paths", B, "GET", "/public?x=/private", HOST, [], 200),
    ("template one segment", B, "GET", "/api/v1/info", HOST, [], 200),
    ("template not two segments", B, "GET", "/api/v1/v2/info", HOST, [], 403),
    ("template double star", B, "GET", "/files/a/b/c.txt", HOST, [], 200),
    ("when header matches", B, "POST", "/submit", HOST, [("x-token", "secret")], 200),
    ("when header wrong", B, "POST", "/submit", HOST, [("x-token", "guess")], 403),
    ("when header missing", B, "POST", "/submit", HOST, [], 403),
    ("header name case-insensitive", B, "POST", "/submit", HOST, [("X-Token", "secret")], 200),
    (
        "duplicate headers merged before matching",
        B,
        "POST",
        "/submit",
        HOST,
        [("x-token", "secret"), ("x-token", "other")],
        403,
    ),
    ("hosts exact", B, "GET", "/hosted", HOST, [], 200),
    ("hosts case-insensitive", B, "GET", "/hosted", HOST.upper(), [], 200),
    ("hosts trailing dot", B, "GET", "/hosted", HOST + ".", [], 200),
    ("hosts other host", B, "GET", "/hosted", "evil.example", [], 403),
    ("hosts with port needs port entry", B, "GET", "/hosted", HOST + ":80", [], 403),
    ("principal allowed", C, "GET", "/from-c", HOST, [], 200),
    ("principal not allowed", B, "GET", "/from-c", HOST, [], 403),
    ("DENY wins over ALLOW", B, "GET", "/public/admin", HOST, [], 403),
    ("DENY on header presence", B, "GET", "/public/x", HOST, [("x-evil", "1")], 403),
    ("lowercase method is 400", B, "get", "/public/x", HOST, [], 400),
    ("valid JWT principal", B, "GET", "/jwt", HOST, [("authorization", "Bearer " + _token())], 200),
    ("no JWT: no request principal", B, "GET", "/jwt", HOST, [], 403),
    ("JWT other subject", B, "GET", "/jwt", HOST, [("authorization", "Bearer " + _token(sub="bob"))], 403),
    (
        "expired JWT is 401",
        B,
        "GET",
        "/public",
        HOST,
        [("authorization", "Bearer " + _token(expired=True))],
        401,
    ),
    (
        "JWT bad signature is 401",
        B,
        "GET",
        "/public",
        HOST,
        [("authorization", "Bearer " + _token(OTHER_KEY))],
        401,
    ),
    ("garbage JWT is 401", B, "GET", "/public", HOST, [("authorization", "Bearer not.a.jwt")], 401),
]


@pytest_asyncio.fixture
async def matrix_mesh(pki: Pki) -> AsyncIterator[Mesh]:
    m = await start_mesh(pki, seed_with_waypoint(MATRIX_POLICIES))
    yield m
    await m.close()


async def test_l7_matrix(matrix_mesh: Mesh) -> None:
    """Every case through a real tunnel; a request the waypoint denies never reaches app-a."""
    failures = []
    for case, (ns, sa), method, path, host, headers, expected in MATRIX:
        before = len(matrix_mesh.app_requests)
        response = await matrix_mesh.request(method, path, ns=ns, sa=sa, host=host, headers=headers)
        reached = len(matrix_mesh.app_requests) > before
        if response.status != expected or reached != (expected == 200):
            failures.append((case, response.status, expected, response.body[:80]))
        if expected == 403:
            assert response.body == b"RBAC: access denied", case
    assert failures == []
    bodies = {line["path"]: line for line in matrix_mesh.logs}
    assert bodies["/public/admin"]["policy"] == "namespace-a/deny-admin"
    assert bodies["/public/admin"]["reason"] == "explicitly denied by: namespace-a/deny-admin"


async def test_jwt_401_body_is_envoys_text(matrix_mesh: Mesh) -> None:
    expired = await matrix_mesh.request(
        "GET", "/public", headers=[("authorization", "Bearer " + _token(expired=True))]
    )
    assert (expired.status, expired.body) == (401, b"Jwt is expired")
    forged = await matrix_mesh.request(
        "GET", "/public", headers=[("authorization", "Bearer " + _token(OTHER_KEY))]
    )
    assert (forged.status, forged.body) == (401, b"Jwt verification fails")


# -- security.md §1a: the bypass matrix (zero bypasses) -------------------------------------------

# istio-ambient.md §6.3 TestAuthz_PathNormalization: ALLOW paths ["/public*"] methods [GET]
NORMALIZATION_ALLOWED = ["/public", "/public/../public"]
NORMALIZATION_DENIED = [
    "/private",
    "/public/../private",
    "/public/./../private",
    "/public/.././private",
    "/public/%2E%2E/private",
    "/public/%2e%2e/private",
    "/public/%2E/%2E%2E/private",
    "/public/%2e/%2e%2e/private",
    "/public/%2E%2E/%2E/private",
    "/public/%2e%2e/%2e/private",
]

BYPASS_POLICIES = """
apiVersion: zerotunnel.io/v1alpha1
kind: MeshConfig
spec: {pathNormalization: {normalization: DECODE_AND_MERGE_SLASHES}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: namespace-a}
spec:
  targetRefs: [{kind: Service, group: "", name: app-a}]
  action: DENY
  rules:
    - to: [{operation: {paths: ["/admin", "/admin/*"]}}]
    - to: [{operation: {hosts: ["internal.example", "internal.example:*"]}}]
"""
# Default allow + DENY /admin (the risky shape of security.md §1a): every spelling of /admin must be
# denied or refused, never delivered.
ADMIN_SPELLINGS = [
    "/admin",
    "//admin",
    "///admin",
    "/admin/",
    "/admin/x",
    "/./admin",
    "/x/../admin",
    "/%61dmin",
    "/%61%64min",
    "/%2Fadmin",
    "/%2fadmin",
    "/%5Cadmin",
    "/\\admin",
    "/admin#frag",
    "/admin?x=1",
    "/admin/./",
    "/x/%2E%2E/admin",
    "/public/..%2Fadmin",
    "/admin%00",
    "//%2f/admin",
]
HOST_SPELLINGS = [
    "internal.example",
    "INTERNAL.example",
    "internal.example.",
    "internal.example:80",
    "Internal.Example.:8080",
]


async def test_path_normalization_vectors(mesh_factory: Any) -> None:
    m = await mesh_factory("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: public, namespace: namespace-a}
spec:
  targetRefs: [{kind: Service, group: "", name: app-a}]
  action: ALLOW
  rules: [{to: [{operation: {methods: [GET], paths: ["/public*"]}}]}]
""")
    for path in NORMALIZATION_ALLOWED:
        response = await m.request("GET", path)
        assert response.status == 200, path
        assert json.loads(response.body)["path"] == "/public"  # forwarded normalized, once
    for path in NORMALIZATION_DENIED:
        response = await m.request("GET", path)
        assert response.status == 403, path
    assert len(m.app_requests) == len(NORMALIZATION_ALLOWED)


async def test_zero_bypasses(mesh_factory: Any) -> None:
    m = await mesh_factory(BYPASS_POLICIES)
    delivered = []
    for path in ADMIN_SPELLINGS:
        response = await m.request("GET", path)
        if response.status == 200:
            delivered.append((path, json.loads(response.body)["path"]))
        else:
            assert response.status in (400, 403), (path, response.status)
    for host in HOST_SPELLINGS:
        response = await m.request("GET", "/anything", host=host)
        if response.status == 200:
            delivered.append((host, "host"))
    assert delivered == []
    ok = await m.request("GET", "/administrator")  # not /admin: still allowed (no over-blocking)
    assert ok.status == 200


@pytest_asyncio.fixture
async def mesh_factory(pki: Pki) -> AsyncIterator[Any]:
    made: list[Mesh] = []

    async def make(extra: str) -> Mesh:
        m = await start_mesh(pki, seed_with_waypoint(extra))
        made.append(m)
        return m

    yield make
    for m in made:
        await m.close()


async def test_workload_addressed_traffic(pki: Pki) -> None:
    """A waypoint for `all` also takes traffic addressed to the pod itself (authority podIP:port,
    §2.4 step 4); one for `service` refuses it (503: not bound to this waypoint)."""
    m = await start_mesh(
        pki,
        seed_with_waypoint(
            SEED_POLICY.replace(
                'kind: Service, group: "", name: app-a',
                "kind: Gateway, group: gateway.networking.k8s.io, name: waypoint",
            ),
            waypoint_for="all",
        ),
    )
    try:
        app_ip = m.addresses.pod_ips["namespace-a/app-a"]
        channel = await m.open(authority=f"{app_ip}:8080")
        response = await exchange(channel, "GET", "/data", f"{app_ip}:8080", [], b"", timeout=10)
        assert response.status == 200
        assert json.loads(response.body)["path"] == "/data"
        channel = await m.open(authority=f"{app_ip}:8080")
        denied = await exchange(channel, "POST", "/data", f"{app_ip}:8080", [], b"", timeout=10)
        assert (denied.status, denied.body) == (403, b"RBAC: access denied")
    finally:
        await m.close()
    m = await start_mesh(pki, seed_with_waypoint(SEED_POLICY))
    try:
        app_ip = m.addresses.pod_ips["namespace-a/app-a"]
        try:
            await m.open(authority=f"{app_ip}:8080")
        except HboneConnectError as exc:
            assert exc.status == 401  # refused: "... is not served by waypoint namespace-a/waypoint"
        else:
            raise AssertionError("a service waypoint accepted workload-addressed traffic")
    finally:
        await m.close()


async def test_unbinding_closes_live_tunnels(mesh: Mesh) -> None:
    """security.md rule 11: a configuration that takes app-a away from the waypoint closes its live
    tunnels; a new one is refused."""
    channel = await mesh.open()
    first = await exchange(channel, "GET", "/data", "app-a", [], b"", timeout=10)
    assert first.status == 200
    config = load([("mesh.yaml", SEED.read_text()), ("waypoint.yaml", WAYPOINT_YAML)])  # no use-waypoint
    assert mesh.waypoint.apply(config, mesh.addresses, 2) == 1
    with pytest.raises(ConnectionResetError):
        await channel.recv()
    try:
        await mesh.open()
    except HboneConnectError as exc:
        assert exc.status == 401
    else:
        raise AssertionError("tunnel to an unbound destination accepted")
