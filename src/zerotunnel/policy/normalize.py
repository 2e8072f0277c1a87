"""Request-path normalization before any path policy sees the path.

istio-ambient.md §6.3 and security.md §1a: every path-policy bypass on record (CVE-2019-9901
`/info/../private`, CVE-2021-31920 `//admin` and `%2F`, CVE-2021-39156 `#fragment`, CVE-2020-8595
`?query`) came from matching a different path than the backend served. The waypoint normalizes once,
matches the normalized path and forwards that same path, so policy and backend agree.

Options (mesh config `pathNormalization.normalization`): NONE, BASE (= DEFAULT), MERGE_SLASHES,
DECODE_AND_MERGE_SLASHES. The fragment is always stripped; the query is split off and never matched by
`paths`. Matrix parameters (`;x`) are left alone, as in Envoy: security.md §1a lists that as a
backend-dependent risk, which `analyze` cannot see.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from zerotunnel.errors import ZerotunnelError

MODES = ("NONE", "BASE", "DEFAULT", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES")
_UNRESERVED = frozenset(b"-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_SLASHES = re.compile(r"/{2,}")
_MALFORMED_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")


class BadRequest(ZerotunnelError):
    """The request is refused before authorization (HTTP 400), e.g. `%00` in the path."""

    status = 400


@dataclass(frozen=True, slots=True)
class NormalizedPath:
    path: str
    query: str


def _decode_unreserved(path: str, *, slashes: bool) -> str:
    """One pass (no double decoding): unreserved characters are decoded, `%2F`/`%5C` only when
    `slashes`; every other escape keeps its bytes, upper-cased as RFC 3986 §6.2.2.1 says."""

    def repl(m: re.Match[str]) -> str:
        byte = int(m.group(1), 16)
        if byte in _UNRESERVED:
            return chr(byte)
        if slashes and byte in (0x2F, 0x5C):
            return chr(byte)
        return "%" + m.group(1).upper()

    return _PCT.sub(repl, path)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4; `..` never climbs above the root."""
    segments = path.split("/")
    out: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    result = "/".join(out)
    if path.startswith("/") and not result.startswith("/"):
        result = "/" + result
    return result


def normalize(target: str, mode: str = "BASE") -> NormalizedPath:
    """Split the request target into (normalized path, query). Raises BadRequest for `%00` (always),
    for malformed percent-encoding (unless NONE) and for an unknown mode."""
    if mode not in MODES:
        raise BadRequest(f"unknown path normalization {mode!r}; accepted: {', '.join(MODES)}")
    target = target.split("#", 1)[0]
    path, _, query = target.partition("?")
    if "%00" in path or "\x00" in path:
        raise BadRequest("path contains %00")
    if mode == "NONE":
        return NormalizedPath(path, query)
    if _MALFORMED_PCT.search(path):
        # RFC 3986 §2.1: `%` must start an escape. Decoding around a stray one can *create* an escape
        # (`%%32%65` → `%2e`) that the policy matches as text and the backend decodes to `.`.
        raise BadRequest("path contains a '%' that is not followed by two hex digits")
    path = _decode_unreserved(path, slashes=mode == "DECODE_AND_MERGE_SLASHES")
    path = path.replace("\\", "/")
    if mode in ("MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"):
        path = _SLASHES.sub("/", path)
    path = remove_dot_segments(path)
    if mode in ("MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"):
        path = _SLASHES.sub("/", path)
    return NormalizedPath(path, query)
