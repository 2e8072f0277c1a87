from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from zerotunnel.control.castore import init_root
from zerotunnel.identity.ca import IssuedChain
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.node.certs import CertificateError, CertificateManager, LocalCaClient
from zerotunnel.node.tls import WorkloadCredentials

ID = SpiffeId.istio("cluster.local", "namespace-a", "service-account-a")


class Clock:
    """Real time plus an offset a test can move forward (the manager sleeps in real time)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    @property
    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    @now.setter
    def now(self, value: datetime) -> None:
        self.offset = value - datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def _leaf(creds: WorkloadCredentials) -> x509.Certificate:
    return x509.load_pem_x509_certificates(creds.chain_pem)[0]


async def test_acquire_issues_for_the_identity_and_refreshes_at_half_life(tmp_path: Path) -> None:
    clock = Clock()
    init_root(tmp_path / "ca", "cluster.local", clock.now)
    manager = CertificateManager(
        LocalCaClient(tmp_path / "ca", clock), ttl=timedelta(hours=24), clock=clock, recheck_interval=0.05
    )
    updates: list[WorkloadCredentials] = []
    manager.on_update(updates.append)
    try:
        creds = await manager.acquire(ID)
        assert creds.identity == ID
        first = _leaf(creds)
        assert first.not_valid_after_utc - first.not_valid_before_utc == timedelta(hours=24, minutes=2)
        [status] = manager.status()
        assert status.identity == str(ID) and status.users == 1 and status.failures == 0
        # just before half-life nothing happens; past it, a new certificate replaces the old one
        clock.now += timedelta(hours=11, minutes=58)
        await asyncio.sleep(0.3)
        assert len(updates) == 1
        clock.now += timedelta(hours=1)
        for _ in range(100):
            if len(updates) >= 2:
                break
            await asyncio.sleep(0.05)
        assert len(updates) >= 2
        assert _leaf(updates[-1]).serial_number != first.serial_number
        current = manager.current(ID)
        assert current is not None and _leaf(current).serial_number == _leaf(updates[-1]).serial_number
    finally:
        await manager.close()


async def test_failures_back_off_and_recover(tmp_path: Path) -> None:
    clock = Clock()
    manager = CertificateManager(LocalCaClient(tmp_path / "ca", clock), clock=clock, rand=lambda: 0.0)
    try:
        waiter = asyncio.create_task(manager.acquire(ID, timeout=10))
        await asyncio.sleep(0.4)
        [status] = manager.status()
        assert status.failures >= 1 and "no such CA directory" in (status.last_error or "")
        init_root(tmp_path / "ca", "cluster.local", clock.now)
        creds = await waiter
        assert creds.identity == ID
        assert manager.status()[0].failures == 0
    finally:
        await manager.close()


async def test_timeout_names_the_reason_and_release_forgets(tmp_path: Path) -> None:
    clock = Clock()
    manager = CertificateManager(LocalCaClient(tmp_path / "missing", clock), clock=clock)
    with pytest.raises(CertificateError, match="no such CA directory"):
        await manager.acquire(ID, timeout=0.3)
    assert manager.status() == []
    init_root(tmp_path / "missing", "cluster.local", clock.now)
    await manager.acquire(ID)
    await manager.acquire(ID)
    manager.release(ID)
    assert manager.status()[0].users == 1
    manager.release(ID)
    assert manager.status() == [] and manager.current(ID) is None
    await manager.close()


async def test_expired_certificate_is_never_current(tmp_path: Path) -> None:
    clock = Clock()
    init_root(tmp_path / "ca", "cluster.local", clock.now)
    manager = CertificateManager(LocalCaClient(tmp_path / "ca", clock), ttl=timedelta(hours=1), clock=clock)
    try:
        await manager.acquire(ID)
        clock.now += timedelta(hours=2)
        assert manager.current(ID) is None
    finally:
        await manager.close()


class FlakyCa:
    """A local CA that can be taken down (the control plane away), the way a real outage looks."""

    def __init__(self, ca: LocalCaClient) -> None:
        self.ca = ca
        self.down = False
        self.calls = 0

    async def sign(self, identity: SpiffeId, csr_pem: bytes, ttl: timedelta | None) -> IssuedChain:
        self.calls += 1
        if self.down:
            raise CertificateError("UNAVAILABLE: failed to connect to all addresses")
        return await self.ca.sign(identity, csr_pem, ttl)


async def _until(predicate: Callable[[], bool], clock: Clock | None = None, step: timedelta | None = None,
                 rounds: int = 200) -> None:
    for _ in range(rounds):
        if predicate():
            return
        if clock is not None and step is not None:
            clock.now += step
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_an_expired_certificate_is_not_handed_out_and_the_reason_says_why(tmp_path: Path) -> None:
    """security.md §4 item 25: the CA is away longer than the TTL; a pod that asks for the identity gets
    an error naming the expiry and the failing renewal, never the expired certificate."""
    clock = Clock()
    init_root(tmp_path / "ca", "cluster.local", clock.now)
    ca = FlakyCa(LocalCaClient(tmp_path / "ca", clock))
    manager = CertificateManager(ca, ttl=timedelta(hours=1), clock=clock, recheck_interval=0.02)
    try:
        await manager.acquire(ID)
        assert manager.expired_reason(ID) is None
        ca.down = True
        clock.now += timedelta(hours=2)
        await _until(lambda: manager.status()[0].failures >= 1)
        reason = manager.expired_reason(ID)
        assert reason is not None and "expired at" in reason and "renewal failing" in reason, reason
        assert "UNAVAILABLE" in reason
        with pytest.raises(CertificateError, match=r"no valid certificate for .*expired at"):
            await manager.acquire(ID, timeout=0.5)
        assert manager.status()[0].users == 1  # the refused caller did not stay registered
    finally:
        await manager.close()


async def test_retry_failed_now_cuts_a_long_backoff_short(tmp_path: Path) -> None:
    """After a long outage the backoff has grown to 150 s; when the CA answers again (the node's config
    stream is back) `retry_failed_now` makes the renewal happen at once, not up to 2.5 min later."""
    clock = Clock()
    init_root(tmp_path / "ca", "cluster.local", clock.now)
    ca = FlakyCa(LocalCaClient(tmp_path / "ca", clock))
    manager = CertificateManager(ca, ttl=timedelta(hours=1), clock=clock, rand=lambda: 1.0,
                                 recheck_interval=0.02)
    updates: list[WorkloadCredentials] = []
    manager.on_update(updates.append)
    try:
        await manager.acquire(ID)
        ca.down = True
        await _until(lambda: manager.status()[0].failures >= 9, clock, timedelta(minutes=5), rounds=500)
        assert manager.retry_failed_now() == 1  # nothing else is failing
        await asyncio.sleep(0.1)
        calls = ca.calls
        ca.down = False
        assert manager.retry_failed_now() == 1
        await _until(lambda: len(updates) == 2, rounds=50)  # ~1 s of real time, clock not moved
        assert ca.calls == calls + 1 and manager.status()[0].failures == 0
        assert manager.retry_failed_now() == 0 and manager.expired_reason(ID) is None
    finally:
        await manager.close()
