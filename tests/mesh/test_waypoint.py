"""mesh/waypoint.py: which waypoint serves a destination (users-spiffe-conventions.md §5.2)."""

from __future__ import annotations

import pytest

from zerotunnel.config import Config, load
from zerotunnel.mesh.waypoint import for_pod, for_service, parse_reference, waypoint_for


def gw(name: str, ns: str = "demo", waypoint_for_: str | None = None, cls: str = "istio-waypoint") -> str:
    labels = f", labels: {{istio.io/waypoint-for: {waypoint_for_}}}" if waypoint_for_ else ""
    return f"""
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: {name}, namespace: {ns}{labels}}}
spec: {{gatewayClassName: {cls}, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}
"""


def mesh(ns_labels: str = "", svc_labels: str = "", pod_labels: str = "", extra: str = "") -> Config:
    text = (
        f"""
apiVersion: v1
kind: Namespace
metadata: {{name: demo, labels: {{istio.io/dataplane-mode: ambient{ns_labels}}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: infra}}
---
apiVersion: v1
kind: Pod
metadata: {{name: api, namespace: demo, labels: {{app: api{pod_labels}}}}}
spec: {{serviceAccountName: api, containers: [{{name: c, image: x}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: api, namespace: demo, labels: {{app: api{svc_labels}}}}}
spec: {{selector: {{app: api}}, ports: [{{port: 80, targetPort: 8080}}]}}
"""
        + gw("ns-wp", waypoint_for_="all")
        + gw("svc-wp")
        + gw("wl-wp", waypoint_for_="workload")
        + gw("shared", ns="infra", waypoint_for_="all")
        + gw("none-wp", waypoint_for_="none")
        + gw("not-a-waypoint", cls="istio")
        + extra
    )
    return load([("m.yaml", text)])


def name_of(config: Config, via_service: bool) -> str | None:
    pod = config.pod("demo", "api")
    svc = config.service("demo", "api")
    assert pod is not None
    assert svc is not None
    b = waypoint_for(config, pod, svc if via_service else None)
    return None if b is None or b.gateway is None else f"{b.gateway.meta.namespace}/{b.gateway.meta.name}"


U = "istio.io/use-waypoint"
# case, namespace labels, service labels, pod labels, (via service, direct to pod)
CASES = [
    ("no labels", "", "", "", (None, None)),
    ("namespace label, waypoint for all", f", {U}: ns-wp", "", "", ("demo/ns-wp", "demo/ns-wp")),
    ("namespace label, waypoint for service only (default)", f", {U}: svc-wp", "", "", ("demo/svc-wp", None)),
    ("namespace label, waypoint for workload only", f", {U}: wl-wp", "", "", (None, "demo/wl-wp")),
    (
        "service label beats namespace for service traffic",
        f", {U}: ns-wp",
        f", {U}: svc-wp",
        "",
        ("demo/svc-wp", "demo/ns-wp"),
    ),
    (
        "pod label beats namespace for workload traffic",
        f", {U}: ns-wp",
        "",
        f", {U}: wl-wp",
        ("demo/ns-wp", "demo/wl-wp"),
    ),
    (
        "service opts out with none: no waypoint for service traffic",
        f", {U}: ns-wp",
        f", {U}: none",
        "",
        (None, "demo/ns-wp"),
    ),
    (
        "§2.4: a workload waypoint is never used for service-addressed traffic",
        "",
        "",
        f", {U}: wl-wp",
        (None, "demo/wl-wp"),
    ),
    ("pod opts out with none", f", {U}: ns-wp", "", f", {U}: none", ("demo/ns-wp", None)),
    ("both opt out", f", {U}: ns-wp", f", {U}: none", f", {U}: none", (None, None)),
    (
        "use-waypoint-namespace label",
        f", {U}: shared, istio.io/use-waypoint-namespace: infra",
        "",
        "",
        ("infra/shared", "infra/shared"),
    ),
    ("waypoint-for none serves nothing", f", {U}: none-wp", "", "", (None, None)),
    ("missing waypoint", f", {U}: ghost", "", "", (None, None)),
    ("Gateway of another class is not a waypoint", f", {U}: not-a-waypoint", "", "", (None, None)),
]


@pytest.mark.parametrize(("case", "ns", "svc", "pod", "expected"), CASES, ids=[c[0] for c in CASES])
def test_waypoint_resolution(
    case: str, ns: str, svc: str, pod: str, expected: tuple[str | None, str | None]
) -> None:
    config = mesh(ns, svc, pod)
    assert (name_of(config, True), name_of(config, False)) == expected


def test_notes_explain_why_not() -> None:
    config = mesh(f", {U}: ghost")
    svc = config.service("demo", "api")
    assert svc is not None
    b = for_service(config, svc)
    assert b is not None
    assert b.reference == ("demo", "ghost")
    assert "does not exist" in b.note
    config = mesh(f", {U}: svc-wp")
    pod = config.pod("demo", "api")
    assert pod is not None
    b = for_pod(config, pod)
    assert b is not None
    assert "not workload traffic" in b.note


def test_parse_reference() -> None:
    assert parse_reference({}, "demo") is None
    assert parse_reference({U: "none"}, "demo") == "none"
    assert parse_reference({U: "wp"}, "demo") == ("demo", "wp")
    assert parse_reference({U: "x/wp"}, "demo") == ("x", "wp")  # not a valid label value, accepted if given
    assert parse_reference({U: "#none"}, "demo") == "none"
