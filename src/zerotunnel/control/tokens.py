"""Join tokens for node enrolment: single use, expiring, stored only as hashes (DESIGN.md §3).

A token is the only credential a new node has, so it is treated like a key (spec/security.md §1e): it is
printed once by `zerotunnel control token create` and never written anywhere; the state directory keeps a
SHA-256 of it, the node it was minted for, its expiry and when it was used. A stolen copy of the state
file therefore mints nothing. The file is shared by the CLI (which creates tokens) and the running
control plane (which consumes them), so every read-modify-write holds an exclusive `flock`, and every
write replaces the file atomically with a 0600 one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from zerotunnel.control.castore import write_files
from zerotunnel.errors import InputError, ZerotunnelError

log = logging.getLogger("zerotunnel.control.tokens")

TOKEN_PREFIX = "ztjoin."  # noqa: S105 - a public prefix that marks the string as a join token
DEFAULT_TOKEN_TTL = timedelta(hours=1)
MAX_TOKEN_TTL = timedelta(days=7)
KEEP_SPENT_FOR = timedelta(days=7)
"""Used or expired records are kept this long (so `status` can show them), then dropped."""
TOKENS_FILE = "join-tokens.json"
_NODE_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")


class TokenError(ZerotunnelError):
    """A join token that is unknown, already used or expired; `reason` is one of those three words."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, status=401)
        self.reason = reason


def check_node_name(name: str) -> str:
    """A Kubernetes node name (DNS-1123 subdomain): it becomes a SPIFFE path segment, so it is strict."""
    if not _NODE_NAME.fullmatch(name) or ".." in name:
        raise InputError(
            f"node name {name!r} is not a DNS-1123 name (lowercase letters, digits, '-' and '.')"
        )
    return name


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """What the state directory knows of one token (never the token itself)."""

    digest: str
    node: str
    created: datetime
    expires: datetime
    used_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "sha256": self.digest,
            "node": self.node,
            "created": self.created.isoformat(),
            "expires": self.expires.isoformat(),
            "used_at": self.used_at.isoformat() if self.used_at else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenRecord:
        used = data.get("used_at")
        return cls(
            digest=str(data["sha256"]),
            node=str(data["node"]),
            created=datetime.fromisoformat(data["created"]),
            expires=datetime.fromisoformat(data["expires"]),
            used_at=datetime.fromisoformat(used) if used else None,
        )


class TokenStore:
    """The join tokens of one control plane, in `<state_dir>/join-tokens.json`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / TOKENS_FILE
        self._lock_path = state_dir / f".{TOKENS_FILE}.lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> list[TokenRecord]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.path}: unreadable join-token store ({exc})") from None
        return [TokenRecord.from_json(item) for item in data.get("tokens", [])]

    def _write(self, records: list[TokenRecord]) -> None:
        body = json.dumps({"tokens": [r.to_json() for r in records]}, indent=1).encode()
        write_files({self.path: (body, 0o600)})

    def records(self) -> list[TokenRecord]:
        with self._locked():
            return self._read()

    def create(self, node: str, now: datetime, ttl: timedelta = DEFAULT_TOKEN_TTL) -> tuple[str, TokenRecord]:
        """Mint a token for `node`; the caller prints it once and it is never stored."""
        check_node_name(node)
        if ttl <= timedelta(0) or ttl > MAX_TOKEN_TTL:
            raise InputError(f"token TTL must be positive and at most {MAX_TOKEN_TTL.days} days, got {ttl}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        record = TokenRecord(token_hash(token), node, now, now + ttl)
        with self._locked():
            records = [r for r in self._read() if not _stale(r, now)]
            records.append(record)
            self._write(records)
        return token, record

    def consume(self, token: str, now: datetime) -> str:
        """Spend `token` and return its node name; TokenError (and a log line) if it cannot be used.

        Marking the token used and checking it happen under one lock, so two concurrent enrolments with
        one token cannot both succeed.
        """
        digest = token_hash(token)
        with self._locked():
            records = self._read()
            for i, record in enumerate(records):
                if not secrets.compare_digest(record.digest, digest):
                    continue
                if record.used_at is not None:
                    log.warning("join token for node %s refused: already used at %s",
                                record.node, record.used_at.isoformat())
                    raise TokenError("used", "join token has already been used")
                if now >= record.expires:
                    log.warning("join token for node %s refused: expired at %s",
                                record.node, record.expires.isoformat())
                    raise TokenError("expired", "join token has expired")
                records[i] = TokenRecord(record.digest, record.node, record.created, record.expires, now)
                self._write(records)
                log.info("join token for node %s accepted", record.node)
                return record.node
        log.warning("unknown join token refused")
        raise TokenError("unknown", "join token is not valid")


def _stale(record: TokenRecord, now: datetime) -> bool:
    spent = record.used_at if record.used_at is not None else record.expires
    return now - spent > KEEP_SPENT_FOR and (record.used_at is not None or now >= record.expires)
