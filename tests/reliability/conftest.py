"""Shared pieces of the reliability suite (issue 9; security.md §4 items 1, 11-20, 30-33).

The mesh PKI and the loopback HBONE environment are the node tests' own (tests/node/conftest.py),
loaded from there so both suites exercise the same server set-up. On top of it:

- `Probe`: the legitimate client. Every probe opens a *new* mTLS connection (its own pool), sends a
  CONNECT to an echo app, round-trips a payload and closes, so a flood that hurt accepting,
  handshaking or stream set-up shows up in its success rate and latency.
- `run_abuser`: tests/reliability/abuser.py in a child process (hostile frames after a valid
  handshake).
- `figures`: every test records its measured figures; they are printed and appended to
  `$ZT_RELIABILITY_FIGURES` (default /tmp/zt-reliability-figures.jsonl), the source of
  docs/RELIABILITY.md.
- `SOAK`: `ZT_SOAK=1` (`make soak`) multiplies the counts for the long form.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from zerotunnel.node.hbone_client import HbonePool
from zerotunnel.node.hbone_conn import HboneStream
from zerotunnel.node.metrics import ProxyMetrics
from zerotunnel.testing.modules import load_by_path

_node = load_by_path(
    Path(__file__).resolve().parents[1] / "node" / "conftest.py", "zt_reliability_node_conftest"
)

pki = _node.pki
env = _node.env
Env = _node.Env
Pki = _node.Pki
TD: str = _node.TD

SOAK = float(os.environ.get("ZT_SOAK", "0") or 0) > 0
FIGURES = Path(os.environ.get("ZT_RELIABILITY_FIGURES", "/tmp/zt-reliability-figures.jsonl"))
ABUSER = Path(__file__).resolve().parent / "abuser.py"


def scale(short: int, long: int) -> int:
    """The CI count, or the soak count under ZT_SOAK=1."""
    return long if SOAK else short


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Callable[..., None]:
    def record(**values: Any) -> None:
        entry = {"test": request.node.nodeid, "soak": SOAK, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                               time.gmtime()), **values}
        line = json.dumps(entry, default=str)
        print(line)
        with contextlib.suppress(OSError), FIGURES.open("a") as f:
            f.write(line + "\n")

    return record


class Collect:
    """A stream sink that gathers the echo and acknowledges it (HTTP/2 flow control)."""

    def __init__(self, stream: HboneStream, want: int) -> None:
        self.stream = stream
        self.want = want
        self.buf = bytearray()
        self.error: str | None = None
        self.done = asyncio.Event()

    def stream_data(self, data: bytes, length: int) -> None:
        self.buf += data
        self.stream.consumed(length)
        if len(self.buf) >= self.want:
            self.done.set()

    def stream_eof(self) -> None:
        self.done.set()

    def stream_reset(self, reason: str) -> None:
        self.error = reason
        self.done.set()

    def stream_writable(self) -> None:
        pass


async def echo_once(stream: HboneStream, payload: bytes, timeout: float = 5.0) -> bytes:
    sink = Collect(stream, len(payload))
    stream.attach(sink)
    stream.write(payload)
    await asyncio.wait_for(sink.done.wait(), timeout)
    if sink.error is not None:
        raise ConnectionError(sink.error)
    return bytes(sink.buf)


@dataclass
class Probe:
    """The legitimate client: a fresh mTLS connection + CONNECT + echo per probe (the pool is
    closed after each one, so every probe pays a full handshake)."""

    env: Any
    server: Any
    app_port: int
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    pool: Any = None

    async def once(self, timeout: float = 5.0) -> bool:
        if self.pool is None:
            creds = self.env.client_creds
            self.pool = HbonePool(lambda _ident: creds, mark=False, metrics=ProxyMetrics())
        t0 = time.perf_counter()
        try:
            stream = await asyncio.wait_for(
                self.pool.connect(self.env.key(self.server), f"127.0.0.1:{self.app_port}"), timeout
            )
            got = await echo_once(stream, b"ping", timeout)
            stream.abort()
            if got != b"ping":
                raise ConnectionError(f"echo returned {got!r}")
        except Exception as exc:
            self.failed += 1
            self.errors.append(f"{type(exc).__name__}: {exc}")
            return False
        finally:
            await self.pool.close()
        self.latencies.append(time.perf_counter() - t0)
        self.ok += 1
        return True

    async def loop(self, stop: asyncio.Event, interval: float = 0.02) -> None:
        while not stop.is_set():
            await self.once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    def stats(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        total = self.ok + self.failed
        return {
            "probes": total,
            "success_rate": round(self.ok / total, 4) if total else None,
            "p50_ms": round(statistics.median(lat) * 1000, 2) if lat else None,
            "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2) if lat else None,
            "max_ms": round(lat[-1] * 1000, 2) if lat else None,
            "errors": self.errors[:3],
        }


async def run_abuser(env: Any, server: Any, scenario: str, n: int, authority: str,
                     hold: float = 10.0) -> dict[str, Any]:
    creds = env.pki.creds("default", "abuser")
    args = {
        "host": server.address[0], "port": server.address[1], "identity": str(creds.identity),
        "chain": creds.chain_pem.decode(), "key": creds.key_pem.decode(), "td": TD,
        "roots": creds.roots_pem(), "scenario": scenario, "n": n, "authority": authority, "hold": hold,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ABUSER), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(json.dumps(args).encode())
    if proc.returncode != 0:
        raise AssertionError(f"abuser failed: {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out)
    return result


@functools.cache
def fuzz_targets() -> Any:
    """fuzz/targets.py (shared with the atheris harness), loaded by path."""
    return load_by_path(Path(__file__).resolve().parents[2] / "fuzz" / "targets.py", "zt_fuzz_targets")


@functools.cache
def fuzz_leaf_der() -> bytes:
    """A genuine SVID from the fuzz targets' CA: the seed the verifier mutants start from."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    targets = fuzz_targets()
    ca, _ = targets._ca()
    chain, _key = ca.issue_with_key(targets.IDENTITY, targets.NOW)
    cert = x509.load_pem_x509_certificate(chain.leaf_pem)
    return bytes(cert.public_bytes(serialization.Encoding.DER))


def settle() -> None:
    gc.collect()


@pytest.fixture(scope="session")
def rel() -> Any:
    """This module, for the helpers above (tests cannot import a conftest under importlib mode)."""
    return sys.modules[__name__]
