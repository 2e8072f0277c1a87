"""index.py: a decision only sees the policies that can apply (istio-ambient.md §4.3-§4.4)."""

from __future__ import annotations

from zerotunnel.policy.index import PolicyIndex
from zerotunnel.policy.l4 import Action, L4Policy, Rule, Scope


def p(name: str, ns: str, scope: Scope, selector: dict[str, str] | None = None) -> L4Policy:
    return L4Policy(
        name, ns, scope, Action.ALLOW, (Rule(()),), selector=tuple(sorted((selector or {}).items()))
    )


POLICIES = [
    p("ns-wide", "demo", Scope.NAMESPACE),
    p("other-ns", "other", Scope.NAMESPACE),
    p("global", "istio-system", Scope.GLOBAL),
    p("httpbin", "demo", Scope.WORKLOAD_SELECTOR, {"app": "httpbin"}),
    p("httpbin-v2", "demo", Scope.WORKLOAD_SELECTOR, {"app": "httpbin", "version": "v2"}),
    p("sleep", "demo", Scope.WORKLOAD_SELECTOR, {"app": "sleep"}),
    p("httpbin-other-ns", "other", Scope.WORKLOAD_SELECTOR, {"app": "httpbin"}),
    p("root-selector", "istio-system", Scope.WORKLOAD_SELECTOR, {"app": "httpbin"}),
    p("empty-selector", "demo", Scope.WORKLOAD_SELECTOR, {}),
]


def keys(ns: str, labels: dict[str, str]) -> list[str]:
    return sorted(x.key for x in PolicyIndex.build(POLICIES).for_workload(ns, labels))


def test_workload_gets_namespace_global_selector_and_root_selector_policies() -> None:
    assert keys("demo", {"app": "httpbin", "version": "v1"}) == [
        "demo/empty-selector",
        "demo/httpbin",
        "demo/ns-wide",
        "istio-system/global",
        "istio-system/root-selector",
    ]


def test_all_selector_labels_must_match() -> None:
    assert "demo/httpbin-v2" in keys("demo", {"app": "httpbin", "version": "v2"})
    assert "demo/httpbin-v2" not in keys("demo", {"version": "v2"})


def test_other_namespaces_are_never_returned() -> None:
    assert keys("other", {"app": "sleep"}) == ["istio-system/global", "other/other-ns"]
    assert "other/httpbin-other-ns" not in keys("demo", {"app": "httpbin"})


def test_root_namespace_workload() -> None:
    assert keys("istio-system", {"app": "httpbin"}) == ["istio-system/global", "istio-system/root-selector"]


def test_size() -> None:
    assert PolicyIndex.build(POLICIES).size == len(POLICIES)
