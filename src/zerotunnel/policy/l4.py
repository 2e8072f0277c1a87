"""The L4 policy model a node proxy enforces, and its evaluation, exactly as ztunnel does it.

The shapes mirror ztunnel's xDS `Authorization` (istio-ambient.md §4.1): a policy holds rules, a rule
holds clauses, a clause holds matches. The semantics that differ between implementations are the
point of this module (§4.2, §10.1): an empty Match is skipped (never matches), a clause with no
matches matches everything, a policy with no rules never matches.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

from zerotunnel.policy.decision import NOT_ALLOWED, Decision, explicitly_denied

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SPIFFE_PREFIX = "spiffe://"
T = TypeVar("T")


class Scope(StrEnum):
    """istio-ambient.md §4.4."""

    GLOBAL = "GLOBAL"
    NAMESPACE = "NAMESPACE"
    WORKLOAD_SELECTOR = "WORKLOAD_SELECTOR"


class Action(StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"


@dataclass(frozen=True, slots=True)
class StringMatch:
    """ztunnel's StringMatch: `kind` is exact | prefix | suffix | presence. `""` never matches any
    kind (§4.2), which is what makes plaintext (identity `""`) fail every positive predicate."""

    kind: str
    value: str = ""

    def matches(self, candidate: str) -> bool:
        if not candidate:
            return False
        if self.kind == "exact":
            return candidate == self.value
        if self.kind == "prefix":
            return candidate.startswith(self.value)
        if self.kind == "suffix":
            return candidate.endswith(self.value)
        return self.kind == "presence"

    @classmethod
    def parse(cls, value: str) -> StringMatch:
        """istiod's `stringToMatch` (§4.5): `*` presence, `*x` suffix, `x*` prefix, else exact."""
        if value == "*":
            return cls("presence")
        if value.startswith("*"):
            return cls("suffix", value[1:])
        if value.endswith("*"):
            return cls("prefix", value[:-1])
        return cls("exact", value)

    def __str__(self) -> str:
        return {"exact": self.value, "prefix": f"{self.value}*", "suffix": f"*{self.value}"}.get(
            self.kind, "*"
        )


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    namespace: str
    service_account: str


@dataclass(frozen=True, slots=True)
class Match:
    """One ztunnel Match: AND across field types, OR within a positive list, NOR within a negative."""

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()

    def is_empty(self) -> bool:
        return not any(getattr(self, name) for name in self.__slots__)

    def matches(self, conn: _Conn) -> bool:
        return (
            _pos(self.namespaces, lambda m: m.matches(conn.namespace))
            and _neg(self.not_namespaces, lambda m: m.matches(conn.namespace))
            and _pos(self.service_accounts, conn.sa_matches)
            and _neg(self.not_service_accounts, conn.sa_matches)
            and _pos(self.principals, lambda m: m.matches(conn.principal))
            and _neg(self.not_principals, lambda m: m.matches(conn.principal))
            and _pos(self.source_ips, lambda n: conn.src_ip in n)
            and _neg(self.not_source_ips, lambda n: conn.src_ip in n)
            and _pos(self.destination_ips, lambda n: conn.dst_ip in n)
            and _neg(self.not_destination_ips, lambda n: conn.dst_ip in n)
            and _pos(self.destination_ports, lambda p: p == conn.dst_port)
            and _neg(self.not_destination_ports, lambda p: p == conn.dst_port)
        )


def _pos(values: tuple[T, ...], pred: Callable[[T], bool]) -> bool:
    return not values or any(pred(v) for v in values)


def _neg(values: tuple[T, ...], pred: Callable[[T], bool]) -> bool:
    return not values or not any(pred(v) for v in values)


@dataclass(frozen=True, slots=True)
class Clause:
    matches: tuple[Match, ...] = ()

    def evaluate(self, conn: _Conn) -> bool:
        """§4.2: zero matches ⇒ match-all; empty Matches are skipped, so `[{}]` never matches."""
        if not self.matches:
            return True
        return any(not m.is_empty() and m.matches(conn) for m in self.matches)


@dataclass(frozen=True, slots=True)
class Rule:
    clauses: tuple[Clause, ...] = ()

    def evaluate(self, conn: _Conn) -> bool:
        """§4.2: all clauses must match; zero clauses ⇒ matches everything."""
        return all(c.evaluate(conn) for c in self.clauses)


@dataclass(frozen=True, slots=True)
class L4Policy:
    """ztunnel's `Authorization`. `selector` holds the policy's matchLabels for WORKLOAD_SELECTOR
    scope (istiod resolves selectors before sending; we keep them so the index can resolve them);
    `source` says where it came from (`AuthorizationPolicy` or `PeerAuthentication`)."""

    name: str
    namespace: str
    scope: Scope
    action: Action
    rules: tuple[Rule, ...]
    dry_run: bool = False
    selector: tuple[tuple[str, str], ...] = ()
    source: str = "AuthorizationPolicy"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def matching_rule(self, conn: _Conn) -> int | None:
        """§4.2: the policy matches iff any rule matches; zero rules ⇒ never."""
        for i, rule in enumerate(self.rules):
            if rule.evaluate(conn):
                return i
        return None

    def never_matches(self) -> bool:
        """True when no connection can match: no rules, or every rule holds a clause made only of
        empty Matches (what stripping HTTP attributes leaves behind, §4.5)."""
        return all(
            any(c.matches and all(m.is_empty() for m in c.matches) for c in r.clauses) for r in self.rules
        )


@dataclass(frozen=True, slots=True)
class L4Request:
    """A connection as the destination node proxy sees it (§4.2): `dst_port` is the pod's target
    port, `src_identity` the peer's SPIFFE ID (with or without `spiffe://`), None for plaintext."""

    src_ip: str
    dst_ip: str
    dst_port: int
    src_identity: str | None = None


@dataclass(frozen=True, slots=True)
class _Conn:
    """The request parsed once: principal without `spiffe://`, namespace and SA from the identity."""

    src_ip: IPAddress
    dst_ip: IPAddress
    dst_port: int
    principal: str
    namespace: str
    service_account: str

    def sa_matches(self, sa: ServiceAccountMatch) -> bool:
        return bool(self.principal) and (sa.namespace, sa.service_account) == (
            self.namespace,
            self.service_account,
        )

    @classmethod
    def of(cls, req: L4Request) -> _Conn:
        principal = req.src_identity or ""
        principal = principal.removeprefix(SPIFFE_PREFIX)
        namespace, sa = parse_identity(principal)
        return cls(
            ipaddress.ip_address(req.src_ip),
            ipaddress.ip_address(req.dst_ip),
            req.dst_port,
            principal,
            namespace,
            sa,
        )


def parse_identity(principal: str) -> tuple[str, str]:
    """(namespace, service account) of `td/ns/<ns>/sa/<sa>`; ("", "") for anything else."""
    parts = principal.removeprefix(SPIFFE_PREFIX).split("/")
    if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
        return parts[2], parts[4]
    return "", ""


@dataclass(slots=True)
class _Trace:
    dry_run: list[str] = field(default_factory=list)


def evaluate(policies: Iterable[L4Policy], request: L4Request, *, warnings: tuple[str, ...] = ()) -> Decision:
    """ztunnel's `assert_rbac` (istio-ambient.md §4.3), over the policies applicable to the
    destination (the caller resolves scope, e.g. with `PolicyIndex.for_workload`).

    Order of policies never matters: the first matching DENY by sorted key is reported, so the
    reason is deterministic. Dry-run policies are evaluated and reported in `dry_run_hits`, never
    enforced.
    """
    conn = _Conn.of(request)
    ordered = sorted(policies, key=lambda p: (p.namespace, p.name))
    trace = _Trace()
    allows: list[L4Policy] = []
    dry_allows: list[L4Policy] = []
    deny: tuple[L4Policy, int] | None = None
    for pol in ordered:
        if pol.action is Action.DENY:
            rule = pol.matching_rule(conn)
            if pol.dry_run:
                if rule is not None:
                    trace.dry_run.append(f"dry-run: deny policy match {pol.key} (rule {rule})")
            elif rule is not None and deny is None:
                deny = (pol, rule)
        elif pol.dry_run:
            dry_allows.append(pol)
        else:
            allows.append(pol)
    dry_allow_hit = False
    for pol in dry_allows:
        rule = pol.matching_rule(conn)
        if rule is not None:
            dry_allow_hit = True
            trace.dry_run.append(f"dry-run: allow policy match {pol.key} (rule {rule})")
    if dry_allows and not allows and not dry_allow_hit:
        trace.dry_run.append("dry-run: no allow policies match")
    hits = tuple(trace.dry_run)
    if deny is not None:
        pol, rule = deny
        return Decision(False, pol.key, rule, explicitly_denied(pol.key), 401, hits, warnings)
    if not allows:
        return Decision(True, None, None, "no allow policies exist", 200, hits, warnings)
    for pol in allows:
        rule = pol.matching_rule(conn)
        if rule is not None:
            return Decision(True, pol.key, rule, f"allowed by: {pol.key}", 200, hits, warnings)
    return Decision(False, None, None, NOT_ALLOWED, 401, hits, warnings)


def selector_matches(policy: L4Policy, labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in policy.selector)
