"""`zerotunnel analyze`: the review a careful Istio user would give a configuration.

Each finding names the resource, says what will actually happen (in Istio's terms, citing the
conversion istiod does, istio-ambient.md §4.5/§10) and how to fix it. The checks are the foot-guns
users hit in practice (users-spiffe-conventions.md §1.2): `spiffe://` in principals, HTTP fields in a
policy a node proxy enforces, named ports, selectors that select nothing, namespaces outside the
mesh, AUDIT/CUSTOM, targetRefs to nothing, JWT issuers nobody validates, STRICT mTLS with plaintext
clients, and L4 policies that forget the waypoint's identity.

Codes (stable, for scripts): ZT001 `spiffe://` in principals · ZT002 HTTP attributes at a node proxy ·
ZT003 named/invalid ports · ZT004 selector matches no pod · ZT005 namespace outside the mesh ·
ZT006 AUDIT/CUSTOM · ZT007 targetRefs to nothing / unserved Service / GatewayClass outside the root
namespace · ZT008 requestPrincipals no RequestAuthentication validates · ZT009 STRICT with plaintext
clients · ZT010 waypoint identity not allowed at the workload (§10.8) · ZT011 invalid dry-run
annotation · ZT012 selector RequestAuthentication in an ambient namespace · ZT013 trustDomains at a
node proxy.
"""

from __future__ import annotations

from dataclasses import dataclass

from zerotunnel.config.model import AuthorizationPolicy, Config
from zerotunnel.mesh.waypoint import find_gateway, for_pod, services_of, waypoint_for
from zerotunnel.policy.convert import convert
from zerotunnel.policy.engine import Engine
from zerotunnel.policy.l4 import Action, L4Request, evaluate

SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True, slots=True)
class Finding:
    code: str
    severity: str
    resource: str
    message: str
    fix: str


def _res(kind: str, ns: str, name: str) -> str:
    return f"{kind} {ns}/{name}"


def _all_principals(ap: AuthorizationPolicy) -> list[str]:
    out: list[str] = []
    for rule in ap.rules:
        for src in rule.from_:
            out.extend(src.principals + src.not_principals)
        for cond in rule.when:
            if cond.key == "source.principal":
                out.extend(cond.values + cond.not_values)
    return out


def _ports(ap: AuthorizationPolicy) -> list[str]:
    out: list[str] = []
    for rule in ap.rules:
        for op in rule.to:
            out.extend(op.ports + op.not_ports)
        for cond in rule.when:
            if cond.key == "destination.port":
                out.extend(cond.values + cond.not_values)
    return out


def _check_authorization(config: Config, ap: AuthorizationPolicy, out: list[Finding]) -> None:
    meta = ap.meta
    res = _res("AuthorizationPolicy", meta.namespace, meta.name)
    root = config.mesh.root_namespace
    bad = sorted({p for p in _all_principals(ap) if p.startswith("spiffe://")})
    if bad:
        out.append(
            Finding(
                "ZT001",
                "error",
                res,
                f"principals {', '.join(bad)} start with spiffe://; principals are compared without it "
                "(ztunnel strips spiffe:// from the peer identity), so these entries never match",
                f"write them as {', '.join(b.removeprefix('spiffe://') for b in bad)}",
            )
        )
    if not ap.target_refs:
        conv = convert(ap, root)
        if conv.policy is not None and conv.http_attributes:
            if conv.policy.action is Action.ALLOW:
                effect = (
                    "every rule is dropped, so this ALLOW policy allows nothing and denies every connection "
                    "no other ALLOW policy allows"
                    if not conv.policy.rules
                    else "the rules holding them are dropped, so it allows less than written"
                )
                severity = "error"
            elif conv.policy.never_matches():
                effect = "it becomes a no-op at the node proxy: nothing is denied"
                severity = "error"
            else:
                effect = "it is enforced without the HTTP fields, so it denies more than written"
                severity = "warning"
            out.append(
                Finding(
                    "ZT002",
                    severity,
                    res,
                    f"HTTP attributes ({', '.join(conv.http_attributes)}) in a policy enforced by the "
                    "node proxy "
                    f"(selector/namespace policy, no targetRefs): {effect}. istiod status: {conv.status}",
                    "deploy a waypoint (Gateway with gatewayClassName istio-waypoint), label the "
                    "namespace or "
                    "service istio.io/use-waypoint=<waypoint>, and attach this policy with targetRefs "
                    "(kind Gateway or Service) instead of selector; keep an L4 policy that allows the "
                    "waypoint's identity at the workload",
                )
            )
        if ap.action in ("AUDIT", "CUSTOM"):
            out.append(
                Finding(
                    "ZT006",
                    "warning",
                    res,
                    f"{conv.status}: the node proxy never sees this policy"
                    + (
                        "; zerotunnel's waypoint does not call external authorizers either"
                        if ap.action == "CUSTOM"
                        else ""
                    ),
                    "use ALLOW or DENY"
                    if ap.action == "CUSTOM"
                    else "AUDIT only logs; remove it or use DENY",
                )
            )
    elif ap.action == "CUSTOM":
        out.append(
            Finding(
                "ZT006",
                "warning",
                res,
                "CUSTOM (external authorization) is not supported by zerotunnel's waypoint; the "
                "policy is ignored",
                "express the rule as ALLOW/DENY",
            )
        )
    if not ap.target_refs and any(
        src.trust_domains or src.not_trust_domains for rule in ap.rules for src in rule.from_
    ):
        out.append(
            Finding(
                "ZT013",
                "warning",
                res,
                "trustDomains/notTrustDomains are ignored by the node proxy (istiod does not convert "
                "them for "
                "ztunnel, and says nothing): a source entry with only trust domains never matches, others "
                "match regardless of trust domain",
                "match the trust domain through principals (e.g. 'cluster.local/*') or enforce the "
                "policy at a "
                "waypoint with targetRefs",
            )
        )
    named = sorted({p for p in _ports(ap) if not (p.isascii() and p.isdigit() and int(p) <= 65535)})
    if named:
        out.append(
            Finding(
                "ZT003",
                "warning",
                res,
                f"ports {', '.join(named)} are not port numbers; istiod drops them silently, and an "
                "entry left "
                "with no port never matches (an ALLOW never allows, a DENY never denies)",
                "use the numeric target port of the pod (not the Service port, not a port name)",
            )
        )
    if ap.selector is not None and ap.selector.match_labels:
        ns_pods = config.pods if meta.namespace == root else config.pods_in(meta.namespace)
        if not any(ap.selector.matches(p.meta.labels) for p in ns_pods):
            labels = ", ".join(f"{k}={v}" for k, v in ap.selector.match_labels.items())
            out.append(
                Finding(
                    "ZT004",
                    "warning",
                    res,
                    f"selector {labels} matches no pod in "
                    f"{'the mesh' if meta.namespace == root else 'namespace ' + meta.namespace}",
                    "check the labels against the pods' metadata.labels (selectors do not cross namespaces)",
                )
            )
    if (
        meta.namespace != root
        and not config.is_ambient(meta.namespace)
        and not any(config.pod_is_ambient(p) for p in config.pods_in(meta.namespace))
    ):
        out.append(
            Finding(
                "ZT005",
                "warning",
                res,
                f"namespace {meta.namespace} is not in the ambient mesh, so no node proxy enforces "
                "this policy",
                f"label the namespace istio.io/dataplane-mode=ambient (kubectl label ns {meta.namespace} "
                "istio.io/dataplane-mode=ambient)",
            )
        )
    for ref in ap.target_refs:
        ns = ref.namespace or meta.namespace
        if ref.kind == "Gateway":
            if find_gateway(config, ns, ref.name) is None:
                out.append(
                    Finding(
                        "ZT007",
                        "error",
                        res,
                        f"targetRefs names Gateway {ns}/{ref.name}, which is not a waypoint in this "
                        "configuration "
                        "(no Gateway with gatewayClassName istio-waypoint): the policy is enforced nowhere",
                        "create the waypoint Gateway or fix the name",
                    )
                )
        elif ref.kind == "Service":
            if config.service(ns, ref.name) is None:
                out.append(
                    Finding(
                        "ZT007",
                        "error",
                        res,
                        f"targetRefs names Service {ns}/{ref.name}, which does not exist",
                        "fix the service name",
                    )
                )
            else:
                svc = config.service(ns, ref.name)
                assert svc is not None
                pods = [p for p in config.pods_in(ns) if svc in services_of(config, p)]
                if pods and all(
                    (b := waypoint_for(config, p, svc)) is None or b.gateway is None for p in pods
                ):
                    out.append(
                        Finding(
                            "ZT007",
                            "error",
                            res,
                            f"targetRefs names Service {ns}/{ref.name}, but no waypoint serves it: "
                            "the policy is enforced nowhere",
                            f"label the service or namespace istio.io/use-waypoint=<waypoint> "
                            f"(kubectl label svc -n {ns} {ref.name} istio.io/use-waypoint=waypoint)",
                        )
                    )
        elif ref.kind == "GatewayClass" and meta.namespace != root:
            out.append(
                Finding(
                    "ZT007",
                    "error",
                    res,
                    f"targetRefs to GatewayClass {ref.name} is honoured only in the root namespace ({root})",
                    f"move the policy to {root}",
                )
            )
    if ap.dry_run_annotation_invalid:
        out.append(
            Finding(
                "ZT011",
                "warning",
                res,
                "the istio.io/dry-run annotation is not a boolean; it is treated as false and the "
                "policy is enforced",
                'set istio.io/dry-run: "true" or remove the annotation',
            )
        )


def _check_jwt(config: Config, out: list[Finding]) -> None:
    issuers = {rule.issuer for ra in config.request_authentications for rule in ra.jwt_rules}
    for ap in config.authorization_policies:
        res = _res("AuthorizationPolicy", ap.meta.namespace, ap.meta.name)
        for rule in ap.rules:
            for src in rule.from_:
                for rp in src.request_principals + src.not_request_principals:
                    if rp == "*" or rp.startswith("*"):
                        if not issuers:
                            out.append(
                                Finding(
                                    "ZT008",
                                    "error",
                                    res,
                                    f"requestPrincipals {rp!r} but no RequestAuthentication validates "
                                    "any JWT, so "
                                    "no request ever has a request principal",
                                    "add a RequestAuthentication with the issuer's jwtRules, attached to the "
                                    "same waypoint",
                                )
                            )
                        continue
                    iss = rp.rsplit("/", 1)[0] if "/" in rp else rp
                    if iss.endswith("*"):
                        continue
                    if iss not in issuers:
                        out.append(
                            Finding(
                                "ZT008",
                                "error",
                                res,
                                f"requestPrincipals {rp!r} names issuer {iss!r}, which no "
                                "RequestAuthentication "
                                f"validates (known: {', '.join(sorted(issuers)) or 'none'})",
                                "add a jwtRules entry for that issuer, or fix the issuer "
                                "(requestPrincipals is "
                                "<iss>/<sub>)",
                            )
                        )


def _check_request_authentication(config: Config, out: list[Finding]) -> None:
    """users-spiffe-conventions.md §1.2 (istio#45502): in ambient a waypoint applies only `targetRefs`
    RequestAuthentications; a selector-only one in an ambient namespace validates nothing."""
    for ra in config.request_authentications:
        ns = ra.meta.namespace
        if ra.target_refs or ns == config.mesh.root_namespace or not config.is_ambient(ns):
            continue
        out.append(
            Finding(
                "ZT012",
                "warning",
                _res("RequestAuthentication", ns, ra.meta.name),
                "this RequestAuthentication uses a selector (or none) in an ambient namespace: "
                "waypoints apply "
                "only targetRefs policies and node proxies do not parse HTTP, so no JWT is validated",
                "attach it with targetRefs to the waypoint Gateway or the Service, like the "
                "AuthorizationPolicy "
                "that uses requestPrincipals",
            )
        )


def _check_strict_plaintext(config: Config, engine: Engine, out: list[Finding]) -> None:
    plaintext = [p for p in config.pods if not config.pod_is_ambient(p)]
    if not plaintext:
        return
    names = ", ".join(sorted(f"{p.meta.namespace}/{p.meta.name}" for p in plaintext)[:5])
    for pod in config.pods:
        if not config.pod_is_ambient(pod):
            continue
        pa = engine.peer_authn(pod.meta.namespace, pod.meta.labels)
        if not pa.policies:
            continue
        ports = [cp.container_port for c in pod.containers for cp in c.ports] or [0]
        blocked = [
            p
            for p in ports
            if not evaluate(pa.policies, L4Request("127.0.0.1", "127.0.0.1", p, None)).allowed
        ]
        if not blocked:
            continue
        deciding = pa.workload or pa.namespace or pa.mesh
        assert deciding is not None
        out.append(
            Finding(
                "ZT009",
                "warning",
                _res("PeerAuthentication", deciding.meta.namespace, deciding.meta.name),
                f"STRICT mTLS for pod {pod.meta.namespace}/{pod.meta.name}"
                + (f" on ports {', '.join(map(str, blocked))}" if blocked != [0] else "")
                + f", but plaintext clients exist outside the mesh ({names}): "
                "their connections will be reset",
                "enrol the clients in the mesh (istio.io/dataplane-mode=ambient) or set "
                "portLevelMtls PERMISSIVE "
                "on the ports they use",
            )
        )


def _check_waypoint_identity(config: Config, engine: Engine, out: list[Finding]) -> None:
    """§10.8: behind a waypoint the node proxy sees the waypoint's identity as the source."""
    td = config.mesh.trust_domain
    for pod in config.pods:
        if not config.pod_is_ambient(pod):
            continue
        bindings = [waypoint_for(config, pod, s) for s in services_of(config, pod)] + [for_pod(config, pod)]
        gateways = {(b.gateway.meta.namespace, b.gateway.meta.name) for b in bindings if b and b.gateway}
        policies, _ = engine.l4_policies(pod.meta.namespace, pod.meta.labels)
        if not any(p.action is Action.ALLOW and not p.dry_run for p in policies):
            continue
        for ns, name in sorted(gateways):
            identity = f"spiffe://{td}/ns/{ns}/sa/{name}"
            ip = pod.pod_ip or "10.0.0.1"
            ports = [cp.container_port for c in pod.containers for cp in c.ports] or [80]
            if not any(evaluate(policies, L4Request("240.240.0.1", ip, p, identity)).allowed for p in ports):
                out.append(
                    Finding(
                        "ZT010",
                        "warning",
                        _res("Pod", pod.meta.namespace, pod.meta.name),
                        f"traffic reaches this pod through waypoint {ns}/{name}, so its node proxy sees the "
                        f"waypoint's identity ({identity.removeprefix('spiffe://')}) as the source, and no "
                        "ALLOW policy on the pod allows it: every request through the waypoint is denied",
                        f'add principals: ["{identity.removeprefix("spiffe://")}"] to an ALLOW policy '
                        "of the pod, "
                        "and move client-specific rules to a targetRefs policy on the waypoint",
                    )
                )


def analyze(config: Config) -> list[Finding]:
    """All findings, errors first, then by resource."""
    engine = Engine.from_config(config)
    out: list[Finding] = []
    for ap in config.authorization_policies:
        _check_authorization(config, ap, out)
    _check_jwt(config, out)
    _check_request_authentication(config, out)
    _check_strict_plaintext(config, engine, out)
    _check_waypoint_identity(config, engine, out)
    return sorted(out, key=lambda f: (SEVERITIES.index(f.severity), f.resource, f.code, f.message))
