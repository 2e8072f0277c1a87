"""zerotunnel.policy: the authorization engine, pure (DESIGN.md §5).

Entry points for the shells:
- `Engine.from_config(config)` once per configuration snapshot, then
  `engine.check_l4(namespace, labels, L4Request(...))` in the node proxy (istio-ambient.md §4-§5) and
  `engine.check_l7(waypoint_ns, waypoint_name, L7Request(...), now=..., service=..., jwks_by_uri=...)` in
  the waypoint (§6). Both return a `Decision` with its reason in Istio's words.
- `explain(config, CheckQuery(...), now=...)` for `authz check`; `analyze(config)` for `analyze`.
"""

from zerotunnel.policy.analyze import Finding, analyze
from zerotunnel.policy.decision import (
    NOT_ALLOWED,
    POLICY_CHANGE,
    RBAC_DENIED_BODY,
    Decision,
    explicitly_denied,
    rejection_message,
)
from zerotunnel.policy.engine import Engine
from zerotunnel.policy.explain import CheckQuery, Explanation, Hop, explain
from zerotunnel.policy.index import PolicyIndex
from zerotunnel.policy.l4 import L4Policy, L4Request
from zerotunnel.policy.l7 import L7Request
from zerotunnel.policy.normalize import BadRequest, normalize

__all__ = [
    "NOT_ALLOWED",
    "POLICY_CHANGE",
    "RBAC_DENIED_BODY",
    "BadRequest",
    "CheckQuery",
    "Decision",
    "Engine",
    "Explanation",
    "Finding",
    "Hop",
    "L4Policy",
    "L4Request",
    "L7Request",
    "PolicyIndex",
    "analyze",
    "explain",
    "explicitly_denied",
    "normalize",
    "rejection_message",
]
