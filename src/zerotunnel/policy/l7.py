"""L7 authorization at a waypoint: AuthorizationPolicy on HTTP requests, with Envoy RBAC's semantics.

istio-ambient.md §6. Policies reach a waypoint only through `targetRefs` (§4.4, §6.1): a waypoint
`Gateway` (whole waypoint), a `Service` (that service's traffic) or the `GatewayClass istio-waypoint`
from the root namespace (every waypoint); `selector` policies are ignored by waypoints. The decision
order is Envoy's: CUSTOM (not supported here: reported, ignored), DENY, ALLOW; AUDIT never decides.
The request is normalized first (normalize.py) and refused with 400 when it cannot be (security.md
§1a), and an invalid JWT is refused with 401 before any policy (§6.2).
"""

from __future__ import annotations

import ipaddress
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from zerotunnel.config.model import AuthorizationPolicy, Condition, Operation, Source
from zerotunnel.config.model import Rule as IstioRule
from zerotunnel.policy.authn import AuthnResult
from zerotunnel.policy.convert import parse_cidrs, parse_service_accounts
from zerotunnel.policy.decision import NOT_ALLOWED, Decision, explicitly_denied
from zerotunnel.policy.l4 import SPIFFE_PREFIX, IPAddress, StringMatch, parse_identity
from zerotunnel.policy.normalize import BadRequest, normalize

GATEWAY_GROUP = "gateway.networking.k8s.io"
_METHOD = re.compile(r"^[A-Z]+$")
_CLAIM_KEY = re.compile(r"^request\.auth\.claims((?:\[[^\]]+\])+)$")
_HEADER_KEY = re.compile(r"^request\.headers\[(.+)\]$")
_BAD_HEADER_NAME = re.compile(r"[\s\x00-\x1f\x7f]")

L7_WHEN_KEYS = (
    "request.headers[...]",
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "destination.ip",
    "destination.port",
    "connection.sni",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "request.auth.claims[...]",
)


@dataclass(frozen=True, slots=True)
class L7Request:
    """An HTTP request as the waypoint sees it. `path` is the raw request target (query and fragment
    included); `headers` keep duplicates, in order; `source_identity` is the client's SPIFFE ID from
    the HBONE mTLS handshake (None if none); `remote_ip` is the XFF-derived client (defaults to
    `source_ip`); `port` is the destination port the client addressed; `jwt_claims` are the claims of
    an already validated JWT (used when `evaluate` is not given an `AuthnResult`)."""

    method: str
    path: str
    host: str
    port: int
    headers: tuple[tuple[str, str], ...] = ()
    source_identity: str | None = None
    source_ip: str = "0.0.0.0"  # noqa: S104 - an address value, not a bind
    remote_ip: str | None = None
    destination_ip: str = "0.0.0.0"  # noqa: S104 - an address value, not a bind
    sni: str = ""
    jwt_claims: Mapping[str, Any] | None = None


def canonical_host(host: str) -> str:
    """security.md §1a: lowercase, strip one trailing dot of the name (the port is kept: Istio's
    exact `hosts` entry does not match `name:port`, §6.2)."""
    host = host.lower()
    name, sep, port = (
        host.rpartition(":") if not host.endswith("]") and host.count(":") == 1 else (host, "", "")
    )
    name = name.removesuffix(".")
    return f"{name}{sep}{port}"


@dataclass(frozen=True, slots=True)
class _Ctx:
    method: str
    path: str
    host: str
    port: int
    headers: Mapping[str, str]
    principal: str
    namespace: str
    service_account: str
    src_ip: IPAddress
    remote_ip: IPAddress
    dst_ip: IPAddress
    sni: str
    request_principal: str
    claims: Mapping[str, Any] | None


def _template(value: str) -> Callable[[str], bool]:
    parts = re.split(r"(\{\*\*\}|\{\*\})", value)
    rx = "".join("[^/]+" if p == "{*}" else ".*" if p == "{**}" else re.escape(p) for p in parts)
    compiled = re.compile(rx)
    return lambda path: compiled.fullmatch(path) is not None


def _path_matcher(value: str) -> Callable[[str], bool]:
    if "{*}" in value or "{**}" in value:
        return _template(value)
    sm = StringMatch.parse(value)
    return lambda path: bool(path) and sm.matches(path)


def _str_matchers(values: Iterable[str], lower: bool = False) -> tuple[StringMatch, ...]:
    return tuple(StringMatch.parse(v.lower() if lower else v) for v in values)


def _any_str(ms: tuple[StringMatch, ...], value: str) -> bool:
    return any(m.matches(value) for m in ms)


_Pred = Callable[[_Ctx], bool]


def _field(pos: bool, values: tuple[Any, ...], test: Callable[[Any], _Pred]) -> _Pred | None:
    if not values:
        return None
    preds = tuple(test(v) for v in values)
    if pos:
        return lambda ctx: any(p(ctx) for p in preds)
    return lambda ctx: not any(p(ctx) for p in preds)


def _ip_in(attr: str) -> Callable[[Any], _Pred]:
    return lambda net: lambda ctx: getattr(ctx, attr) in net


def _str_on(get: Callable[[_Ctx], str]) -> Callable[[Any], _Pred]:
    return lambda sm: lambda ctx: sm.matches(get(ctx))


def _sa_eq(sa: Any) -> _Pred:
    return lambda ctx: (
        bool(ctx.principal)
        and (ctx.namespace, ctx.service_account)
        == (
            sa.namespace,
            sa.service_account,
        )
    )


def _td(td: str) -> _Pred:
    return lambda ctx: bool(ctx.principal) and ctx.principal.startswith(td + "/")


def _all(preds: Iterable[_Pred | None]) -> _Pred:
    live = tuple(p for p in preds if p is not None)
    return lambda ctx: all(p(ctx) for p in live)


def _compile_source(src: Source, namespace: str) -> _Pred:
    return _all(
        (
            _field(True, _str_matchers(src.principals), _str_on(lambda c: c.principal)),
            _field(False, _str_matchers(src.not_principals), _str_on(lambda c: c.principal)),
            _field(True, _str_matchers(src.request_principals), _str_on(lambda c: c.request_principal)),
            _field(False, _str_matchers(src.not_request_principals), _str_on(lambda c: c.request_principal)),
            _field(True, _str_matchers(src.namespaces), _str_on(lambda c: c.namespace)),
            _field(False, _str_matchers(src.not_namespaces), _str_on(lambda c: c.namespace)),
            _field(True, parse_cidrs(src.ip_blocks), _ip_in("src_ip")),
            _field(False, parse_cidrs(src.not_ip_blocks), _ip_in("src_ip")),
            _field(True, parse_cidrs(src.remote_ip_blocks), _ip_in("remote_ip")),
            _field(False, parse_cidrs(src.not_remote_ip_blocks), _ip_in("remote_ip")),
            _field(True, parse_service_accounts(src.service_accounts, namespace), _sa_eq),
            _field(False, parse_service_accounts(src.not_service_accounts, namespace), _sa_eq),
            _field(True, src.trust_domains, _td),
            _field(False, src.not_trust_domains, _td),
        )
    )


def _port_eq(value: str) -> _Pred:
    return lambda ctx: value.isdigit() and int(value) == ctx.port


def _compile_operation(op: Operation) -> _Pred:
    def path_pred(v: str) -> _Pred:
        m = _path_matcher(v)
        return lambda ctx: m(ctx.path)

    return _all(
        (
            _field(True, _str_matchers(op.hosts, lower=True), _str_on(lambda c: c.host)),
            _field(False, _str_matchers(op.not_hosts, lower=True), _str_on(lambda c: c.host)),
            _field(True, op.ports, _port_eq),
            _field(False, op.not_ports, _port_eq),
            _field(True, _str_matchers(op.methods), _str_on(lambda c: c.method)),
            _field(False, _str_matchers(op.not_methods), _str_on(lambda c: c.method)),
            _field(True, op.paths, path_pred),
            _field(False, op.not_paths, path_pred),
        )
    )


def _claim(ctx: _Ctx, path: list[str]) -> list[str]:
    node: Any = ctx.claims
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return []
        node = node[key]
    if isinstance(node, str):
        return [node]
    if isinstance(node, bool):
        return [str(node).lower()]
    if isinstance(node, int | float):
        return [str(node)]
    if isinstance(node, list):
        return [str(x) for x in node if isinstance(x, str | int | float)]
    return []


def when_getter(key: str) -> Callable[[_Ctx], list[str]] | None:
    """The request attribute a `when` key reads, as a list of strings; None for unknown keys."""
    simple: dict[str, Callable[[_Ctx], list[str]]] = {
        "source.namespace": lambda c: [c.namespace],
        "source.principal": lambda c: [c.principal],
        "source.serviceAccount": lambda c: [f"{c.namespace}/{c.service_account}"] if c.principal else [""],
        "connection.sni": lambda c: [c.sni],
        "request.auth.principal": lambda c: [c.request_principal],
        "request.auth.audiences": lambda c: _claim(c, ["aud"]),
        "request.auth.presenter": lambda c: _claim(c, ["azp"]),
        "destination.port": lambda c: [str(c.port)],
    }
    if key in simple:
        return simple[key]
    m = _HEADER_KEY.match(key)
    if m:
        name = m.group(1).lower()
        return lambda c: [c.headers.get(name, "")]
    m = _CLAIM_KEY.match(key)
    if m:
        path = re.findall(r"\[([^\]]+)\]", m.group(1))
        return lambda c: _claim(c, path)
    return None


def _compile_condition(cond: Condition) -> tuple[_Pred, str | None]:
    if cond.key in ("source.ip", "remote.ip", "destination.ip"):
        attr = {"source.ip": "src_ip", "remote.ip": "remote_ip", "destination.ip": "dst_ip"}[cond.key]
        return _all(
            (
                _field(True, parse_cidrs(cond.values), _ip_in(attr)),
                _field(False, parse_cidrs(cond.not_values), _ip_in(attr)),
            )
        ), None
    getter = when_getter(cond.key)
    if getter is None:
        return (lambda ctx: False), f"unsupported condition key {cond.key!r}: the rule never matches"
    get = getter
    pos = _str_matchers(cond.values)
    neg = _str_matchers(cond.not_values)

    def pred(ctx: _Ctx) -> bool:
        values = get(ctx)
        if pos and not any(_any_str(pos, v) for v in values):
            return False
        return not (neg and any(_any_str(neg, v) for v in values))

    return pred, None


@dataclass(frozen=True, slots=True)
class L7Rule:
    predicate: _Pred


@dataclass(frozen=True, slots=True)
class L7Policy:
    """An AuthorizationPolicy compiled for a waypoint; `warnings` are per-policy notes."""

    source: AuthorizationPolicy
    rules: tuple[L7Rule, ...]
    warnings: tuple[str, ...]
    tcp_rules: tuple[L7Rule, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.source.meta.namespace}/{self.source.meta.name}"

    @property
    def action(self) -> str:
        return self.source.action

    def matching_rule(self, ctx: _Ctx, *, tcp: bool = False) -> int | None:
        for i, rule in enumerate(self.tcp_rules if tcp else self.rules):
            if rule.predicate(ctx):
                return i
        return None

    @classmethod
    def compile(cls, policy: AuthorizationPolicy) -> L7Policy:
        rules: list[L7Rule] = []
        tcp_rules: list[L7Rule] = []
        warnings: list[str] = []
        for rule in policy.rules:
            rules.append(L7Rule(_compile_rule(rule, policy.meta.namespace, warnings)))
            tcp_rule = tcp_view(rule, policy.action)
            tcp_rules.append(
                L7Rule(_never if tcp_rule is None else _compile_rule(tcp_rule, policy.meta.namespace, []))
            )
        if policy.action == "CUSTOM":
            warnings.append(
                f"{policy.meta.namespace}/{policy.meta.name}: CUSTOM action (external authorizer "
                f"{policy.provider!r}) is not supported by zerotunnel's waypoint; the policy is ignored"
            )
        return cls(policy, tuple(rules), tuple(warnings), tuple(tcp_rules))


def _never(ctx: _Ctx) -> bool:
    return False


TCP_WHEN_KEYS = frozenset(
    {
        "source.ip",
        "source.namespace",
        "source.principal",
        "source.serviceAccount",
        "remote.ip",
        "destination.ip",
        "destination.port",
        "connection.sni",
    }
)


def tcp_view(rule: IstioRule, action: str) -> IstioRule | None:
    """The rule as Envoy enforces it on a TCP (non-HTTP) filter chain (istio-ambient.md §4.6): an ALLOW
    rule with any HTTP-only field is dropped (None); a DENY rule loses its HTTP-only fields, each
    treated as "match any", so `DENY methods: [POST]` denies every TCP connection. This is the
    opposite of ztunnel's DENY conversion (§10.2), which is why both exist."""
    http = (
        any(o.hosts or o.not_hosts or o.methods or o.not_methods or o.paths or o.not_paths for o in rule.to)
        or any(s.request_principals or s.not_request_principals for s in rule.from_)
        or any(c.key not in TCP_WHEN_KEYS for c in rule.when)
    )
    if not http:
        return rule
    if action != "DENY":
        return None
    return replace(
        rule,
        to=tuple(
            replace(o, hosts=(), not_hosts=(), methods=(), not_methods=(), paths=(), not_paths=())
            for o in rule.to
        ),
        from_=tuple(replace(s, request_principals=(), not_request_principals=()) for s in rule.from_),
        when=tuple(c for c in rule.when if c.key in TCP_WHEN_KEYS),
    )


def _compile_rule(rule: IstioRule, namespace: str, warnings: list[str]) -> _Pred:
    froms = tuple(_compile_source(s, namespace) for s in rule.from_)
    tos = tuple(_compile_operation(o) for o in rule.to)
    whens = []
    for cond in rule.when:
        pred, warning = _compile_condition(cond)
        whens.append(pred)
        if warning:
            warnings.append(warning)

    def rule_pred(ctx: _Ctx) -> bool:
        return (
            (not froms or any(f(ctx) for f in froms))
            and (not tos or any(t(ctx) for t in tos))
            and all(w(ctx) for w in whens)
        )

    return rule_pred


def _ip(value: str) -> IPAddress:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return ipaddress.ip_address("0.0.0.0")  # noqa: S104 - an address value, not a bind


def validate_request(request: L7Request, path_normalization: str) -> str:
    """The checks Envoy makes before RBAC (§6.2-§6.3, security.md §1a); returns the normalized path
    or raises BadRequest (400)."""
    if not _METHOD.match(request.method):
        raise BadRequest(f"invalid method {request.method!r}: methods must be upper case")
    for name, value in request.headers:
        if not name or _BAD_HEADER_NAME.search(name):
            raise BadRequest(f"invalid header name {name!r}")
        if any(ch in value for ch in "\x00\r\n"):
            raise BadRequest(f"invalid header value for {name!r}: NUL, CR or LF")
    return normalize(request.path, path_normalization).path


def make_context(request: L7Request, path: str, authn: AuthnResult) -> _Ctx:
    headers: dict[str, list[str]] = defaultdict(list)
    for name, value in request.headers:
        headers[name.lower()].append(value)
    principal = (request.source_identity or "").removeprefix(SPIFFE_PREFIX)
    if request.source_identity and not request.source_identity.startswith(SPIFFE_PREFIX):
        principal = request.source_identity
    ns, sa = parse_identity(principal)
    return _Ctx(
        method=request.method,
        path=path,
        host=canonical_host(request.host),
        port=request.port,
        headers={k: ",".join(v) for k, v in headers.items()},
        principal=principal,
        namespace=ns,
        service_account=sa,
        src_ip=_ip(request.source_ip),
        remote_ip=_ip(request.remote_ip or request.source_ip),
        dst_ip=_ip(request.destination_ip),
        sni=request.sni,
        request_principal=authn.principal,
        claims=authn.claims,
    )


def evaluate(
    policies: Iterable[L7Policy],
    request: L7Request,
    *,
    path_normalization: str = "BASE",
    authn: AuthnResult | None = None,
) -> Decision:
    """Envoy RBAC as a waypoint runs it: 400 for a malformed request, 401 for an invalid JWT, then
    DENY (403 `explicitly denied by`), then ALLOW (403 `allow policies exist, but none allowed`)."""
    if authn is None:
        authn = AuthnResult(claims=request.jwt_claims)
    pols = sorted(policies, key=lambda p: p.key)
    warnings = tuple(w for p in pols for w in p.warnings)
    try:
        path = validate_request(request, path_normalization)
    except BadRequest as exc:
        return Decision(False, None, None, f"bad request: {exc.message}", 400, (), warnings)
    if authn.error is not None:
        return Decision(False, None, None, f"jwt authentication failed: {authn.error}", 401, (), warnings)
    ctx = make_context(request, path, authn)
    return _decide(pols, ctx, warnings, tcp=False)


def evaluate_tcp(policies: Iterable[L7Policy], request: L7Request) -> Decision:
    """A waypoint's decision for a non-HTTP (TCP) stream (§4.6): HTTP-only fields follow `tcp_view`;
    a denial closes the connection, so `status` is 0 (no HTTP response reaches the client)."""
    pols = sorted(policies, key=lambda p: p.key)
    warnings = tuple(w for p in pols for w in p.warnings)
    ctx = make_context(replace(request, method="", path="", host="", headers=()), "", AuthnResult())
    return _decide(pols, ctx, warnings, tcp=True)


def _decide(pols: list[L7Policy], ctx: _Ctx, warnings: tuple[str, ...], *, tcp: bool) -> Decision:
    denied_status = 0 if tcp else 403
    hits: list[str] = []
    for pol in pols:
        if pol.action == "AUDIT":
            rule = pol.matching_rule(ctx, tcp=tcp)
            if rule is not None:
                hits.append(f"audit: policy match {pol.key} (rule {rule})")
    deny: tuple[L7Policy, int] | None = None
    for pol in pols:
        if pol.action != "DENY":
            continue
        rule = pol.matching_rule(ctx, tcp=tcp)
        if rule is None:
            continue
        if pol.source.dry_run:
            hits.append(f"dry-run: deny policy match {pol.key} (rule {rule})")
        elif deny is None:
            deny = (pol, rule)
    allows = [p for p in pols if p.action == "ALLOW" and not p.source.dry_run]
    for pol in pols:
        if pol.action == "ALLOW" and pol.source.dry_run:
            rule = pol.matching_rule(ctx, tcp=tcp)
            if rule is not None:
                hits.append(f"dry-run: allow policy match {pol.key} (rule {rule})")
    if deny is not None:
        pol, rule = deny
        return Decision(
            False, pol.key, rule, explicitly_denied(pol.key), denied_status, tuple(hits), warnings
        )
    if not allows:
        return Decision(True, None, None, "no allow policies exist", 200, tuple(hits), warnings)
    for pol in allows:
        rule = pol.matching_rule(ctx, tcp=tcp)
        if rule is not None:
            return Decision(True, pol.key, rule, f"allowed by: {pol.key}", 200, tuple(hits), warnings)
    return Decision(False, None, None, NOT_ALLOWED, denied_status, tuple(hits), warnings)


@dataclass(frozen=True, slots=True)
class L7Index:
    """Policies by what they attach to: (kind, namespace, name). Only `targetRefs` policies count
    (§4.4: waypoints ignore `selector` policies)."""

    root_namespace: str
    by_target: Mapping[tuple[str, str, str], tuple[L7Policy, ...]]

    @classmethod
    def build(cls, policies: Iterable[AuthorizationPolicy], root_namespace: str = "istio-system") -> L7Index:
        out: dict[tuple[str, str, str], list[L7Policy]] = defaultdict(list)
        for policy in policies:
            if not policy.target_refs:
                continue
            compiled = L7Policy.compile(policy)
            for key in target_keys(policy.target_refs, policy.meta.namespace):
                out[key].append(compiled)
        return cls(root_namespace, {k: tuple(v) for k, v in out.items()})

    def for_waypoint(
        self,
        waypoint_namespace: str,
        waypoint_name: str,
        gateway_class: str = "istio-waypoint",
        service: tuple[str, str] | None = None,
    ) -> list[L7Policy]:
        """Policies a waypoint applies to a request: its Gateway's, its GatewayClass's (root
        namespace only) and, when the request is for a service, that Service's."""
        out: dict[str, L7Policy] = {}
        keys = [
            ("Gateway", waypoint_namespace, waypoint_name),
            ("GatewayClass", self.root_namespace, gateway_class),
        ]
        if service is not None:
            keys.append(("Service", service[0], service[1]))
        for key in keys:
            for pol in self.by_target.get(key, ()):
                out[pol.key] = pol
        return list(out.values())


def target_keys(refs: Iterable[Any], namespace: str) -> list[tuple[str, str, str]]:
    """(kind, namespace, name) for each target ref; a ref's namespace defaults to the policy's."""
    return [(ref.kind, ref.namespace or namespace, ref.name) for ref in refs]
