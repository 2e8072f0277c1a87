"""decision.py: the exact strings proxies and logs use (istio-ambient.md §4.3, §6.2)."""

from __future__ import annotations

from zerotunnel.policy.decision import (
    NOT_ALLOWED,
    POLICY_CHANGE,
    RBAC_DENIED_BODY,
    Decision,
    explicitly_denied,
    rejection_message,
)


def test_istio_wording() -> None:
    assert NOT_ALLOWED == "allow policies exist, but none allowed"
    assert explicitly_denied("ns/name") == "explicitly denied by: ns/name"
    assert RBAC_DENIED_BODY == "RBAC: access denied"
    assert POLICY_CHANGE == "connection closed due to policy change"
    d = Decision(False, None, None, NOT_ALLOWED, 401)
    expected = "connection closed due to policy rejection: allow policies exist, but none allowed"
    assert rejection_message(d) == expected


def test_decision_is_frozen_and_hashable() -> None:
    d = Decision(True, "a/b", 0, "allowed by: a/b", 200)
    assert hash(d) == hash(Decision(True, "a/b", 0, "allowed by: a/b", 200))
