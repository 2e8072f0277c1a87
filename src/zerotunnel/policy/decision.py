"""The outcome of every authorization check, with its reason.

DESIGN.md §5 "every decision carries its reason": a denial always names the policy (or says that no
ALLOW policy matched, in ztunnel's words, istio-ambient.md §4.3), so `authz check`, the access log and
the node proxy's error string all read the same text.
"""

from __future__ import annotations

from dataclasses import dataclass

NOT_ALLOWED = "allow policies exist, but none allowed"
"""ztunnel's `NotAllowed` message (istio-ambient.md §4.3 step 7)."""


def explicitly_denied(policy: str) -> str:
    """ztunnel's `ExplicitlyDenied` message (istio-ambient.md §4.3 step 3)."""
    return f"explicitly denied by: {policy}"


@dataclass(frozen=True, slots=True)
class Decision:
    """`policy` is `ns/name` of the deciding policy (None when no policy decided, e.g. the default
    allow); `rule` is the index of the matching rule inside it. `status` is what a client sees:
    200 allowed, 401 from a node proxy (HBONE) or for a bad JWT, 403 from a waypoint, 400 for a
    request the waypoint refuses to parse (§6.3)."""

    allowed: bool
    policy: str | None
    rule: int | None
    reason: str
    status: int
    dry_run_hits: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


RBAC_DENIED_BODY = "RBAC: access denied"
"""The waypoint's 403 body (istio-ambient.md §6.2), so clients and tests see Envoy's bytes."""

POLICY_CHANGE = "connection closed due to policy change"
"""Error for a live connection that a new snapshot denies (istio-ambient.md §4.3, §10.12)."""


def rejection_message(decision: Decision) -> str:
    """ztunnel's connection error for a denial (istio-ambient.md §4.3), for logs and HBONE 401s."""
    return f"connection closed due to policy rejection: {decision.reason}"
