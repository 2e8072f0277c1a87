"""Join tokens: single use, expiring, stored only as hashes, safe under concurrent use."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zerotunnel.control.tokens import (
    KEEP_SPENT_FOR,
    TOKEN_PREFIX,
    TokenError,
    TokenStore,
    check_node_name,
    token_hash,
)
from zerotunnel.errors import InputError

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_a_token_is_printed_once_and_only_its_hash_is_stored(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    token, record = store.create("node-a", NOW, timedelta(hours=1))
    assert token.startswith(TOKEN_PREFIX) and len(token) > 40
    text = store.path.read_text()
    assert token not in text and token[len(TOKEN_PREFIX):] not in text
    assert json.loads(text)["tokens"][0]["sha256"] == token_hash(token) == record.digest
    assert store.path.stat().st_mode & 0o777 == 0o600
    assert record.expires == NOW + timedelta(hours=1)


def test_single_use(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    token, _ = store.create("node-a", NOW)
    assert store.consume(token, NOW + timedelta(minutes=1)) == "node-a"
    with pytest.raises(TokenError) as err:
        store.consume(token, NOW + timedelta(minutes=2))
    assert err.value.reason == "used"
    # a second store on the same directory (the CLI vs the server) sees the same state
    with pytest.raises(TokenError):
        TokenStore(tmp_path).consume(token, NOW + timedelta(minutes=2))
    [record] = store.records()
    assert record.used_at == NOW + timedelta(minutes=1)


def test_expiry_is_exclusive(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    token, _ = store.create("node-a", NOW, timedelta(minutes=10))
    with pytest.raises(TokenError) as err:
        store.consume(token, NOW + timedelta(minutes=10))
    assert err.value.reason == "expired"
    assert store.records()[0].used_at is None


def test_unknown_tokens(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    token, _ = store.create("node-a", NOW)
    for guess in ("", token[:-1], token + "x", TOKEN_PREFIX, token.upper()):
        with pytest.raises(TokenError) as err:
            store.consume(guess, NOW)
        assert err.value.reason == "unknown"
    assert store.consume(token, NOW) == "node-a"


def test_concurrent_consumers_get_one_success(tmp_path: Path) -> None:
    token, _ = TokenStore(tmp_path).create("node-a", NOW)
    results: list[str] = []

    def attempt() -> None:
        try:
            results.append(TokenStore(tmp_path).consume(token, NOW))
        except TokenError as exc:
            results.append(exc.reason)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["node-a"] + ["used"] * 7


def test_spent_records_are_pruned_after_a_week(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    used, _ = store.create("old-used", NOW)
    store.consume(used, NOW)
    store.create("old-expired", NOW, timedelta(hours=1))
    store.create("fresh", NOW + KEEP_SPENT_FOR, timedelta(days=7))
    later = NOW + KEEP_SPENT_FOR + timedelta(hours=2)
    store.create("new", later)
    assert [r.node for r in store.records()] == ["fresh", "new"]


def test_ttl_and_node_name_limits(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    for ttl in (timedelta(0), timedelta(seconds=-1), timedelta(days=8)):
        with pytest.raises(InputError):
            store.create("node-a", NOW, ttl)
    for name in ("", "Node", "a_b", "-a", "a-", "a/b", "a..b", "x" * 254):
        with pytest.raises(InputError):
            check_node_name(name)
    for name in ("a", "node-1", "worker.example.com", "1"):
        assert check_node_name(name) == name


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=80))
def test_any_accepted_node_name_is_one_spiffe_path_segment(name: str) -> None:
    from zerotunnel.control.ca_service import node_identity, node_name_of

    try:
        check_node_name(name)
    except InputError:
        return
    assert node_name_of(node_identity("cluster.local", name)) == name
