"""explain.py: `authz check`'s hop-by-hop answer on a real configuration loaded from YAML, and the
§10.8 case: behind a waypoint the node proxy sees the waypoint's identity."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from zerotunnel.config import Config, load
from zerotunnel.errors import InputError
from zerotunnel.policy.explain import CheckQuery, explain

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)

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
spec: {serviceAccountName: sleep, nodeName: node-a, containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin, namespace: demo, labels: {app: httpbin}}
spec:
  serviceAccountName: httpbin
  nodeName: node-b
  containers: [{name: c, image: x, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy, labels: {app: old}}
spec: {serviceAccountName: old, containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: demo}
spec: {selector: {app: httpbin}, ports: [{name: http, port: 8000, targetPort: http}]}
"""

WAYPOINT = """
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
"""


def cfg(extra: str = "") -> Config:
    return load([("mesh.yaml", BASE + extra)])


def ap(name: str, spec: str, ns: str = "demo") -> str:
    return f"""
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {ns}}}
spec: {spec}
"""


def run(config: Config, **kw: Any) -> dict[str, Any]:
    q = CheckQuery(**{"to": "demo/httpbin", "from_pod": "demo/sleep", **kw})
    return explain(config, q, now=NOW).to_json()


L4_ALLOW_SLEEP = ap(
    "allow-sleep",
    "{selector: {matchLabels: {app: httpbin}}, rules: [{from: [{source: {principals: "
    "[cluster.local/ns/demo/sa/sleep]}}]}]}",
)
L4_ALLOW_WAYPOINT = ap(
    "allow-wp",
    "{selector: {matchLabels: {app: httpbin}}, rules: [{from: [{source: {principals: "
    "[cluster.local/ns/demo/sa/waypoint]}}]}]}",
)
L7_GET = ap(
    "get-only",
    "{targetRefs: [{kind: Service, group: '', name: httpbin}], rules: [{to: [{operation: "
    "{methods: [GET]}}]}]}",
)
SEED = ap(
    "app-a-allow-app-b-only",
    "{selector: {matchLabels: {app: httpbin}}, action: ALLOW, rules: [{from: "
    "[{source: {principals: [cluster.local/ns/demo/sa/sleep]}}], to: [{operation: {methods: [GET], "
    "paths: [/data]}}]}]}",
)

CASES = [
    # case, config extra, query, expected (decision, enforced_by, status, policy, reason)
    ("no policies: allowed at ztunnel", "", {}, ("ALLOW", "ztunnel", 200, None, "no allow policies exist")),
    (
        "L4 allow matches",
        L4_ALLOW_SLEEP,
        {},
        ("ALLOW", "ztunnel", 200, "demo/allow-sleep", "allowed by: demo/allow-sleep"),
    ),
    (
        "L4 allow, other client",
        L4_ALLOW_SLEEP,
        {"from_principal": "cluster.local/ns/x/sa/y", "from_pod": None},
        ("DENY", "ztunnel", 401, None, "allow policies exist, but none allowed"),
    ),
    (
        "plaintext client",
        L4_ALLOW_SLEEP,
        {"from_plaintext": True, "from_pod": None},
        ("DENY", "ztunnel", 401, None, "allow policies exist, but none allowed"),
    ),
    (
        "client outside the mesh is plaintext",
        L4_ALLOW_SLEEP,
        {"from_pod": "legacy/old"},
        ("DENY", "ztunnel", 401, None, "allow policies exist, but none allowed"),
    ),
    (
        "seed example: L7 fields at ztunnel ⇒ allow nothing",
        SEED,
        {},
        ("DENY", "ztunnel", 401, None, "allow policies exist, but none allowed"),
    ),
    (
        "§10.8 waypoint then ztunnel: L4 allows only sleep ⇒ waypoint identity denied",
        WAYPOINT + L4_ALLOW_SLEEP + L7_GET,
        {"via": "waypoint"},
        ("DENY", "ztunnel", 401, None, "allow policies exist, but none allowed"),
    ),
    (
        "waypoint allows GET, ztunnel allows the waypoint",
        WAYPOINT + L4_ALLOW_WAYPOINT + L7_GET,
        {"via": "waypoint"},
        ("ALLOW", "ztunnel", 200, "demo/allow-wp", "allowed by: demo/allow-wp"),
    ),
    (
        "waypoint denies POST",
        WAYPOINT + L4_ALLOW_WAYPOINT + L7_GET,
        {"via": "waypoint", "method": "POST"},
        ("DENY", "waypoint", 403, None, "allow policies exist, but none allowed"),
    ),
    (
        "--via ztunnel skips the waypoint",
        WAYPOINT + L4_ALLOW_SLEEP + L7_GET,
        {"via": "ztunnel", "method": "POST"},
        ("ALLOW", "ztunnel", 200, "demo/allow-sleep", "allowed by: demo/allow-sleep"),
    ),
]


@pytest.mark.parametrize(("case", "extra", "query", "expected"), CASES, ids=[c[0] for c in CASES])
def test_explain(case: str, extra: str, query: dict[str, object], expected: tuple[object, ...]) -> None:
    out = run(cfg(extra), **query)
    assert (out["decision"], out["enforced_by"], out["status"], out["policy"], out["reason"]) == expected


def test_auto_follows_the_namespace_waypoint_label() -> None:
    extra = WAYPOINT + L4_ALLOW_WAYPOINT + L7_GET
    config = load(
        [
            (
                "m.yaml",
                BASE.replace(
                    "istio.io/dataplane-mode: ambient}",
                    "istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}",
                )
                + extra,
            )
        ]
    )
    out = run(config, method="DELETE")
    hops = out["hops"]
    assert isinstance(hops, list)
    assert [h["hop"] for h in hops] == ["waypoint"]
    assert out["status"] == 403
    out = run(config)
    assert [h["hop"] for h in out["hops"]] == ["waypoint", "ztunnel"]
    assert out["hops"][1]["source"] == "waypoint demo/waypoint"


def test_warnings_carry_istiod_status() -> None:
    out = run(cfg(SEED))
    assert any(
        "ztunnel does not support HTTP attributes (found: methods, paths)" in w for w in out["warnings"]
    )


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"to": "demo/nope"}, "unknown pod demo/nope"),
        ({"to": "nope"}, "--to must be NAMESPACE/POD"),
        ({"from_pod": None}, "give exactly one of"),
        ({"from_plaintext": True}, "give exactly one of"),
        ({"from_pod": None, "from_principal": "bad"}, "--from-principal must look like"),
        ({"via": "waypoint"}, "--via waypoint: no waypoint serves demo/httpbin"),
    ],
)
def test_bad_input(query: dict[str, object], message: str) -> None:
    with pytest.raises(InputError) as exc:
        run(cfg(), **query)
    assert message in exc.value.message


def test_service_or_pod_addressing_picks_the_waypoint() -> None:
    """§2.4: a workload waypoint (pod label, waypoint-for workload) serves traffic to the pod IP only;
    traffic to the Service's clusterIP goes straight to the node proxy."""
    text = (
        BASE.replace(
            "metadata: {name: httpbin, namespace: demo, labels: {app: httpbin}}",
            "metadata: {name: httpbin, namespace: demo, labels: {app: httpbin, istio.io/use-waypoint: wl}}",
        ).replace(
            "spec: {selector: {app: httpbin},", "spec: {clusterIP: 10.96.0.10, selector: {app: httpbin},"
        )
        + WAYPOINT.replace(
            "name: waypoint, namespace: demo}",
            "name: wl, namespace: demo, labels: {istio.io/waypoint-for: workload}}",
        )
        + ap(
            "deny-all-at-wl",
            "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wl}], "
            "action: DENY, rules: [{}]}",
        )
    )
    config = load([("m.yaml", text)])
    to_service = run(config, to_ip="10.96.0.10")
    assert (to_service["decision"], [h["hop"] for h in to_service["hops"]]) == ("ALLOW", ["ztunnel"])
    assert any("serves only traffic addressed to the pod" in w for w in to_service["warnings"])
    assert to_service["hops"][0]["destination"] == "demo/httpbin 10.255.1.1:8080"  # never the VIP (§10.7)
    to_pod = run(config, to_ip="10.244.2.7")
    assert (to_pod["decision"], to_pod["enforced_by"], to_pod["policy"]) == (
        "DENY",
        "waypoint",
        "demo/deny-all-at-wl",
    )
