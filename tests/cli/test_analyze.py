"""`zerotunnel analyze` through CliRunner and once through the console script: JSON fields, text
table, exit 1 on any error, 0 when clean, 2 when the configuration does not load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from zerotunnel.cli.main import cli

BASE = """
apiVersion: v1
kind: Namespace
metadata: {name: namespace-a, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: app-a, namespace: namespace-a, labels: {app: app-a}}
spec: {serviceAccountName: app-a, containers: [{name: c, image: x, ports: [{containerPort: 8080}]}]}
"""
# seed §6, first example, verbatim
SEED = """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: app-a-allow-app-b-only
  namespace: namespace-a # Namespace of the server app-a
spec:
  selector:
    matchLabels:
      app: app-a # Apply to server app-a pods
  action: ALLOW
  rules:
    - from:
        - source:
            # Match specific identity of app-b
            principals: ['cluster.local/ns/namespace-b/sa/service-account-b']
      to:
        - operation:
            methods: ['GET']
            paths: ['/data']
"""
WARN_ONLY = """
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: named-port, namespace: namespace-a}
spec: {action: DENY, rules: [{to: [{operation: {ports: [http]}}]}]}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_seed_policy_is_an_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["analyze", "-f", str(write(tmp_path, BASE + SEED)), "-o", "json"])
    assert result.exit_code == 1
    findings = json.loads(result.output)["findings"]
    (f,) = [f for f in findings if f["code"] == "ZT002"]
    assert f["severity"] == "error"
    assert f["resource"] == "AuthorizationPolicy namespace-a/app-a-allow-app-b-only"
    assert "allows nothing" in f["message"]
    assert "ztunnel does not support HTTP attributes (found: methods, paths)" in f["message"]
    assert "targetRefs" in f["fix"]
    assert set(f) == {"code", "severity", "resource", "message", "fix"}


def test_warnings_only_exit_0_and_text_table(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["analyze", "-f", str(write(tmp_path, BASE + WARN_ONLY))])
    assert result.exit_code == 0
    assert "ZT003" in result.output
    assert "finding(s)" in result.output


def test_clean_config(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["analyze", "-f", str(write(tmp_path, BASE))])
    assert (result.exit_code, result.output.strip()) == (0, "no findings")


def test_invalid_config_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["analyze", "-f", str(write(tmp_path, "kind: Nope\napiVersion: v1\n"))])
    assert result.exit_code == 2
    assert "c.yaml" in result.output


def test_console_script_subprocess(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "zerotunnel"
    proc = subprocess.run(
        [str(exe), "analyze", "-f", str(write(tmp_path, BASE + SEED)), "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert any(f["code"] == "ZT002" for f in json.loads(proc.stdout)["findings"])
