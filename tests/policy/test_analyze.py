"""analyze.py: every finding issue 3 lists, one row each, on configurations loaded from YAML; and a
clean configuration has none."""

from __future__ import annotations

import pytest

from zerotunnel.config import load
from zerotunnel.policy.analyze import Finding, analyze

BASE = """
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: demo, labels: {app: sleep}}
spec: {serviceAccountName: sleep, containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin, namespace: demo, labels: {app: httpbin}}
spec:
  serviceAccountName: httpbin
  containers: [{name: c, image: x, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: demo}
spec: {selector: {app: httpbin}, ports: [{name: http, port: 8000, targetPort: 8080}]}
"""

PLAINTEXT_POD = """
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy}
spec: {serviceAccountName: old, containers: [{name: c, image: x}]}
"""
WAYPOINT = """
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
"""


def ap(name: str, spec: str, ns: str = "demo", annotations: str = "") -> str:
    return f"""
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {ns}{annotations}}}
spec: {spec}
"""


SEED = ap(
    "app-a-allow-app-b-only",
    "{selector: {matchLabels: {app: httpbin}}, action: ALLOW, rules: [{from: "
    "[{source: {principals: [cluster.local/ns/demo/sa/sleep]}}], to: [{operation: {methods: [GET], "
    "paths: [/data]}}]}]}",
)
STRICT = """
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"""

# case, extra YAML, expected (code, severity, resource), a phrase the message must contain
CASES = [
    (
        "seed example: HTTP attributes in an ALLOW enforced by ztunnel → allow nothing",
        SEED,
        ("ZT002", "error", "AuthorizationPolicy demo/app-a-allow-app-b-only"),
        "allows nothing",
    ),
    (
        "DENY with only HTTP attributes → no-op",
        ap("deny-post", "{action: DENY, rules: [{to: [{operation: {methods: [POST]}}]}]}"),
        ("ZT002", "error", "AuthorizationPolicy demo/deny-post"),
        "no-op",
    ),
    (
        "DENY with ports + HTTP → denies more",
        ap(
            "deny-post-8080",
            "{action: DENY, rules: [{to: [{operation: {ports: ['8080'], methods: [POST]}}]}]}",
        ),
        ("ZT002", "warning", "AuthorizationPolicy demo/deny-post-8080"),
        "denies more than written",
    ),
    (
        "spiffe:// in principals",
        ap(
            "spiffe",
            "{rules: [{from: [{source: {principals: ['spiffe://cluster.local/ns/demo/sa/sleep']}}]}]}",
        ),
        ("ZT001", "error", "AuthorizationPolicy demo/spiffe"),
        "these entries never match",
    ),
    (
        "named port",
        ap("named", "{rules: [{to: [{operation: {ports: [http]}}]}]}"),
        ("ZT003", "warning", "AuthorizationPolicy demo/named"),
        "ports http are not port numbers",
    ),
    (
        "selector matching no pod",
        ap("nomatch", "{selector: {matchLabels: {app: nothing}}, rules: [{}]}"),
        ("ZT004", "warning", "AuthorizationPolicy demo/nomatch"),
        "matches no pod",
    ),
    (
        "namespace not in the mesh",
        ap("legacy-policy", "{rules: [{}]}", ns="legacy"),
        ("ZT005", "warning", "AuthorizationPolicy legacy/legacy-policy"),
        "not in the ambient mesh",
    ),
    (
        "AUDIT",
        ap("audit", "{action: AUDIT, rules: [{}]}"),
        ("ZT006", "warning", "AuthorizationPolicy demo/audit"),
        "ztunnel does not support the AUDIT action",
    ),
    (
        "CUSTOM",
        ap("custom", "{action: CUSTOM, provider: {name: ext}, rules: [{}]}"),
        ("ZT006", "warning", "AuthorizationPolicy demo/custom"),
        "ztunnel does not support the CUSTOM action",
    ),
    (
        "targetRefs to a missing waypoint",
        ap(
            "l7",
            "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}], rules: [{}]}",
        ),
        ("ZT007", "error", "AuthorizationPolicy demo/l7"),
        "enforced nowhere",
    ),
    (
        "targetRefs to a Service no waypoint serves",
        WAYPOINT + ap("svc", "{targetRefs: [{kind: Service, group: '', name: httpbin}], rules: [{}]}"),
        ("ZT007", "error", "AuthorizationPolicy demo/svc"),
        "no waypoint serves it",
    ),
    (
        "targetRefs to a missing Service",
        ap("svc2", "{targetRefs: [{kind: Service, group: '', name: nope}], rules: [{}]}"),
        ("ZT007", "error", "AuthorizationPolicy demo/svc2"),
        "does not exist",
    ),
    (
        "unknown JWT issuer",
        WAYPOINT
        + ap(
            "jwt",
            "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}], "
            "rules: [{from: [{source: {requestPrincipals: ['https://unknown/alice']}}]}]}",
        ),
        ("ZT008", "error", "AuthorizationPolicy demo/jwt"),
        "names issuer 'https://unknown'",
    ),
    (
        "STRICT with plaintext clients",
        STRICT + PLAINTEXT_POD,
        ("ZT009", "warning", "PeerAuthentication istio-system/default"),
        "legacy/old",
    ),
    (
        "RequestAuthentication with a selector in an ambient namespace",
        "\n---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: "
        "{name: jwt, namespace: demo}\n"
        "spec: {selector: {matchLabels: {app: httpbin}}, jwtRules: [{issuer: https://issuer}]}\n",
        ("ZT012", "warning", "RequestAuthentication demo/jwt"),
        "no JWT is validated",
    ),
    (
        "trustDomains at the node proxy are ignored",
        ap("td", "{rules: [{from: [{source: {trustDomains: [cluster.local]}}]}]}"),
        ("ZT013", "warning", "AuthorizationPolicy demo/td"),
        "ignored by the node proxy",
    ),
    (
        "invalid dry-run annotation",
        ap("dry", "{rules: [{}]}", annotations=", annotations: {istio.io/dry-run: maybe}"),
        ("ZT011", "warning", "AuthorizationPolicy demo/dry"),
        "not a boolean",
    ),
    (
        "§10.8 L4 ALLOW forgets the waypoint identity",
        WAYPOINT
        + ap(
            "l4",
            "{selector: {matchLabels: {app: httpbin}}, rules: [{from: [{source: {principals: "
            "[cluster.local/ns/demo/sa/sleep]}}]}]}",
        )
        + "\n---\napiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: demo, labels: "
        "{istio.io/use-waypoint: waypoint}}\nspec: {selector: {app: httpbin}, ports: "
        "[{port: 80, targetPort: 8080}]}\n",
        ("ZT010", "warning", "Pod demo/httpbin"),
        "waypoint's identity",
    ),
]


def findings(extra: str) -> list[Finding]:
    return analyze(load([("c.yaml", BASE + extra)]))


@pytest.mark.parametrize(("case", "extra", "expected", "phrase"), CASES, ids=[c[0] for c in CASES])
def test_finding(case: str, extra: str, expected: tuple[str, str, str], phrase: str) -> None:
    found = [f for f in findings(extra) if (f.code, f.severity, f.resource) == expected]
    assert found, [(f.code, f.severity, f.resource) for f in findings(extra)]
    assert phrase in found[0].message
    assert found[0].fix


def test_clean_configuration_has_no_findings() -> None:
    clean = ap(
        "allow-sleep",
        "{selector: {matchLabels: {app: httpbin}}, rules: [{from: [{source: {principals: "
        "[cluster.local/ns/demo/sa/sleep]}}], to: [{operation: {ports: ['8080']}}]}]}",
    )
    assert findings(clean + STRICT) == []


def test_errors_sort_first() -> None:
    fs = findings(SEED + ap("named", "{rules: [{to: [{operation: {ports: [http]}}]}]}"))
    assert [f.severity for f in fs] == sorted(
        (f.severity for f in fs), key=("error", "warning", "info").index
    )
