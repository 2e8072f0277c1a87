"""A CA directory in Istio's plug-in `cacerts` layout (spec/istio-ambient.md §3.5), read and written.

Files: `ca-cert.pem` (signing cert), `ca-key.pem` (its key), `root-cert.pem` (root bundle),
`cert-chain.pem` (signing cert → root); also the kubernetes.io/tls names `tls.crt` (signing cert and
intermediates), `tls.key`, `ca.crt`, so the directory can become either kind of Secret unchanged.

Writing follows spec/security.md §1e: private keys are created mode 0600 by the `os.open` that
creates them (never chmod'ed afterwards), every file is written to a temporary name in the target
directory and then linked/renamed into place, and on any failure the temporaries (and a directory we
created) are removed, so nothing half-written is left behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from zerotunnel.errors import InputError
from zerotunnel.identity.ca import (
    DEFAULT_INTERMEDIATE_TTL,
    DEFAULT_ROOT_TTL,
    CaError,
    CertificateAuthority,
    check_pem_framing,
)

ISTIO_FILES = ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem")
TLS_FILES = ("tls.crt", "tls.key", "ca.crt")
KEY_FILES = frozenset({"ca-key.pem", "tls.key"})
KEY_MODE = 0o600
CERT_MODE = 0o644
DIR_MODE = 0o700


@dataclass(frozen=True, slots=True)
class _Pending:
    temp: Path
    final: Path


def _write_temp(directory: Path, name: str, data: bytes, mode: int) -> Path:
    """Create a fresh temporary file (O_EXCL, final mode from the start) next to `name` and fill it."""
    temp = directory / f".{name}.tmp-{secrets.token_hex(6)}"
    fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    return temp


@contextlib.contextmanager
def _transaction(directory: Path) -> Iterator[list[_Pending]]:
    """Collect temp files; commit by linking (no clobber) into place; roll everything back on failure."""
    pending: list[_Pending] = []
    placed: list[Path] = []
    try:
        yield pending
        for item in pending:
            os.link(item.temp, item.final)  # fails if the final name exists: never clobber a CA
            placed.append(item.final)
    except BaseException:
        for path in placed:
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    finally:
        for item in pending:
            with contextlib.suppress(OSError):
                item.temp.unlink()


def write_ca(directory: Path, ca: CertificateAuthority) -> list[Path]:
    """Write `ca` into `directory` (created 0700 if missing) in both layouts; refuse to overwrite a CA."""
    created = False
    try:
        directory.mkdir(mode=DIR_MODE, parents=True)
        created = True
    except FileExistsError:
        if not directory.is_dir():
            raise InputError(f"{directory} exists and is not a directory") from None
    except OSError as exc:
        raise InputError(f"cannot create {directory}: {exc.strerror}") from None
    existing = [n for n in (*ISTIO_FILES, *TLS_FILES) if (directory / n).exists()]
    if existing:
        raise InputError(f"{directory} already holds a CA ({', '.join(existing)}); refusing to overwrite it")
    chain_pem = ca.signing_cert_pem + b"".join(ca.intermediates_pem[1:])
    contents = {
        "ca-cert.pem": ca.signing_cert_pem,
        "ca-key.pem": ca.signing_key_pem(),
        "cert-chain.pem": ca.cert_chain_pem,
        "root-cert.pem": ca.root_bundle_pem,
        "tls.crt": chain_pem,
        "tls.key": ca.signing_key_pem(),
        "ca.crt": ca.root_bundle_pem,
    }
    try:
        with _transaction(directory) as pending:
            for name, data in contents.items():
                mode = KEY_MODE if name in KEY_FILES else CERT_MODE
                pending.append(_Pending(_write_temp(directory, name, data, mode), directory / name))
    except OSError as exc:
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise InputError(f"cannot write CA files to {directory}: {exc.strerror or exc}") from None
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    return [directory / n for n in contents]


def write_files(files: dict[Path, tuple[bytes, int]]) -> None:
    """Atomically (each) write several output files, e.g. an issued cert and its key.

    Each goes to a temp file in its own directory, created with its final mode, then all are
    renamed into place; an existing file is replaced by a new inode, so an old 0644 key file becomes
    a 0600 one without a window in which the new key is readable by others.
    """
    pending: list[_Pending] = []
    try:
        for path, (data, mode) in files.items():
            if path.is_dir():
                raise InputError(f"{path} is a directory")
            pending.append(_Pending(_write_temp(path.parent, path.name, data, mode), path))
        for item in pending:
            os.replace(item.temp, item.final)
    except FileNotFoundError as exc:
        raise InputError(f"cannot write {exc.filename}: directory does not exist") from None
    except OSError as exc:
        raise InputError(f"cannot write {exc.filename}: {exc.strerror}") from None
    finally:
        for item in pending:
            with contextlib.suppress(OSError):
                item.temp.unlink()


def _read(directory: Path, name: str) -> bytes:
    path = directory / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: missing") from None
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror}") from None
    check_pem_framing(data, str(path))
    return data


def load_ca(directory: Path, now: datetime) -> CertificateAuthority:
    """Load and check the CA in `directory` (Istio layout first, else tls.crt/tls.key/ca.crt)."""
    if not directory.is_dir():
        raise InputError(f"{directory}: no such CA directory")
    try:
        if (directory / "ca-cert.pem").exists() or not (directory / "tls.crt").exists():
            return CertificateAuthority.from_pem(
                signing_cert=_read(directory, "ca-cert.pem"),
                signing_key=_read(directory, "ca-key.pem"),
                cert_chain=_read(directory, "cert-chain.pem"),
                root_certs=_read(directory, "root-cert.pem"),
                now=now,
            )
        tls_crt = _read(directory, "tls.crt")
        return CertificateAuthority.from_pem(
            signing_cert=tls_crt,
            signing_key=_read(directory, "tls.key"),
            cert_chain=tls_crt,
            root_certs=_read(directory, "ca.crt"),
            now=now,
        )
    except CaError as exc:
        raise CaError(f"{directory}: {exc.message}") from None


def init_root(
    directory: Path, trust_domain: str, now: datetime, key_type: str = "ec-p256", ttl: timedelta | None = None
) -> CertificateAuthority:
    """Create a self-signed root CA and write it to `directory`."""
    ca = CertificateAuthority.create_root(trust_domain, now, key_type=key_type, ttl=ttl or DEFAULT_ROOT_TTL)
    write_ca(directory, ca)
    return ca


def init_intermediate(
    directory: Path, parent_dir: Path, now: datetime, key_type: str = "ec-p256", ttl: timedelta | None = None
) -> CertificateAuthority:
    """Create an intermediate signed by the CA in `parent_dir` (the plug-in CA case) in `directory`."""
    parent = load_ca(parent_dir, now)
    ca = CertificateAuthority.create_intermediate(
        parent, now, key_type=key_type, ttl=ttl or DEFAULT_INTERMEDIATE_TTL
    )
    write_ca(directory, ca)
    return ca
