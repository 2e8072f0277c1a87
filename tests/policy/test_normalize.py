"""istio-ambient.md §6.3 and security.md §1a: the path normalization table, per option."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zerotunnel.policy.normalize import BadRequest, normalize, remove_dot_segments

B, M, D, N = "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES", "NONE"

# case, raw target, mode, normalized path
CASES = [
    ("dot-dot resolved (CVE-2019-9901)", "/info/../private", B, "/private"),
    ("dot resolved", "/a/./b", B, "/a/b"),
    ("dot-dot above root stays at root", "/../../x", B, "/x"),
    ("trailing dot-dot keeps directory", "/a/b/..", B, "/a/"),
    ("%2E%2E decoded then resolved", "/public/%2E%2E/private", B, "/private"),
    ("%2e%2e lower case", "/public/%2e%2e/private", B, "/private"),
    ("%2E/%2E%2E", "/public/%2E/%2E%2E/private", B, "/private"),
    ("unreserved letters decoded", "/%61dmin", B, "/admin"),
    ("unreserved tilde decoded", "/%7Euser", B, "/~user"),
    ("reserved escape kept, hex upper-cased", "/a%3fb", B, "/a%3Fb"),
    ("no double decoding", "/a%252Fb", B, "/a%252Fb"),
    ("backslash becomes slash", "/public\\..\\admin", B, "/admin"),
    ("BASE keeps //", "//admin", B, "//admin"),
    ("BASE keeps %2F encoded", "/%2Fadmin", B, "/%2Fadmin"),
    ("BASE keeps %5C encoded", "/%5Cadmin", B, "/%5Cadmin"),
    ("fragment stripped (CVE-2021-39156)", "/user/profile#section1", B, "/user/profile"),
    ("query split off", "/admin?x=1", B, "/admin"),
    ("fragment stripped even with NONE", "/a#b", N, "/a"),
    ("NONE leaves dot segments", "/a/../b", N, "/a/../b"),
    ("NONE leaves escapes", "/%61", N, "/%61"),
    ("MERGE_SLASHES merges //", "//admin", M, "/admin"),
    ("MERGE_SLASHES merges ///", "/a///b", M, "/a/b"),
    ("MERGE_SLASHES keeps %2F", "/%2Fadmin", M, "/%2Fadmin"),
    ("DECODE_AND_MERGE decodes %2F then merges", "/%2Fadmin", D, "/admin"),
    ("DECODE_AND_MERGE decodes %2f lower", "/%2fadmin", D, "/admin"),
    ("DECODE_AND_MERGE decodes %5C to slash", "/%5Cadmin", D, "/admin"),
    ("DECODE_AND_MERGE %2F..%2F resolved", "/public%2F..%2Fadmin", D, "/admin"),
    ("DEFAULT = BASE", "/a/../b", "DEFAULT", "/b"),
    ("matrix parameters are not stripped (as Envoy)", "/admin;x=1", D, "/admin;x=1"),
]


@pytest.mark.parametrize(("case", "raw", "mode", "expected"), CASES, ids=[c[0] for c in CASES])
def test_normalize(case: str, raw: str, mode: str, expected: str) -> None:
    assert normalize(raw, mode).path == expected


@pytest.mark.parametrize("mode", [N, B, M, D])
@pytest.mark.parametrize("raw", ["/a%00b", "/%00", "/a\x00"])
def test_nul_is_always_400(raw: str, mode: str) -> None:
    with pytest.raises(BadRequest) as exc:
        normalize(raw, mode)
    assert exc.value.status == 400


def test_query_kept_separately() -> None:
    assert normalize("/p?a=1&b=2#f").query == "a=1&b=2"


def test_unknown_mode() -> None:
    with pytest.raises(BadRequest):
        normalize("/", "SOMETIMES")


def test_remove_dot_segments_rfc_examples() -> None:
    assert remove_dot_segments("/a/b/c/./../../g") == "/a/g"
    assert remove_dot_segments("/mid/content=5/../6") == "/mid/6"


# ------------------------------------------------------------------------------ Hypothesis invariants

_ALPHABET = ["/", "//", ".", "..", "a", "b", "%2e", "%2E", "%2f", "%5c", "\\", "%41", "%25", "?q", "#f", ";x"]
paths = st.lists(st.sampled_from(_ALPHABET), max_size=12).map(lambda parts: "/" + "".join(parts))


@settings(max_examples=300, deadline=None)
@given(paths, st.sampled_from([B, M, D]))
def test_normalization_is_idempotent_and_leaves_no_dot_segments(raw: str, mode: str) -> None:
    once = normalize(raw, mode).path
    assert normalize(once, mode).path == once
    segments = once.split("/")
    assert "." not in segments
    assert ".." not in segments
    assert "#" not in once
    assert "?" not in once
    if mode != B:
        assert "//" not in once
    if mode == D:
        assert "%2F" not in once.upper()
        assert "%5C" not in once.upper()


@pytest.mark.parametrize("target", ["/x/%%32%65%%32%65/admin", "/%%6161", "/a%", "/a%2", "/a%zz"])
def test_malformed_percent_encoding_is_a_400(target: str) -> None:
    """A stray `%` could make the single decoding pass create a new escape (fuzz finding)."""
    from zerotunnel.policy.normalize import BadRequest, normalize

    for mode in ("BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"):
        with pytest.raises(BadRequest, match="not followed by two hex digits"):
            normalize(target, mode)
    assert normalize(target, "NONE").path == target.split("?", maxsplit=1)[0]
