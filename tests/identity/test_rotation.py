"""Rotation schedule (istio-ambient.md §3.4): half-life refresh, jittered capped backoff, cert choice."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zerotunnel.identity.rotation import choose_cert, needs_refresh, next_backoff, refresh_at, retry_at

T0 = datetime(2026, 6, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Cert:
    not_valid_before_utc: datetime
    not_valid_after_utc: datetime


def test_refresh_at_half_life() -> None:
    nb, na = T0 - timedelta(minutes=2), T0 + timedelta(hours=24)
    assert refresh_at(nb, na) == T0 + timedelta(hours=11, minutes=59)
    assert not needs_refresh(T0, nb, na)
    assert needs_refresh(T0 + timedelta(hours=12), nb, na)
    assert needs_refresh(nb - timedelta(seconds=1), nb, na)  # from the future: refresh now


def test_backoff_sequence_midpoint() -> None:
    got = [next_backoff(n, 0.5).total_seconds() for n in range(12)]
    assert got[:5] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert got[-1] == 150.0
    assert max(got) == 150.0


@settings(max_examples=200)
@given(st.integers(min_value=0, max_value=10_000), st.floats(min_value=0.0, max_value=1.0))
def test_backoff_bounds(attempt: int, rand: float) -> None:
    base = min(0.5 * 2 ** min(attempt, 32), 150.0)
    delay = next_backoff(attempt, rand).total_seconds()
    assert base * 0.5 - 1e-9 <= delay <= min(base * 1.5, 150.0) + 1e-9


def test_backoff_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="attempt"):
        next_backoff(-1, 0.5)
    with pytest.raises(ValueError, match="rand"):
        next_backoff(0, 1.5)


def test_retry_never_after_expiry() -> None:
    assert retry_at(T0, 20, 0.5, T0 + timedelta(seconds=10)) == T0 + timedelta(seconds=10)
    assert retry_at(T0, 0, 0.5, None) == T0 + timedelta(milliseconds=500)


def test_choose_cert_keeps_valid_never_expired() -> None:
    old = Cert(T0 - timedelta(hours=20), T0 + timedelta(hours=4))
    new = Cert(T0 - timedelta(minutes=2), T0 + timedelta(hours=24))
    future = Cert(T0 + timedelta(hours=1), T0 + timedelta(hours=30))
    assert choose_cert([old, new, future], T0) is new
    assert choose_cert([old], T0) is old  # refresh failed: keep serving the valid one
    assert choose_cert([old], T0 + timedelta(hours=5)) is None  # never an expired one
    assert choose_cert([future], T0) is None
    assert choose_cert([], T0) is None


def test_next_refresh_is_half_life_for_normal_ttls_and_never_a_tight_loop_for_short_ones() -> None:
    from datetime import UTC, datetime, timedelta

    from zerotunnel.identity.rotation import next_refresh

    now = datetime(2026, 1, 1, tzinfo=UTC)
    backdate = timedelta(minutes=2)
    day = next_refresh(now - backdate, now + timedelta(hours=24), now)
    assert day == now + timedelta(hours=11, minutes=59), "Istio's half-life, backdating included"
    short = next_refresh(now - backdate, now + timedelta(minutes=2), now)
    assert short == now + timedelta(minutes=1), "a 2-minute certificate renews after 1 minute, not at once"


def test_retry_after_expiry_still_backs_off() -> None:
    from datetime import UTC, datetime, timedelta

    from zerotunnel.identity.rotation import retry_at

    now = datetime(2026, 1, 1, tzinfo=UTC)
    expired = now - timedelta(seconds=30)
    assert retry_at(now, 3, 0.5, expired) == now + timedelta(seconds=4), "no tight loop on an expired cert"
    assert retry_at(now, 3, 0.5, now + timedelta(seconds=1)) == now + timedelta(seconds=1)
