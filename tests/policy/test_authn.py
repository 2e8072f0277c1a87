"""istio-ambient.md §6.2: RequestAuthentication — a valid JWT yields claims and `iss/sub`; an expired,
wrongly issued, mis-signed or wrong-audience token is a 401; no token is not an error. Real RS256
tokens signed with a fresh key; `now` passed in."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from zerotunnel.config.model import JwtRule, ObjectMeta, RequestAuthentication
from zerotunnel.policy.authn import authenticate

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks(key: rsa.RSAPrivateKey, kid: str = "k1") -> str:
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = kid
    return json.dumps({"keys": [jwk]})


def token(key: rsa.RSAPrivateKey = KEY, kid: str = "k1", **claims: object) -> str:
    body: dict[str, object] = {
        "iss": "https://issuer",
        "sub": "alice",
        "aud": "api",
        "exp": int((NOW + timedelta(hours=1)).timestamp()),
    }
    body.update(claims)
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


def ra(*rules: JwtRule) -> RequestAuthentication:
    return RequestAuthentication(ObjectMeta("jwt", "demo"), None, (), tuple(rules))


RULE = JwtRule(issuer="https://issuer", audiences=("api",), jwks=jwks(KEY))
BEARER = "Bearer "

# case, headers, params, expected error (None = valid or absent), expected principal
CASES = [
    ("valid token", {"Authorization": BEARER + token()}, {}, None, "https://issuer/alice"),
    ("no token: accepted, no principal", {}, {}, None, ""),
    (
        "expired",
        {"Authorization": BEARER + token(exp=int((NOW - timedelta(seconds=1)).timestamp()))},
        {},
        "Jwt is expired",
        "",
    ),
    (
        "exp == now is expired",
        {"Authorization": BEARER + token(exp=int(NOW.timestamp()))},
        {},
        "Jwt is expired",
        "",
    ),
    (
        "not yet valid",
        {"Authorization": BEARER + token(nbf=int((NOW + timedelta(minutes=5)).timestamp()))},
        {},
        "Jwt not yet valid",
        "",
    ),
    (
        "wrong issuer",
        {"Authorization": BEARER + token(iss="https://evil")},
        {},
        "Jwt issuer is not configured",
        "",
    ),
    ("bad signature", {"Authorization": BEARER + token(OTHER_KEY)}, {}, "Jwt verification fails", ""),
    (
        "wrong audience",
        {"Authorization": BEARER + token(aud="other")},
        {},
        "Audiences in Jwt are not allowed",
        "",
    ),
    (
        "audience list intersects",
        {"Authorization": BEARER + token(aud=["x", "api"])},
        {},
        None,
        "https://issuer/alice",
    ),
    (
        "garbage token",
        {"Authorization": BEARER + "not-a-jwt"},
        {},
        "Jwt is not in the form of Header.Payload.Signature",
        "",
    ),
    ("access_token query parameter", {}, {"access_token": token()}, None, "https://issuer/alice"),
    ("header name case-insensitive", {"authorization": BEARER + token()}, {}, None, "https://issuer/alice"),
    ("no Bearer prefix: not a token here", {"Authorization": token()}, {}, None, ""),
]


@pytest.mark.parametrize(
    ("case", "headers", "params", "error", "principal"), CASES, ids=[c[0] for c in CASES]
)
def test_authenticate(
    case: str, headers: dict[str, str], params: dict[str, str], error: str | None, principal: str
) -> None:
    result = authenticate([ra(RULE)], headers, params, NOW)
    assert (result.error, result.principal) == (error, principal)


def test_jwks_uri_text_passed_in_by_the_shell() -> None:
    rule = JwtRule(issuer="https://issuer", jwks_uri="https://issuer/jwks.json")
    ok = authenticate(
        [ra(rule)], {"Authorization": BEARER + token()}, {}, NOW, {"https://issuer/jwks.json": jwks(KEY)}
    )
    assert ok.error is None
    assert ok.claims is not None
    assert ok.claims["sub"] == "alice"
    missing = authenticate([ra(rule)], {"Authorization": BEARER + token()}, {}, NOW)
    assert missing.error == "Jwt verification fails"


def test_custom_from_headers() -> None:
    rule = JwtRule(issuer="https://issuer", jwks=jwks(KEY), from_headers=(("x-jwt", ""),))
    assert authenticate([ra(rule)], {"X-JWT": token()}, {}, NOW).principal == "https://issuer/alice"
    # with fromHeaders set, the default Authorization header is not consulted
    assert authenticate([ra(rule)], {"Authorization": BEARER + token()}, {}, NOW).principal == ""


def test_no_request_authentication_means_no_validation() -> None:
    result = authenticate([], {"Authorization": BEARER + "garbage"}, {}, NOW)
    assert (result.error, result.claims) == (None, None)


def test_several_issuers() -> None:
    rule2 = JwtRule(issuer="https://other", jwks=jwks(OTHER_KEY, "k2"))
    result = authenticate(
        [ra(RULE, rule2)],
        {"Authorization": BEARER + token(OTHER_KEY, "k2", iss="https://other", aud="x")},
        {},
        NOW,
    )
    assert result.principal == "https://other/alice"
