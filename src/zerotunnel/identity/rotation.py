"""Certificate rotation schedule as ztunnel runs it (spec/istio-ambient.md §3.4, security.md rule 14).

Pure functions of `now` and the certificate's validity: the node's certificate manager asks when to
refresh, how long to back off after a failure, and which certificate to serve meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Protocol, TypeVar

INITIAL_BACKOFF = timedelta(milliseconds=500)
MAX_BACKOFF = timedelta(seconds=150)
BACKOFF_MULTIPLIER = 2
RANDOMIZATION = 0.5


class HasValidity(Protocol):
    """Anything with a validity window; `cryptography.x509.Certificate` is one."""

    @property
    def not_valid_before_utc(self) -> datetime: ...

    @property
    def not_valid_after_utc(self) -> datetime: ...


C = TypeVar("C", bound=HasValidity)


def refresh_at(not_before: datetime, not_after: datetime) -> datetime:
    """Half-life: `NotBefore + (NotAfter − NotBefore) / 2` (ztunnel certificate.rs `refresh_at`)."""
    return not_before + (not_after - not_before) / 2


def next_refresh(not_before: datetime, not_after: datetime, fetched_at: datetime) -> datetime:
    """When to renew a certificate obtained at `fetched_at`: at half-life (ztunnel), unless that moment had
    already passed when it arrived — then at half of the life it had left.

    Istio backdates NotBefore by 2 minutes (§3.3), so for very short TTLs the half-life has already
    passed on arrival (a 2-minute certificate's half-life is the moment it is issued) and a plain
    half-life rule would renew in a tight loop; the floor keeps the renewal rate at one per half of the
    usable lifetime.
    """
    half_life = refresh_at(not_before, not_after)
    return half_life if half_life > fetched_at else fetched_at + (not_after - fetched_at) / 2


def needs_refresh(now: datetime, not_before: datetime, not_after: datetime) -> bool:
    """True at or after half-life, and also before NotBefore (a cert from the future is refreshed now)."""
    return now < not_before or now >= refresh_at(not_before, not_after)


def next_backoff(attempt: int, rand: float) -> timedelta:
    """Delay before retry number `attempt` (0-based) after a failed CSR: 0.5 s × 2^attempt, ±50 %, ≤ 150 s.

    `rand` in [0, 1) is the caller's random draw, so the schedule itself stays deterministic; the
    jitter spreads a whole node's retries after a control-plane outage.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    if not 0.0 <= rand <= 1.0:
        raise ValueError("rand must be in [0, 1]")
    base = INITIAL_BACKOFF.total_seconds() * BACKOFF_MULTIPLIER ** min(attempt, 32)
    base = min(base, MAX_BACKOFF.total_seconds())
    jittered = base * (1 - RANDOMIZATION + 2 * RANDOMIZATION * rand)
    return timedelta(seconds=min(jittered, MAX_BACKOFF.total_seconds()))


def retry_at(now: datetime, attempt: int, rand: float, current_not_after: datetime | None) -> datetime:
    """When to try again: after the backoff, but no later than the current certificate's expiry."""
    at = now + next_backoff(attempt, rand)
    # Clamping to an expiry that has already passed would retry at once, in a tight loop.
    if current_not_after is not None and current_not_after > now:
        return min(at, current_not_after)
    return at


def choose_cert(candidates: Iterable[C], now: datetime) -> C | None:
    """The certificate to serve at `now`: the newest one valid now; None rather than an expired one.

    A failed refresh leaves the old, still-valid certificate in service (rule 14); a certificate
    whose NotBefore is in the future or whose NotAfter has passed is never chosen.
    """
    valid = [c for c in candidates if c.not_valid_before_utc <= now <= c.not_valid_after_utc]
    if not valid:
        return None
    return max(valid, key=lambda c: (c.not_valid_after_utc, c.not_valid_before_utc))
