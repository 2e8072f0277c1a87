"""One configuration, compiled once, asked many questions: the authorization engine's facade.

Built from a `Config`, it holds what istiod would push (converted L4 policies with their status
texts, PeerAuthentication-derived DENY policies) and what a waypoint would load (targetRefs policies
and RequestAuthentications), all indexed (index.py, l7.py). The node proxy, the waypoint and
`authz check` call the same two methods, so an explanation is the decision, not a re-enactment of it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from zerotunnel.config.model import AuthorizationPolicy, Config, PeerAuthentication, RequestAuthentication
from zerotunnel.policy import l4, l7
from zerotunnel.policy.authn import AuthnResult, authenticate
from zerotunnel.policy.convert import Conversion, convert
from zerotunnel.policy.decision import Decision
from zerotunnel.policy.index import PolicyIndex
from zerotunnel.policy.l7 import L7Index, L7Request, target_keys
from zerotunnel.policy.peerauth import PeerAuthnResult, effective


@dataclass(frozen=True, slots=True)
class Engine:
    root_namespace: str
    path_normalization: str
    conversions: Mapping[str, Conversion]
    l4_index: PolicyIndex
    l7_index: L7Index
    peer_authentications: Mapping[str, tuple[PeerAuthentication, ...]]
    request_authentications: Mapping[tuple[str, str, str], tuple[RequestAuthentication, ...]]
    unsent: Mapping[str, tuple[Conversion, ...]]

    @classmethod
    def build(
        cls,
        authorization_policies: Iterable[AuthorizationPolicy],
        peer_authentications: Iterable[PeerAuthentication] = (),
        request_authentications: Iterable[RequestAuthentication] = (),
        *,
        root_namespace: str = "istio-system",
        path_normalization: str = "BASE",
    ) -> Engine:
        aps = list(authorization_policies)
        conversions = {c.key: c for c in (convert(p, root_namespace) for p in aps)}
        l4_policies = [c.policy for c in conversions.values() if c.policy is not None]
        pas: dict[str, list[PeerAuthentication]] = defaultdict(list)
        for pa in peer_authentications:
            pas[pa.meta.namespace].append(pa)
        ras: dict[tuple[str, str, str], list[RequestAuthentication]] = defaultdict(list)
        for ra in request_authentications:
            for key in target_keys(ra.target_refs, ra.meta.namespace):
                ras[key].append(ra)
        unsent: dict[str, list[Conversion]] = defaultdict(list)
        for c in conversions.values():
            if c.policy is None and not c.source.target_refs:
                unsent[c.source.meta.namespace].append(c)
        return cls(
            root_namespace,
            path_normalization,
            conversions,
            PolicyIndex.build(l4_policies, root_namespace),
            L7Index.build(aps, root_namespace),
            {k: tuple(v) for k, v in pas.items()},
            {k: tuple(v) for k, v in ras.items()},
            {k: tuple(v) for k, v in unsent.items()},
        )

    @classmethod
    def from_config(cls, config: Config) -> Engine:
        return cls.build(
            config.authorization_policies,
            config.peer_authentications,
            config.request_authentications,
            root_namespace=config.mesh.root_namespace,
            path_normalization=config.mesh.path_normalization,
        )

    # ------------------------------------------------------------------------------------ L4

    def peer_authn(self, namespace: str, labels: Mapping[str, str]) -> PeerAuthnResult:
        pas = self.peer_authentications.get(namespace, ()) + (
            self.peer_authentications.get(self.root_namespace, ()) if namespace != self.root_namespace else ()
        )
        return effective(pas, namespace, labels, self.root_namespace)

    def l4_policies(self, namespace: str, labels: Mapping[str, str]) -> tuple[list[l4.L4Policy], list[str]]:
        """The policies a node proxy applies to a workload (authorization + PeerAuthentication) and
        the status warnings of the authorization policies among them (istiod's texts, §4.5)."""
        policies = self.l4_index.for_workload(namespace, labels)
        warnings = []
        for pol in policies:
            conv = self.conversions.get(pol.key)
            if conv is not None and conv.status:
                warnings.append(f"{pol.key}: {conv.status}")
        namespaces = {namespace, self.root_namespace}
        for conv in (c for ns in namespaces for c in self.unsent.get(ns, ())):
            src = conv.source
            if src.selector is None or src.selector.matches(labels):
                warnings.append(f"{conv.key}: {conv.status} (not sent to ztunnel)")
        policies = policies + list(self.peer_authn(namespace, labels).policies)
        return policies, warnings

    def check_l4(self, namespace: str, labels: Mapping[str, str], request: l4.L4Request) -> Decision:
        """What the destination node proxy decides for `request` to a workload (§4.3)."""
        policies, warnings = self.l4_policies(namespace, labels)
        return l4.evaluate(policies, request, warnings=tuple(sorted(warnings)))

    # ------------------------------------------------------------------------------------ L7

    def waypoint_policies(
        self, waypoint_namespace: str, waypoint_name: str, service: tuple[str, str] | None = None
    ) -> list[l7.L7Policy]:
        return self.l7_index.for_waypoint(waypoint_namespace, waypoint_name, service=service)

    def request_authns(
        self, waypoint_namespace: str, waypoint_name: str, service: tuple[str, str] | None = None
    ) -> list[RequestAuthentication]:
        keys = [
            ("Gateway", waypoint_namespace, waypoint_name),
            ("GatewayClass", self.root_namespace, "istio-waypoint"),
        ]
        if service is not None:
            keys.append(("Service", service[0], service[1]))
        seen: dict[str, RequestAuthentication] = {}
        for key in keys:
            for ra in self.request_authentications.get(key, ()):
                seen[f"{ra.meta.namespace}/{ra.meta.name}"] = ra
        return list(seen.values())

    def check_l7(
        self,
        waypoint_namespace: str,
        waypoint_name: str,
        request: L7Request,
        *,
        now: datetime,
        service: tuple[str, str] | None = None,
        jwks_by_uri: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Decision:
        """What the waypoint decides for an HTTP request (§6): JWT first (401), then RBAC (403)."""
        ras = self.request_authns(waypoint_namespace, waypoint_name, service)
        headers: dict[str, str] = {}
        for name, value in request.headers:
            headers[name] = value
        if params is None:
            params = _query_params(request.path)
        authn: AuthnResult = authenticate(ras, headers, params, now, jwks_by_uri)
        policies = self.waypoint_policies(waypoint_namespace, waypoint_name, service)
        return l7.evaluate(policies, request, path_normalization=self.path_normalization, authn=authn)

    def check_l7_tcp(
        self,
        waypoint_namespace: str,
        waypoint_name: str,
        request: L7Request,
        *,
        service: tuple[str, str] | None = None,
    ) -> Decision:
        """What the waypoint decides for a non-HTTP stream (§4.6): Envoy's TCP-chain semantics."""
        policies = self.waypoint_policies(waypoint_namespace, waypoint_name, service)
        return l7.evaluate_tcp(policies, request)


def _query_params(target: str) -> dict[str, str]:
    query = target.split("#", 1)[0].partition("?")[2]
    out: dict[str, str] = {}
    for part in query.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        out.setdefault(k, v)
    return out
