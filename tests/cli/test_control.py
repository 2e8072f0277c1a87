"""`zerotunnel control`: the real console script serving, minting tokens and reporting status."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from zerotunnel.cli.control import control
from zerotunnel.control.client import ControlPlaneError, GrpcCaClient, enroll
from zerotunnel.control.tokens import TokenStore
from zerotunnel.identity.csr import generate_key, make_csr
from zerotunnel.identity.spiffe import SpiffeId

ZT = [sys.executable, "-m", "zerotunnel"]
CONFIG = """
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec: {serviceAccountName: web, nodeName: node-a, containers: [{name: app, image: x}]}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ZT, "control", *args, "--state-dir", str(state)], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str, str, subprocess.Popen[str]]]:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "pods.yaml").write_text(CONFIG)
    state = tmp_path / "state"
    ca, en = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        [*ZT, "control", "--config", str(tmp_path / "config"), "--state-dir", str(state),
         "--listen", ca, "--enrol-listen", en, "--metrics-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 20
    while not (state / "status.json").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "control plane did not start"
        time.sleep(0.05)
    try:
        yield state, ca, en, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=20)


@pytest.mark.slow
def test_serve_token_enrol_and_status(served: tuple[Path, str, str, subprocess.Popen[str]]) -> None:
    state, ca_addr, enrol_addr, proc = served
    created = _cli("token", "create", "--node", "node-a", "--ttl", "10m", state=state)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("ztjoin.") and "single use" in created.stderr
    # only the hash is stored
    assert token not in (state / "join-tokens.json").read_text()
    assert (state / "join-tokens.json").stat().st_mode & 0o777 == 0o600
    root = (state / "ca" / "root-cert.pem").read_bytes()

    async def node_side() -> str:
        await enroll(ca_addr, token, state.parent / "node", root, enrol_address=enrol_addr)
        client = GrpcCaClient(ca_addr, state.parent / "node")
        web = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
        try:
            chain = await client.sign(web, make_csr(web, generate_key()), None)
            other = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/db")
            try:
                await client.sign(other, make_csr(other, generate_key()), None)
            except ControlPlaneError as exc:
                return exc.code + " " + chain.leaf_pem.decode()[:27]
        finally:
            await client.close()
        return "not refused"

    assert asyncio.run(node_side()) == "PERMISSION_DENIED -----BEGIN CERTIFICATE-----"
    time.sleep(1.5)  # status.json is rewritten within a second of a change
    shown = _cli("status", state=state)
    assert shown.returncode == 0, shown.stderr
    assert "issued 1, refused: permission-denied 1" in shown.stdout
    assert "node-a" in shown.stdout and "accepted 1" in shown.stdout
    assert "snapshot       version 1, 1 documents" in shown.stdout
    data = json.loads(_cli("status", "--json", state=state).stdout)
    assert data["certificates"]["issued_per_node"] == {"node-a": 1}
    # Prometheus text on the loopback metrics port, istiod's names
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{data['listen']['metrics_port']}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert "citadel_server_success_cert_issuance_total 1.0" in metrics
    assert 'zerotunnel_ca_csr_refused_total{reason="permission-denied"} 1.0' in metrics
    assert 'zerotunnel_enrolments_total{result="accepted"} 1.0' in metrics
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "certificate issued for spiffe://cluster.local/ns/shop/sa/web to node node-a" in err
    assert "node-a may not obtain spiffe://cluster.local/ns/shop/sa/db" in err


def test_token_create_prints_once_and_validates(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(control, ["token", "create", "--node", "node-b", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    [record] = TokenStore(tmp_path).records()
    assert record.node == "node-b" and record.used_at is None
    bad = runner.invoke(control, ["token", "create", "--node", "Node_B", "--state-dir", str(tmp_path)])
    assert bad.exit_code != 0 and "DNS-1123" in str(bad.exception)
    long = runner.invoke(
        control, ["token", "create", "--node", "n", "--ttl", "30d", "--state-dir", str(tmp_path)]
    )
    assert long.exit_code != 0 and "at most 7 days" in str(long.exception)


@pytest.mark.slow
def test_status_without_state_and_serve_without_config_are_input_errors(tmp_path: Path) -> None:
    res = subprocess.run([*ZT, "control", "status", "--state-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "status.json" in res.stderr
    res = subprocess.run([*ZT, "control", "--state-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "ZEROTUNNEL_CONTROL_STATE": str(tmp_path)})
    assert res.returncode == 2 and "--config" in res.stderr
