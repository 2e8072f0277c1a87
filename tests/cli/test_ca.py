"""`zerotunnel ca …` through the real entry point: exit codes 0/1/2, one-line errors, -o json, files."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from zerotunnel.cli.ca import parse_duration
from zerotunnel.cli.main import main
from zerotunnel.errors import InputError
from zerotunnel.identity.csr import generate_key, make_csr, private_key_pem
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.testing.certs import make_bad_svid, make_test_ca

SID = "spiffe://cluster.local/ns/default/sa/sleep"


def run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["zerotunnel", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cadir(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Path:
    assert run(capsys, monkeypatch, "ca", "init", "--dir", str(tmp_path / "root"))[0] == 0
    code, out, err = run(
        capsys,
        monkeypatch,
        "ca",
        "init",
        "--dir",
        str(tmp_path / "ca"),
        "--intermediate-of",
        str(tmp_path / "root"),
    )
    assert code == 0, err
    assert "intermediate CA" in out
    return tmp_path / "ca"


def test_parse_duration() -> None:
    assert parse_duration("24h").total_seconds() == 86400
    assert parse_duration("90d").days == 90
    assert parse_duration("30m").total_seconds() == 1800
    assert parse_duration("3600s").total_seconds() == 3600
    for bad in ("", "1", "1w", "h", "-1h", "1.5h", "0s"):
        with pytest.raises(InputError):
            parse_duration(bad)


def test_issue_verify_inspect(
    cadir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "a.pem", tmp_path / "a.key"
    code, out, _ = run(
        capsys,
        monkeypatch,
        "ca",
        "issue",
        "--dir",
        str(cadir),
        "--spiffe-id",
        SID,
        "--ttl",
        "30m",
        "--cert-out",
        str(cert),
        "--key-out",
        str(key),
    )
    assert code == 0 and SID in out
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    certs = x509.load_pem_x509_certificates(cert.read_bytes())
    assert len(certs) == 2
    assert (certs[0].not_valid_after_utc - certs[0].not_valid_before_utc).total_seconds() == 32 * 60
    bundle = str(cadir / "root-cert.pem")
    code, out, _ = run(
        capsys,
        monkeypatch,
        "ca",
        "verify",
        "--bundle",
        bundle,
        "--cert",
        str(cert),
        "--expect-id",
        SID,
        "-o",
        "json",
    )
    result = json.loads(out)
    assert code == 0 and result["valid"] and result["spiffe_id"] == SID and len(result["chain"]) == 3
    code, out, _ = run(
        capsys,
        monkeypatch,
        "ca",
        "verify",
        "--bundle",
        bundle,
        "--cert",
        str(cert),
        "--expect-id",
        "spiffe://cluster.local/ns/default/sa/other",
    )
    assert code == 1 and out.startswith("invalid: unexpected-identity:")
    code, out, _ = run(capsys, monkeypatch, "ca", "inspect", str(cert), "-o", "json")
    report = json.loads(out)
    leaf = report["certificates"][0]
    assert code == 0 and report["chain_in_order"] is True
    assert leaf["spiffe_id"] == SID and leaf["key_type"] == "ec-p256" and not leaf["is_ca"]
    assert leaf["extended_key_usage"] == ["serverAuth", "clientAuth"]
    assert leaf["sans"] == [f"URI:{SID}"] and len(leaf["sha256_fingerprint"]) == 64
    assert report["certificates"][1]["is_ca"]
    code, out, _ = run(capsys, monkeypatch, "ca", "inspect", str(cert))
    assert code == 0 and "spiffe_id" in out and "chain order: ok" in out


def test_issue_from_csr(
    cadir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = generate_key()
    (tmp_path / "req.csr").write_bytes(make_csr(SpiffeId.parse(SID), key))
    code, _, err = run(
        capsys,
        monkeypatch,
        "ca",
        "issue",
        "--dir",
        str(cadir),
        "--spiffe-id",
        SID,
        "--csr",
        str(tmp_path / "req.csr"),
        "--cert-out",
        str(tmp_path / "c.pem"),
    )
    assert code == 0, err
    leaf = x509.load_pem_x509_certificates((tmp_path / "c.pem").read_bytes())[0]
    assert leaf.public_key() == key.public_key()
    assert private_key_pem(key)  # the key never left the caller


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--spiffe-id", "spiffe://cluster.local/a/../b"], "invalid SPIFFE ID"),
        (["--spiffe-id", SID, "--ttl", "91d"], "greater than the max allowed TTL 90d"),
        (["--spiffe-id", SID, "--ttl", "soon"], "--ttl 'soon'"),
        (["--spiffe-id", SID, "--csr", "/nonexistent.csr", "--key-out", "KEY"], "--key-out cannot be used"),
    ],
)
def test_issue_bad_input_exit_2(
    cadir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    out_cert, out_key = tmp_path / "x.pem", tmp_path / "x.key"
    args = [a.replace("KEY", str(out_key)) for a in args]
    extra = [] if "--key-out" in args or "--csr" in args else ["--key-out", str(out_key)]
    code, _, err = run(
        capsys, monkeypatch, "ca", "issue", "--dir", str(cadir), "--cert-out", str(out_cert), *extra, *args
    )
    assert code == 2
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not out_cert.exists() and not out_key.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca", "root"]


def test_bad_input_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, cadir: Path
) -> None:
    (tmp_path / "junk.pem").write_text("hello")
    cases = [
        (
            [
                "ca",
                "issue",
                "--dir",
                str(tmp_path / "none"),
                "--spiffe-id",
                SID,
                "--cert-out",
                "c",
                "--key-out",
                "k",
            ],
            "no such CA directory",
        ),
        (["ca", "inspect", str(tmp_path / "missing.pem")], "no such file"),
        (["ca", "inspect", str(tmp_path / "junk.pem")], "not a PEM or DER certificate"),
        (
            ["ca", "verify", "--bundle", str(tmp_path / "junk.pem"), "--cert", str(tmp_path / "junk.pem")],
            "not PEM certificates",
        ),
        (["ca", "init", "--dir", str(cadir)], "already holds a CA"),
        (["ca", "init", "--dir", str(tmp_path / "n"), "--trust-domain", "Bad_TD"], "trust domain characters"),
        (
            [
                "ca",
                "init",
                "--dir",
                str(tmp_path / "n"),
                "--trust-domain",
                "x.y",
                "--intermediate-of",
                str(cadir),
            ],
            "--trust-domain applies to a root",
        ),
        (
            ["ca", "init", "--dir", str(tmp_path / "n"), "--intermediate-of", str(tmp_path / "junk.pem")],
            "no such CA directory",
        ),
    ]
    (cadir / "ca-key.pem").chmod(0o600)
    for args, message in cases:
        code, _, err = run(capsys, monkeypatch, *args)
        assert code == 2, (args, err)
        assert message in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "n").exists()


def test_key_cert_mismatch_exit_2(
    cadir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (cadir / "ca-key.pem").unlink()
    (cadir / "ca-key.pem").write_bytes(private_key_pem(generate_key()))
    code, _, err = run(
        capsys,
        monkeypatch,
        "ca",
        "issue",
        "--dir",
        str(cadir),
        "--spiffe-id",
        SID,
        "--cert-out",
        str(tmp_path / "c.pem"),
        "--key-out",
        str(tmp_path / "k.pem"),
    )
    assert code == 2 and "does not match" in err and str(cadir) in err


@pytest.mark.parametrize("kind", ["expired", "ca-as-leaf", "other-root", "wrong-eku"])
def test_verify_invalid_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    ca = make_test_ca()
    leaf, _key, chain = make_bad_svid(ca, kind)  # type: ignore[arg-type]
    (tmp_path / "bundle.pem").write_bytes(ca.root_bundle_pem)
    (tmp_path / "cert.pem").write_bytes(leaf + b"".join(chain))
    code, out, _ = run(
        capsys,
        monkeypatch,
        "ca",
        "verify",
        "--bundle",
        str(tmp_path / "bundle.pem"),
        "--cert",
        str(tmp_path / "cert.pem"),
        "-o",
        "json",
    )
    assert code == 1
    result = json.loads(out)
    assert (
        result["valid"] is False
        and result["reason"]
        == {
            "expired": "expired",
            "ca-as-leaf": "leaf-is-ca",
            "other-root": "unknown-root",
            "wrong-eku": "wrong-eku",
        }[kind]
    )


@pytest.mark.slow
def test_console_script_end_to_end(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "zerotunnel"
    subprocess.run(
        [exe, "ca", "init", "--dir", tmp_path / "ca", "--key-type", "rsa-2048", "--ttl", "365d"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            exe,
            "ca",
            "issue",
            "--dir",
            tmp_path / "ca",
            "--spiffe-id",
            SID,
            "--cert-out",
            tmp_path / "a.pem",
            "--key-out",
            tmp_path / "a.key",
        ],
        check=True,
        capture_output=True,
    )
    ok = subprocess.run(
        ["openssl", "verify", "-CAfile", tmp_path / "ca" / "root-cert.pem", tmp_path / "a.pem"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [exe, "ca", "verify", "--bundle", tmp_path / "a.pem", "--cert", tmp_path / "a.pem"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
