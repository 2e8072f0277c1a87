"""`zerotunnel waypoint` as a process: CA directory, config files, addresses file; a real HBONE client
reaches app-a through it and the seed's first policy holds (examples/seed/waypoint.yaml)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.waypoint.conftest import ALLOW, SEED, TD, VIP
from zerotunnel.control.castore import init_root
from zerotunnel.demoapp import start_demo_app
from zerotunnel.identity.bundle import TrustBundle
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.node.hbone_client import HbonePool, PoolKey
from zerotunnel.node.hbone_server import HboneServer, InboundRequest, LocalWorkload
from zerotunnel.node.tls import WorkloadCredentials
from zerotunnel.policy.decision import Decision
from zerotunnel.waypoint.http import StreamChannel, exchange
from zerotunnel.waypoint.main import parse_gateway

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "seed" / "waypoint.yaml"


def test_parse_gateway() -> None:
    assert str(parse_gateway("namespace-a/waypoint")) == "namespace-a/waypoint"
    for bad in ("waypoint", "/x", "a/", "a/b/c"):
        with pytest.raises(Exception, match="NAMESPACE/NAME"):
            parse_gateway(bad)


async def _wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)
        else:
            writer.close()
            return


@pytest.mark.slow
async def test_waypoint_process_enforces_seed_policy(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    ca = init_root(tmp_path / "ca", TD, now - timedelta(minutes=5))
    bundle = TrustBundle.from_certs(TD, ca.roots)

    def creds(ns: str, sa: str) -> WorkloadCredentials:
        ident = SpiffeId.istio(TD, ns, sa)
        chain, key = ca.issue_with_key(ident, now - timedelta(minutes=1), timedelta(hours=1))
        return WorkloadCredentials.from_pem(ident, chain.chain_pem, key, bundle)

    net = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}"
    app_ip, wp_ip = f"{net}.2", f"{net}.3"
    mesh = SEED.read_text().replace(
        "  name: namespace-a\n  labels:\n",
        "  name: namespace-a\n  labels:\n    istio.io/use-waypoint: waypoint\n",
    )
    (tmp_path / "mesh.yaml").write_text(mesh)
    (tmp_path / "waypoint.yaml").write_text(EXAMPLE.read_text())
    addresses = {
        "pod_ips": {"namespace-a/app-a": app_ip, "namespace-a/waypoint": wp_ip},
        "service_vips": {"namespace-a/app-a": VIP},
    }
    (tmp_path / "addresses.json").write_text(json.dumps(addresses))
    app = await start_demo_app(app_ip, 8080, "app-a")
    seen: list[InboundRequest] = []

    def authorize(request: InboundRequest) -> Decision:
        seen.append(request)
        return ALLOW

    dest_creds = creds("namespace-a", "service-account-a")
    destination = HboneServer(
        dest_creds,
        authorize=authorize,
        local_workload=lambda _ip: LocalWorkload("app-a", "namespace-a", dest_creds.identity),
    )
    await destination.start(app_ip, 15008)
    metrics_port = random.randint(10000, 30000)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "zerotunnel",
        "waypoint",
        "--gateway",
        "namespace-a/waypoint",
        "-f",
        str(tmp_path / "mesh.yaml"),
        "-f",
        str(tmp_path / "waypoint.yaml"),
        "--ca-dir",
        str(tmp_path / "ca"),
        "--addresses",
        str(tmp_path / "addresses.json"),
        "--listen",
        f"{wp_ip}:15008",
        "--metrics",
        f"127.0.0.1:{metrics_port}",
        "--readiness",
        "off",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    pools: list[HbonePool] = []
    try:
        await _wait_port(wp_ip, 15008)
        wp_identity = SpiffeId.istio(TD, "namespace-a", "waypoint")

        async def call(ns: str, sa: str, method: str) -> int:
            client = creds(ns, sa)
            pool = HbonePool(lambda _i: client, mark=False)
            pools.append(pool)
            stream = await pool.connect(
                PoolKey(client.identity, frozenset({wp_identity}), (wp_ip, 15008)), f"{VIP}:80"
            )
            channel = StreamChannel(stream)
            response = await exchange(channel, method, "/data", "app-a.namespace-a", [], b"", timeout=10)
            channel.send_eof()
            return response.status

        assert await call("namespace-b", "service-account-b", "GET") == 200
        assert await call("namespace-b", "service-account-b", "POST") == 403
        assert await call("namespace-c", "service-account-c", "GET") == 403
        assert [str(r.source_identity) for r in seen] == [str(wp_identity)]
        metrics = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
        )
        assert b"istio_requests_total{" in metrics and b'response_code="403"' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        for pool in pools:
            await pool.close()
        await destination.close(0)
        await app.close()
    lines = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    requests = [x for x in lines if x.get("message") == "request complete"]
    assert [(x["method"], x["response_code"]) for x in requests] == [
        ("GET", 200),
        ("POST", 403),
        ("GET", 403),
    ], err


def test_missing_ca_dir_is_one_line_exit_2(tmp_path: Path) -> None:
    import subprocess

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "zerotunnel",
            "waypoint",
            "--gateway",
            "namespace-a/waypoint",
            "-f",
            str(SEED),
            "-f",
            str(EXAMPLE),
            "--ca-dir",
            str(tmp_path / "none"),
            "--metrics",
            "off",
            "--readiness",
            "off",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --ca-dir {tmp_path / 'none'}: no such CA directory"


def test_listener_bounds_have_documented_defaults() -> None:
    """The 15008 listener's bounds (security.md §3) are shown in --help and reach the `HboneServer`."""
    from click.testing import CliRunner

    from zerotunnel.cli.waypoint import waypoint

    text = " ".join(CliRunner().invoke(waypoint, ["--help"]).output.split())
    assert "--handshake-timeout FLOAT RANGE" in text and "[default: 10.0; x>=0.1]" in text
    assert "--max-connections" in text and "[default: 4096; x>=1]" in text
    assert "--max-pending-handshakes" in text and "[default: 256; x>=1]" in text
