"""`zerotunnel authz check` through click's CliRunner and once through the installed console script:
flags, JSON fields, text table, exit codes 0/1/2."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from zerotunnel.cli.main import cli

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: demo, labels: {app: sleep}}
spec: {serviceAccountName: sleep, nodeName: node-a, containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin, namespace: demo, labels: {app: httpbin}}
spec:
  serviceAccountName: httpbin
  nodeName: node-b
  containers: [{name: c, image: x, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: demo}
spec: {selector: {app: httpbin}, ports: [{name: http, port: 8000, targetPort: http}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-l4, namespace: demo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/sleep, cluster.local/ns/demo/sa/waypoint]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: demo}
spec:
  targetRefs: [{kind: Service, group: "", name: httpbin}]
  rules: [{to: [{operation: {methods: [GET], paths: [/get, /status/*]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: demo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: [/admin*]}}]}]
"""


@pytest.fixture
def mesh(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(MESH)
    return path


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["authz", "check", *args])
    return result.exit_code, result.output


def as_json(mesh: Path, *args: str) -> tuple[int, dict[str, object]]:
    code, out = run("-f", str(mesh), "--to", "demo/httpbin", "-o", "json", *args)
    return code, json.loads(out)


# case, extra args, exit code, (decision, enforced_by, status, policy, reason)
CASES = [
    (
        "GET /get from sleep: allowed through waypoint and ztunnel",
        ["--from", "demo/sleep", "--path", "/get"],
        0,
        ("ALLOW", "ztunnel", 200, "demo/httpbin-l4", "allowed by: demo/httpbin-l4"),
    ),
    (
        "POST denied at the waypoint",
        ["--from", "demo/sleep", "--method", "POST", "--path", "/get"],
        1,
        ("DENY", "waypoint", 403, None, "allow policies exist, but none allowed"),
    ),
    (
        "/admin denied by the DENY policy",
        ["--from", "demo/sleep", "--path", "/admin/x"],
        1,
        ("DENY", "waypoint", 403, "demo/no-admin", "explicitly denied by: demo/no-admin"),
    ),
    (
        "//admin normalized (BASE keeps //: not denied by /admin*, not allowed by GET paths)",
        ["--from", "demo/sleep", "--path", "//admin"],
        1,
        ("DENY", "waypoint", 403, None, "allow policies exist, but none allowed"),
    ),
    (
        "--via ztunnel: the node proxy alone allows sleep",
        ["--from", "demo/sleep", "--via", "ztunnel", "--method", "POST"],
        0,
        ("ALLOW", "ztunnel", 200, "demo/httpbin-l4", "allowed by: demo/httpbin-l4"),
    ),
    (
        "--via ztunnel, another identity: 401",
        ["--from-principal", "cluster.local/ns/x/sa/y", "--via", "ztunnel"],
        1,
        ("DENY", "ztunnel", 401, None, "allow policies exist, but none allowed"),
    ),
    (
        "plaintext: only the node proxy, denied",
        ["--from-plaintext"],
        1,
        ("DENY", "ztunnel", 401, None, "allow policies exist, but none allowed"),
    ),
    (
        "lower-case method: 400 at the waypoint",
        ["--from", "demo/sleep", "--method", "get"],
        1,
        ("DENY", "waypoint", 400, None, "bad request: invalid method 'get': methods must be upper case"),
    ),
]


@pytest.mark.parametrize(("case", "args", "code", "expected"), CASES, ids=[c[0] for c in CASES])
def test_check_json(mesh: Path, case: str, args: list[str], code: int, expected: tuple[object, ...]) -> None:
    exit_code, out = as_json(mesh, *args)
    assert exit_code == code
    assert (out["decision"], out["enforced_by"], out["status"], out["policy"], out["reason"]) == expected
    assert set(out) == {
        "decision",
        "enforced_by",
        "policy",
        "reason",
        "status",
        "hops",
        "dry_run",
        "warnings",
    }


def test_hops_are_reported(mesh: Path) -> None:
    _, out = as_json(mesh, "--from", "demo/sleep", "--path", "/get")
    hops = out["hops"]
    assert isinstance(hops, list)
    assert [(h["hop"], h["decision"], h["source"]) for h in hops] == [
        ("waypoint", "ALLOW", "demo/sleep"),
        ("ztunnel", "ALLOW", "waypoint demo/waypoint"),
    ]


def test_text_output_is_a_table(mesh: Path) -> None:
    code, out = run("-f", str(mesh), "--to", "demo/httpbin", "--from", "demo/sleep", "--method", "POST")
    assert code == 1
    assert "authorization check" in out
    assert "waypoint demo/waypoint" in out
    assert "allow policies exist, but none allowed" in out
    assert "decision: DENY" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to", "demo/nope", "--from", "demo/sleep"], "unknown pod demo/nope"),
        (["--to", "demo/httpbin"], "give exactly one of"),
        (
            ["--to", "demo/httpbin", "--from", "demo/sleep", "--header", "novalue"],
            "--header must be NAME=VALUE",
        ),
    ],
)
def test_bad_input_exits_2(mesh: Path, args: list[str], message: str) -> None:
    code, out = run("-f", str(mesh), *args)
    assert code == 2
    assert message in out


def test_bad_flag_exits_2(mesh: Path) -> None:
    code, _ = run("-f", str(mesh), "--to", "demo/httpbin", "--via", "teleport")
    assert code == 2


def test_invalid_config_lists_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: d}\nspec: {bogus: 1}\n")
    code, out = run("-f", str(bad), "--to", "d/x", "--from-plaintext")
    assert code == 2
    assert "bad.yaml" in out


def test_jwt_from_a_jwks_file(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    ra = f"""
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: demo}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
  jwtRules: [{{issuer: https://issuer, jwksUri: "file://{tmp_path / "jwks.json"}"}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: need-jwt, namespace: demo}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
  action: DENY
  rules: [{{from: [{{source: {{notRequestPrincipals: [https://issuer/alice]}}}}]}}]
"""
    (tmp_path / "mesh.yaml").write_text(MESH + ra)
    now = datetime.now(UTC)
    good = jwt.encode(
        {"iss": "https://issuer", "sub": "alice", "exp": int((now + timedelta(hours=1)).timestamp())},
        key,
        algorithm="RS256",
    )
    expired = jwt.encode(
        {"iss": "https://issuer", "sub": "alice", "exp": int((now - timedelta(hours=1)).timestamp())},
        key,
        algorithm="RS256",
    )
    base = [
        "-f",
        str(tmp_path / "mesh.yaml"),
        "--to",
        "demo/httpbin",
        "--from",
        "demo/sleep",
        "--path",
        "/get",
        "-o",
        "json",
    ]
    code, out = run(*base, "--jwt", good)
    assert code == 0, out
    code, out = run(*base, "--jwt", expired)
    assert (code, json.loads(out)["status"], json.loads(out)["reason"]) == (
        1,
        401,
        "jwt authentication failed: Jwt is expired",
    )
    code, out = run(*base)
    assert (code, json.loads(out)["status"], json.loads(out)["policy"]) == (1, 403, "demo/need-jwt")


def test_console_script_subprocess(mesh: Path) -> None:
    exe = Path(sys.executable).parent / "zerotunnel"
    proc = subprocess.run(
        [
            str(exe),
            "authz",
            "check",
            "-f",
            str(mesh),
            "--to",
            "demo/httpbin",
            "--from",
            "demo/sleep",
            "--method",
            "DELETE",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["enforced_by"] == "waypoint"
    proc = subprocess.run(
        [str(exe), "authz", "check", "-f", str(mesh), "--to", "demo/ghost", "--from-plaintext"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "unknown pod demo/ghost" in proc.stderr
