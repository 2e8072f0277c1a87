"""AuthorizationPolicy → the L4 policy a node proxy enforces, as istiod converts it for ztunnel.

istio-ambient.md §4.5 (istiod `convertAuthorizationPolicy` / `handleRule`). The surprising parts are
deliberate and match Istio: an ALLOW rule naming any HTTP attribute is dropped whole (more
restrictive), a DENY rule loses its HTTP attributes and an entry left with nothing becomes an empty
Match that never matches (§10.2), named ports vanish without a word (§10.3), `trustDomains` is ignored.

Dry run (§4.4): we behave as istiod with `AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY=true` — a
dry-run policy is sent with `dry_run` set, evaluated and reported, never enforced — because an
explain tool that silently dropped dry-run policies could not show what they would do.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from zerotunnel.config.model import AuthorizationPolicy, Condition, Operation, Source
from zerotunnel.config.model import Rule as IstioRule
from zerotunnel.policy.l4 import (
    Action,
    Clause,
    IPNetwork,
    L4Policy,
    Match,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
)

L4_WHEN_KEYS = frozenset(
    {"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"}
)

HTTP_RULE_FMT = (
    "ztunnel does not support HTTP attributes (found: {found}). "
    "In ambient mode you must use a waypoint proxy to enforce HTTP rules. {boilerplate}"
)
HTTP_DENY_BOILERPLATE = (
    "DENY policy with HTTP attributes is enforced without the HTTP rules. "
    "This will be more restrictive than requested."
)
HTTP_DENY_NOOP_BOILERPLATE = (
    "After omitting unsupported HTTP attributes, this DENY policy has no enforceable rules at ztunnel "
    "and will have no effect. Deploy a waypoint proxy and use a targetRef to enforce this policy."
)
HTTP_ALLOW_BOILERPLATE = (
    "Within an ALLOW policy, rules matching HTTP attributes are omitted. "
    "This will be more restrictive than requested."
)


@dataclass(frozen=True, slots=True)
class Conversion:
    """`policy` is None when istiod would not send it to ztunnel (targetRefs, AUDIT, CUSTOM);
    `status` is the status message istiod would write on the object (`UnsupportedValue`), if any;
    `http_attributes` is the sorted list the message names."""

    source: AuthorizationPolicy
    policy: L4Policy | None
    status: str | None
    http_attributes: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.source.meta.namespace}/{self.source.meta.name}"


def parse_ports(values: Iterable[str]) -> tuple[int, ...]:
    """istiod's `stringToPort`: anything not a number ≤ 65535 (e.g. a named port) is dropped."""
    out = []
    for v in values:
        if v.isascii() and v.isdigit() and int(v) <= 65535:
            out.append(int(v))
    return tuple(out)


def parse_cidrs(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """istiod's `stringToIP`: an address becomes /32 (/128), a CIDR is kept, anything else dropped.
    A CIDR with host bits set is accepted as written (netip.ParsePrefix keeps them)."""
    out: list[IPNetwork] = []
    for v in values:
        if not v:
            continue
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            continue
    return tuple(out)


def parse_strings(values: Iterable[str]) -> tuple[StringMatch, ...]:
    return tuple(StringMatch.parse(v) for v in values)


def parse_service_accounts(values: Iterable[str], namespace: str) -> tuple[ServiceAccountMatch, ...]:
    """`ns/sa`, or a bare `sa` in the policy's own namespace (§4.5)."""
    out = []
    for v in values:
        ns, sep, sa = v.partition("/")
        out.append(ServiceAccountMatch(ns, sa) if sep else ServiceAccountMatch(namespace, v))
    return tuple(out)


def http_operations(op: Operation) -> list[str]:
    names = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
    fields = (op.hosts, op.not_hosts, op.methods, op.not_methods, op.paths, op.not_paths)
    return [n for n, f in zip(names, fields, strict=True) if f]


def http_sources(src: Source) -> list[str]:
    names = ("remoteIpBlocks", "notRemoteIpBlocks", "requestPrincipals", "notRequestPrincipals")
    fields = (
        src.remote_ip_blocks,
        src.not_remote_ip_blocks,
        src.request_principals,
        src.not_request_principals,
    )
    return [n for n, f in zip(names, fields, strict=True) if f]


def _when_match(cond: Condition) -> Match:
    def pick(key: str, negative: bool) -> tuple[str, ...]:
        if cond.key != key:
            return ()
        return cond.not_values if negative else cond.values

    return Match(
        namespaces=parse_strings(pick("source.namespace", False)),
        principals=parse_strings(pick("source.principal", False)),
        source_ips=parse_cidrs(pick("source.ip", False)),
        destination_ports=parse_ports(pick("destination.port", False)),
        destination_ips=parse_cidrs(pick("destination.ip", False)),
        not_namespaces=parse_strings(pick("source.namespace", True)),
        not_principals=parse_strings(pick("source.principal", True)),
        not_source_ips=parse_cidrs(pick("source.ip", True)),
        not_destination_ports=parse_ports(pick("destination.port", True)),
        not_destination_ips=parse_cidrs(pick("destination.ip", True)),
    )


def convert_rule(action: Action, rule: IstioRule, namespace: str) -> tuple[Rule | None, set[str]]:
    """istiod's `handleRule`: clauses in the order to, from, each `when`. None = rule dropped."""
    found: set[str] = set()
    clauses: list[Clause] = []
    if rule.to:
        matches = []
        for op in rule.to:
            found.update(http_operations(op))
            matches.append(
                Match(
                    destination_ports=parse_ports(op.ports), not_destination_ports=parse_ports(op.not_ports)
                )
            )
        clauses.append(Clause(tuple(matches)))
    if rule.from_:
        matches = []
        for src in rule.from_:
            found.update(http_sources(src))
            matches.append(
                Match(
                    source_ips=parse_cidrs(src.ip_blocks),
                    not_source_ips=parse_cidrs(src.not_ip_blocks),
                    namespaces=parse_strings(src.namespaces),
                    not_namespaces=parse_strings(src.not_namespaces),
                    service_accounts=parse_service_accounts(src.service_accounts, namespace),
                    not_service_accounts=parse_service_accounts(src.not_service_accounts, namespace),
                    principals=parse_strings(src.principals),
                    not_principals=parse_strings(src.not_principals),
                )
            )
        clauses.append(Clause(tuple(matches)))
    for cond in rule.when:
        if cond.key not in L4_WHEN_KEYS:
            found.add(cond.key)
        clauses.append(Clause((_when_match(cond),)))
    if action is Action.ALLOW and found:
        return None, found
    return Rule(tuple(clauses)), found


def scope_of(policy: AuthorizationPolicy, root_namespace: str) -> Scope:
    if policy.selector is not None:
        return Scope.WORKLOAD_SELECTOR
    return Scope.GLOBAL if policy.meta.namespace == root_namespace else Scope.NAMESPACE


def convert(policy: AuthorizationPolicy, root_namespace: str = "istio-system") -> Conversion:
    """istiod's `convertAuthorizationPolicy` (§4.4-§4.5), with the status text it writes."""
    if policy.target_refs:
        return Conversion(policy, None, None)
    if policy.action not in ("ALLOW", "DENY"):
        return Conversion(policy, None, f"ztunnel does not support the {policy.action} action")
    action = Action(policy.action)
    rules: list[Rule] = []
    found: set[str] = set()
    for rule in policy.rules:
        converted, names = convert_rule(action, rule, policy.meta.namespace)
        found |= names
        if converted is not None:
            rules.append(converted)
    selector = tuple(sorted(policy.selector.match_labels.items())) if policy.selector is not None else ()
    l4 = L4Policy(
        name=policy.meta.name,
        namespace=policy.meta.namespace,
        scope=scope_of(policy, root_namespace),
        action=action,
        rules=tuple(rules),
        dry_run=policy.dry_run,
        selector=selector,
    )
    if not found:
        return Conversion(policy, l4, None)
    if action is Action.ALLOW:
        boilerplate = HTTP_ALLOW_BOILERPLATE
    elif l4.never_matches():
        boilerplate = HTTP_DENY_NOOP_BOILERPLATE
    else:
        boilerplate = HTTP_DENY_BOILERPLATE
    found_sorted = tuple(sorted(found))
    status = HTTP_RULE_FMT.format(found=", ".join(found_sorted), boilerplate=boilerplate)
    return Conversion(policy, l4, status, found_sorted)
