"""RequestAuthentication: validating a request's JWT at the waypoint.

istio-ambient.md §6.2: a request carrying an invalid token is rejected with 401 whatever the
AuthorizationPolicy says; a request without a token passes with no request principal (only an ALLOW
with `requestPrincipals: ["*"]` makes a token mandatory). Pure: the JWKS text is passed in (inline
`jwks`, or what the shell fetched for `jwksUri`, keyed by URI) and so is `now` — PyJWT's own expiry
check would read the clock, so it is switched off and `exp`/`nbf` are checked here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jwt
from jwt import PyJWK, PyJWKSet
from jwt.exceptions import PyJWKError, PyJWKSetError, PyJWTError

from zerotunnel.config.model import JwtRule, RequestAuthentication

_ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA"]


@dataclass(frozen=True, slots=True)
class AuthnResult:
    """`error` (Envoy's 401 body text) when a token was present and invalid; `claims` of the first
    valid token; `principal` is `<iss>/<sub>` (what `requestPrincipals` matches)."""

    claims: Mapping[str, Any] | None = None
    error: str | None = None
    rule_issuer: str | None = None
    warnings: tuple[str, ...] = field(default=())

    @property
    def principal(self) -> str:
        if self.claims is None:
            return ""
        return f"{self.claims.get('iss', '')}/{self.claims.get('sub', '')}"


def _tokens(rule: JwtRule, headers: Mapping[str, str], params: Mapping[str, str]) -> list[str]:
    """Where Istio looks (request_authentication.proto): `Authorization: Bearer` and the
    `access_token` query parameter unless `fromHeaders`/`fromParams` say otherwise."""
    lower = {k.lower(): v for k, v in headers.items()}
    out: list[str] = []
    sources = rule.from_headers or (("authorization", "Bearer "),)
    for name, prefix in sources:
        value = lower.get(name.lower())
        if value is None:
            continue
        if prefix and not value.startswith(prefix):
            continue
        out.append(value[len(prefix) :].strip())
    for name in rule.from_params or (() if rule.from_headers else ("access_token",)):
        if name in params:
            out.append(params[name])
    return [t for t in out if t]


def _keys(rule: JwtRule, jwks_by_uri: Mapping[str, str]) -> list[PyJWK]:
    text = rule.jwks if rule.jwks is not None else jwks_by_uri.get(rule.jwks_uri or "")
    if text is None:
        return []
    try:
        data = json.loads(text)
        if isinstance(data, dict) and "keys" in data:
            return list(PyJWKSet.from_dict(data).keys)
        return [PyJWK.from_dict(data)]
    except (ValueError, PyJWKError, PyJWKSetError):
        return []


def _validate(token: str, rule: JwtRule, keys: list[PyJWK], now: datetime) -> dict[str, Any] | str:
    try:
        header = jwt.get_unverified_header(token)
    except PyJWTError:
        return "Jwt is not in the form of Header.Payload.Signature"
    kid = header.get("kid")
    candidates = [k for k in keys if kid is None or k.key_id in (None, kid)]
    claims: dict[str, Any] | None = None
    for key in candidates:
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=_ALGORITHMS,
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False},
            )
            break
        except PyJWTError:
            continue
    if claims is None:
        return "Jwt verification fails"
    ts = now.timestamp()
    exp = claims.get("exp")
    if isinstance(exp, int | float) and ts >= exp:
        return "Jwt is expired"
    nbf = claims.get("nbf")
    if isinstance(nbf, int | float) and ts < nbf:
        return "Jwt not yet valid"
    if rule.audiences:
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else list(aud or [])
        if not set(auds) & set(rule.audiences):
            return "Audiences in Jwt are not allowed"
    return claims


def authenticate(
    policies: Iterable[RequestAuthentication],
    headers: Mapping[str, str],
    params: Mapping[str, str],
    now: datetime,
    jwks_by_uri: Mapping[str, str] | None = None,
) -> AuthnResult:
    """Validate the request's token against every jwtRule of the applicable RequestAuthentications.
    A token whose issuer no rule names, or that fails its rule, makes the request invalid (401)."""
    rules = [r for p in policies for r in p.jwt_rules]
    if not rules:
        return AuthnResult()
    jwks_by_uri = jwks_by_uri or {}
    seen: set[str] = set()
    for rule in rules:
        for token in _tokens(rule, headers, params):
            if token in seen:
                continue
            seen.add(token)
            try:
                issuer = jwt.decode(token, options={"verify_signature": False}).get("iss")
            except PyJWTError:
                return AuthnResult(error="Jwt is not in the form of Header.Payload.Signature")
            matching = [r for r in rules if r.issuer == issuer]
            if not matching:
                return AuthnResult(error="Jwt issuer is not configured")
            last_error = "Jwt verification fails"
            for candidate in matching:
                outcome = _validate(token, candidate, _keys(candidate, jwks_by_uri), now)
                if isinstance(outcome, dict):
                    return AuthnResult(claims=outcome, rule_issuer=candidate.issuer)
                last_error = outcome
            return AuthnResult(error=last_error)
    return AuthnResult()
