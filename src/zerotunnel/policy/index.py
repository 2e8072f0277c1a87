"""Policies indexed so a decision touches only the policies that can apply to its workload.

istio-ambient.md §4.3-§4.4: a workload's policies are NAMESPACE-scope ones of its namespace, GLOBAL ones
(root namespace, no selector) and WORKLOAD_SELECTOR ones whose selector matches its labels (in its
namespace, or in the root namespace for every namespace). With 10,000 policies spread over namespaces a
decision must not scan the others (issue 3 "Done when"): selector policies are bucketed under one of
their (key, value) pairs, so only policies sharing a label with the workload are ever looked at.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from zerotunnel.policy.l4 import L4Policy, Scope, selector_matches

_Bucket = dict[tuple[str, str], list[L4Policy]]


@dataclass(frozen=True, slots=True)
class PolicyIndex:
    root_namespace: str
    namespace_scoped: Mapping[str, tuple[L4Policy, ...]]
    global_scoped: tuple[L4Policy, ...]
    selector_scoped: Mapping[str, Mapping[tuple[str, str], tuple[L4Policy, ...]]]
    select_all: Mapping[str, tuple[L4Policy, ...]]
    size: int

    @classmethod
    def build(cls, policies: Iterable[L4Policy], root_namespace: str = "istio-system") -> PolicyIndex:
        by_ns: dict[str, list[L4Policy]] = defaultdict(list)
        glob: list[L4Policy] = []
        by_label: dict[str, _Bucket] = defaultdict(lambda: defaultdict(list))
        select_all: dict[str, list[L4Policy]] = defaultdict(list)
        n = 0
        for pol in policies:
            n += 1
            if pol.scope is Scope.GLOBAL:
                glob.append(pol)
            elif pol.scope is Scope.NAMESPACE:
                by_ns[pol.namespace].append(pol)
            elif pol.selector:
                by_label[pol.namespace][pol.selector[0]].append(pol)
            else:
                select_all[pol.namespace].append(pol)
        return cls(
            root_namespace,
            {k: tuple(v) for k, v in by_ns.items()},
            tuple(glob),
            {ns: {k: tuple(v) for k, v in b.items()} for ns, b in by_label.items()},
            {k: tuple(v) for k, v in select_all.items()},
            n,
        )

    def for_workload(self, namespace: str, labels: Mapping[str, str]) -> list[L4Policy]:
        """The applicable policies, in no particular order (evaluation does not depend on order)."""
        out = list(self.namespace_scoped.get(namespace, ()))
        out.extend(self.global_scoped)
        namespaces = (namespace,) if namespace == self.root_namespace else (namespace, self.root_namespace)
        for ns in namespaces:
            out.extend(self.select_all.get(ns, ()))
            buckets = self.selector_scoped.get(ns)
            if not buckets:
                continue
            for item in labels.items():
                for pol in buckets.get(item, ()):
                    if selector_matches(pol, labels):
                        out.append(pol)
        return out
