"""`zerotunnel gateway` as a process: curl through it into the mesh, then a Secret edited on disk takes
effect for the next handshake without a restart."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.gateway.conftest import ALLOW, GATEWAY_SA, ExternalPki, GatewayMesh, gateway_yaml
from tests.waypoint.conftest import SEED, TD, VIP
from zerotunnel.control.castore import init_root
from zerotunnel.demoapp import start_demo_app
from zerotunnel.errors import InputError
from zerotunnel.gateway.main import parse_gateway
from zerotunnel.identity.bundle import TrustBundle
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.node.hbone_server import HboneServer, InboundRequest, LocalWorkload
from zerotunnel.node.tls import WorkloadCredentials
from zerotunnel.policy.decision import Decision


def test_parse_gateway() -> None:
    assert parse_gateway(None) is None
    assert parse_gateway("istio-system/ingress") == "istio-system/ingress"
    with pytest.raises(InputError):
        parse_gateway("ingress")


async def _curl_until(mesh: GatewayMesh, client: object, want_ok: bool, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        code, _, _ = await mesh.curl(client)  # type: ignore[arg-type]
        if (code == 0) == want_ok:
            return
        assert asyncio.get_running_loop().time() < deadline, (
            f"curl never {'succeeded' if want_ok else 'failed'}"
        )
        await asyncio.sleep(0.3)


@pytest.mark.slow
async def test_gateway_process_routes_and_reloads_secret(ext: ExternalPki, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    ca = init_root(tmp_path / "ca", TD, now - timedelta(minutes=5))
    bundle = TrustBundle.from_certs(TD, ca.roots)
    ident = SpiffeId.istio(TD, "namespace-a", "service-account-a")
    chain, key = ca.issue_with_key(ident, now - timedelta(minutes=1), timedelta(hours=1))
    dest_creds = WorkloadCredentials.from_pem(ident, chain.chain_pem, key, bundle)
    net = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}"
    app_ip = f"{net}.2"
    mutual = random.randint(10000, 30000)
    (tmp_path / "server-ca.crt").write_bytes(ext.server_ca.cert_pem)
    (tmp_path / "mesh.yaml").write_text(SEED.read_text())
    gw_file = tmp_path / "gateway.yaml"
    gw_file.write_text(gateway_yaml(ext, mutual, mutual + 1))
    (tmp_path / "addresses.json").write_text(
        json.dumps({"pod_ips": {"namespace-a/app-a": app_ip}, "service_vips": {"namespace-a/app-a": VIP}})
    )
    app = await start_demo_app(app_ip, 8080, "app-a")
    seen: list[InboundRequest] = []

    def authorize(request: InboundRequest) -> Decision:
        seen.append(request)
        return ALLOW

    destination = HboneServer(
        dest_creds,
        authorize=authorize,
        local_workload=lambda _ip: LocalWorkload("app-a", "namespace-a", ident),
    )
    await destination.start(app_ip, 15008)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "zerotunnel",
        "gateway",
        "-f",
        str(tmp_path / "mesh.yaml"),
        "-f",
        str(gw_file),
        "--ca-dir",
        str(tmp_path / "ca"),
        "--addresses",
        str(tmp_path / "addresses.json"),
        "--listen-host",
        "127.0.0.1",
        "--metrics",
        "off",
        "--readiness",
        "off",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    mesh = GatewayMesh(ext, None, destination, app, [], None, mutual, mutual + 1, tmp_path)  # type: ignore[arg-type]
    try:
        await _curl_until(mesh, ext.client_b, want_ok=True)
        code, body, err = await mesh.curl(ext.client_a)
        assert code == 0, err
        assert "By=spiffe://cluster.local/ns/istio-system/sa/" + GATEWAY_SA in body
        assert (await mesh.curl(ext.client_unknown))[0] != 0
        gw_file.write_text(gateway_yaml(ext, mutual, mutual + 1, ca_bundle=ext.partner_a.cert_pem))
        await _curl_until(mesh, ext.client_b, want_ok=False)
        assert (await mesh.curl(ext.client_a))[0] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err_bytes = await asyncio.wait_for(proc.communicate(), 20)
        await destination.close(0)
        await app.close()
    lines = [json.loads(x) for x in out.decode().splitlines() if x.startswith("{")]
    assert any(
        x["message"] == "tls handshake failed" and "unable to get local issuer" in x["error"] for x in lines
    ), err_bytes.decode()[-2000:]
    assert {str(r.source_identity) for r in seen} == {f"spiffe://{TD}/ns/istio-system/sa/{GATEWAY_SA}"}


def test_no_gateway_in_config_is_one_line_exit_2(tmp_path: Path) -> None:
    import subprocess

    (tmp_path / "ca").mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "zerotunnel",
            "gateway",
            "-f",
            str(SEED),
            "--ca-dir",
            str(tmp_path / "ca"),
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
    assert result.stderr.strip() == "error: the configuration has no networking.istio.io Gateway"


def test_listener_bounds_have_documented_defaults() -> None:
    """security.md §3: handshake timeout and per-listener caps are set by default, shown in --help and
    reach the options (and from there `IngressGateway`)."""
    from click.testing import CliRunner

    from zerotunnel.cli.gateway import gateway
    from zerotunnel.gateway import main as gateway_main

    text = " ".join(CliRunner().invoke(gateway, ["--help"]).output.split())
    assert "--handshake-timeout FLOAT RANGE" in text and "[default: 10.0; x>=0.1]" in text
    assert "--max-connections" in text and "[default: 4096; x>=1]" in text
    assert "--max-pending-handshakes" in text and "[default: 256; x>=1]" in text
    options = gateway_main.GatewayOptions(config_paths=(), ca_dir=Path("."))
    assert (options.handshake_timeout, options.max_connections, options.max_pending_handshakes) == (
        10.0, 4096, 256
    )
