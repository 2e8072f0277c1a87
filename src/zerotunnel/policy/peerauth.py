"""PeerAuthentication in ambient: which plaintext connections a node proxy rejects.

istio-ambient.md §5. In ambient, mTLS between node proxies is unconditional, so the only effect of
PeerAuthentication is on plaintext inbound (no peer identity). istiod expresses STRICT as DENY
policies (§5.2), and so do we: STRICT attaches the static `<rootns>/istio_converted_static_strict`
(`not_principals: [presence]`), and a workload policy with port exceptions becomes
`converted_peer_authentication_<name>`. Because they are ordinary DENY policies they compose with
everything else exactly as in Istio (§10.10: DENY always wins). The branch structure below follows
istiod's `effectivePeerAuthenticationKeys` / `convertPeerAuthentication`, including its quirks,
because where the docs and the code disagree we follow the code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from zerotunnel.config.model import PeerAuthentication
from zerotunnel.policy.l4 import (
    Action,
    Clause,
    L4Policy,
    L4Request,
    Match,
    Rule,
    Scope,
    StringMatch,
    evaluate,
)

STATIC_STRICT_NAME = "istio_converted_static_strict"
_PRESENCE = (StringMatch("presence"),)
_EPOCH = datetime.min.replace(tzinfo=UTC)


def static_strict_policy(root_namespace: str) -> L4Policy:
    """§5.2: deny any connection without a peer identity."""
    return L4Policy(
        name=STATIC_STRICT_NAME,
        namespace=root_namespace,
        scope=Scope.WORKLOAD_SELECTOR,
        action=Action.DENY,
        rules=(Rule((Clause((Match(not_principals=_PRESENCE),)),)),),
        source="PeerAuthentication",
    )


def converted_name(name: str) -> str:
    return f"converted_peer_authentication_{name}"


def _age_key(pa: PeerAuthentication) -> tuple[datetime, str, str, int]:
    ts = pa.meta.creation_timestamp or _EPOCH
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return (ts, pa.meta.name, pa.meta.namespace, pa.meta.order)


def _oldest(pas: Iterable[PeerAuthentication]) -> PeerAuthentication | None:
    return min(pas, key=_age_key, default=None)


def _is_workload_level(pa: PeerAuthentication) -> bool:
    return pa.selector is not None and bool(pa.selector.match_labels)


@dataclass(frozen=True, slots=True)
class PeerAuthnResult:
    """The PeerAuthentication objects that decided (mesh, namespace, workload) and the L4 DENY
    policies istiod would attach to the workload; `mode` is a summary for people (`STRICT`,
    `PERMISSIVE` or `PERMISSIVE (STRICT on ports …)`)."""

    mesh: PeerAuthentication | None
    namespace: PeerAuthentication | None
    workload: PeerAuthentication | None
    policies: tuple[L4Policy, ...]
    mode: str

    def mode_for_port(self, port: int) -> str:
        """Effective mode on `port` after DISABLE ≡ PERMISSIVE (§5.1): does plaintext pass?"""
        decision = evaluate(self.policies, L4Request("127.0.0.1", "127.0.0.1", port, None))
        return "PERMISSIVE" if decision.allowed else "STRICT"


def select(
    peer_authentications: Iterable[PeerAuthentication],
    namespace: str,
    labels: Mapping[str, str],
    root_namespace: str,
) -> tuple[PeerAuthentication | None, PeerAuthentication | None, PeerAuthentication | None]:
    """(mesh, namespace, workload) policies for a workload; oldest wins at each level (§5.1);
    selector policies in the root namespace are ignored."""
    mesh, ns, wl = [], [], []
    for pa in peer_authentications:
        if not _is_workload_level(pa):
            if pa.meta.namespace == root_namespace:
                mesh.append(pa)
            elif pa.meta.namespace == namespace:
                ns.append(pa)
        elif pa.meta.namespace == namespace and pa.meta.namespace != root_namespace:
            assert pa.selector is not None
            if pa.selector.matches(labels):
                wl.append(pa)
    return _oldest(mesh), _oldest(ns), _oldest(wl)


def _strict(pa: PeerAuthentication | None) -> bool:
    return pa is not None and pa.mtls_mode == "STRICT"


def _unset(pa: PeerAuthentication | None) -> bool:
    return pa is None or pa.mtls_mode == "UNSET"


def _convert_workload(
    pa: PeerAuthentication, ns_pa: PeerAuthentication | None, root_pa: PeerAuthentication | None
) -> L4Policy | None:
    """istiod `convertPeerAuthentication` (§5.2)."""
    if not pa.port_level_mtls:
        return None
    mode = pa.mtls_mode
    rules: list[Clause] = []
    groups: list[Rule] = []
    if mode == "STRICT":
        rules.append(Clause((Match(not_principals=_PRESENCE),)))
    found_non_strict = False
    for port in sorted(pa.port_level_mtls):
        port_mode = pa.port_level_mtls[port]
        if port_mode == "STRICT":
            # istiod's condition, operator precedence included: #3 is not gated on the workload
            # mode being UNSET.
            if (
                mode == "STRICT"
                or (mode == "UNSET" and ns_pa is not None and _strict(ns_pa))
                or (_unset(ns_pa) and _strict(root_pa))
            ):
                continue
            groups.append(Rule((Clause((Match(not_principals=_PRESENCE, destination_ports=(port,)),)),)))
        elif port_mode in ("PERMISSIVE", "DISABLE"):
            if mode in ("PERMISSIVE", "DISABLE"):
                continue
            if mode == "UNSET" and (
                (ns_pa is not None and not _strict(ns_pa))
                or (ns_pa is None and root_pa is not None and not _strict(root_pa))
                or (ns_pa is None and root_pa is None)
            ):
                continue
            found_non_strict = True
            rules.append(Clause((Match(not_destination_ports=(port,)),)))
    if mode == "STRICT" and not found_non_strict:
        return None
    if not rules and not groups:
        return None
    merge = (_strict(root_pa) and (ns_pa is None or _unset(ns_pa) or _strict(ns_pa))) or _strict(ns_pa)
    if merge and found_non_strict:
        rules.append(Clause((Match(not_principals=_PRESENCE),)))
    if rules:
        groups.append(Rule(tuple(rules)))
    assert pa.selector is not None
    return L4Policy(
        name=converted_name(pa.meta.name),
        namespace=pa.meta.namespace,
        scope=Scope.WORKLOAD_SELECTOR,
        action=Action.DENY,
        rules=tuple(groups),
        selector=tuple(sorted(pa.selector.match_labels.items())),
        source="PeerAuthentication",
    )


def effective(
    peer_authentications: Iterable[PeerAuthentication],
    namespace: str,
    labels: Mapping[str, str],
    root_namespace: str,
) -> PeerAuthnResult:
    """istiod `effectivePeerAuthenticationKeys` (§5.1-§5.2): the DENY policies for one workload."""
    mesh, ns_pa, wl = select(peer_authentications, namespace, labels, root_namespace)
    strict = _strict(mesh)
    if ns_pa is not None and not _unset(ns_pa):
        strict = _strict(ns_pa)
    port_policy = False
    if wl is not None:
        if _strict(wl):
            strict = True
        if wl.mtls_mode in ("PERMISSIVE", "DISABLE"):
            strict = False
        if wl.port_level_mtls:
            modes = list(wl.port_level_mtls.values())
            if wl.mtls_mode == "STRICT":
                if any(m in ("PERMISSIVE", "DISABLE") for m in modes):
                    port_policy, strict = True, False
            elif wl.mtls_mode in ("PERMISSIVE", "DISABLE"):
                port_policy = "STRICT" in modes
            elif strict:
                if "PERMISSIVE" in modes:
                    port_policy, strict = True, False
            else:
                port_policy = "STRICT" in modes
    policies: list[L4Policy] = []
    if strict:
        policies.append(static_strict_policy(root_namespace))
    if port_policy and wl is not None:
        converted = _convert_workload(wl, ns_pa, mesh)
        if converted is not None:
            policies.append(converted)
    if strict:
        summary = "STRICT"
    elif policies:
        summary = "PORT-LEVEL"
    else:
        summary = "PERMISSIVE"
    return PeerAuthnResult(mesh, ns_pa, wl, tuple(policies), summary)
