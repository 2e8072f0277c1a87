"""castore: Istio `cacerts` layout on disk, 0600 keys from creation, no half-written files, load checks."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from zerotunnel.control import castore
from zerotunnel.errors import InputError
from zerotunnel.identity.ca import CaError
from zerotunnel.identity.spiffe import SpiffeId

NOW = datetime.now(UTC)
SID = SpiffeId.istio("cluster.local", "default", "sleep")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_root_layout_and_modes(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    ca = castore.init_root(d, "cluster.local", NOW)
    assert sorted(p.name for p in d.iterdir()) == sorted(castore.ISTIO_FILES + castore.TLS_FILES)
    assert _mode(d) == 0o700
    for name in ("ca-key.pem", "tls.key"):
        assert _mode(d / name) == 0o600
    for name in ("ca-cert.pem", "root-cert.pem", "cert-chain.pem", "tls.crt", "ca.crt"):
        assert _mode(d / name) == 0o644
    assert (d / "root-cert.pem").read_bytes() == ca.root_bundle_pem
    loaded = castore.load_ca(d, NOW)
    assert loaded.signing_cert == ca.signing_cert and loaded.is_root


def test_intermediate_and_three_tier(tmp_path: Path) -> None:
    castore.init_root(tmp_path / "root", "cluster.local", NOW)
    castore.init_intermediate(tmp_path / "mid", tmp_path / "root", NOW)
    sign = castore.init_intermediate(tmp_path / "sign", tmp_path / "mid", NOW, ttl=timedelta(days=30))
    loaded = castore.load_ca(tmp_path / "sign", NOW)
    assert len(loaded.intermediates) == 1 and not loaded.is_root
    assert loaded.signing_cert.not_valid_after_utc == sign.signing_cert.not_valid_after_utc
    chain, _ = loaded.issue_with_key(SID, NOW)
    assert len(chain.as_cert_chain_response()) == 4


def test_tls_layout_fallback(tmp_path: Path) -> None:
    castore.init_root(tmp_path / "root", "cluster.local", NOW)
    castore.init_intermediate(tmp_path / "ca", tmp_path / "root", NOW)
    for name in castore.ISTIO_FILES:
        (tmp_path / "ca" / name).unlink()
    assert not castore.load_ca(tmp_path / "ca", NOW).is_root


def test_refuses_to_overwrite_a_ca(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    castore.init_root(d, "cluster.local", NOW)
    before = (d / "ca-key.pem").read_bytes()
    with pytest.raises(InputError, match="already holds a CA"):
        castore.init_root(d, "cluster.local", NOW)
    assert (d / "ca-key.pem").read_bytes() == before
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "ca"
    real_link = os.link
    calls = {"n": 0}

    def failing_link(src: str | Path, dst: str | Path) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", failing_link)
    with pytest.raises(InputError, match="No space left on device"):
        castore.init_root(d, "cluster.local", NOW)
    assert not d.exists()


def test_existing_dir_kept_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "ca"
    d.mkdir()
    (d / "README").write_text("mine")

    def failing_link(src: str | Path, dst: str | Path) -> None:
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(os, "link", failing_link)
    with pytest.raises(InputError, match="Permission denied"):
        castore.init_root(d, "cluster.local", NOW)
    assert [p.name for p in d.iterdir()] == ["README"]


def test_write_files_replaces_world_readable_key_with_0600(tmp_path: Path) -> None:
    key = tmp_path / "app.key"
    key.write_bytes(b"old")
    key.chmod(0o644)
    castore.write_files(
        {key: (b"new-key", castore.KEY_MODE), tmp_path / "app.pem": (b"cert", castore.CERT_MODE)}
    )
    assert key.read_bytes() == b"new-key" and _mode(key) == 0o600
    assert _mode(tmp_path / "app.pem") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.key", "app.pem"]


def test_write_files_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="directory does not exist"):
        castore.write_files({tmp_path / "nope" / "x.pem": (b"x", 0o644)})


def test_key_file_created_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        castore.init_root(tmp_path / "ca", "cluster.local", NOW)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "ca" / "ca-key.pem") == 0o600


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such CA directory"):
        castore.load_ca(tmp_path / "missing", NOW)
    d = tmp_path / "ca"
    castore.init_root(d, "cluster.local", NOW)
    (d / "cert-chain.pem").unlink()
    with pytest.raises(InputError, match=r"cert-chain\.pem: missing"):
        castore.load_ca(d, NOW)
    other = tmp_path / "other"
    castore.init_root(other, "cluster.local", NOW)
    (d / "cert-chain.pem").write_bytes((d / "ca-cert.pem").read_bytes())
    (d / "ca-key.pem").unlink()
    (d / "ca-key.pem").write_bytes((other / "ca-key.pem").read_bytes())
    with pytest.raises(CaError, match=r"does not match ca-cert\.pem"):
        castore.load_ca(d, NOW)
    with pytest.raises(CaError, match="expired at"):
        castore.load_ca(other, NOW + timedelta(days=3651))
