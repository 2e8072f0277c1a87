"""SPIFFE IDs: strict parse and format (spec/users-spiffe-conventions.md §3.4, istio-ambient.md §3.1).

Identity is compared byte-exactly everywhere (spec/security.md rule 2), so the parser is strict in
the way go-spiffe and py-spiffe are: the scheme and trust domain must already be lowercase (we do not
normalise, because two spellings of one identity would then compare unequal somewhere else), and every
rejection names the rule that was broken.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from zerotunnel.errors import InputError

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TD_CHARS = re.compile(r"[a-z0-9._-]+")
_SEGMENT_CHARS = re.compile(r"[a-zA-Z0-9._-]+")


class SpiffeIdError(InputError):
    """A string that is not a valid SPIFFE ID; `reason` is the rule it breaks (without the input)."""

    def __init__(self, text: str, reason: str) -> None:
        shown = text if len(text) <= 120 else text[:117] + "..."
        super().__init__(f"invalid SPIFFE ID {shown!r}: {reason}")
        self.reason = reason


def validate_trust_domain(td: str) -> str | None:
    """Return why `td` is not a SPIFFE trust domain name, or None when it is one (§3.4)."""
    if not td:
        return "trust domain is missing"
    if td.startswith("["):
        return "trust domain must not be an IPv6 address"
    for char, what in (("@", "userinfo"), (":", "a port"), ("%", "percent-encoding")):
        if char in td:
            return f"trust domain must not contain {what}"
    if len(td.encode()) > MAX_TRUST_DOMAIN_BYTES:
        return f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes"
    if not _TD_CHARS.fullmatch(td):
        return (
            "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores"
        )
    return None


def validate_path(path: str) -> str | None:
    """Return why `path` is not a SPIFFE ID path, or None when it is one ("" is the trust-domain ID)."""
    if path == "":
        return None
    if not path.startswith("/"):
        return "path must start with '/'"
    if "%" in path:
        return "path must not contain percent-encoding"
    if path.endswith("/"):
        return "path cannot have a trailing slash"
    for segment in path[1:].split("/"):
        if segment == "":
            return "path cannot contain empty segments"
        if segment in (".", ".."):
            return "path cannot contain dot segments"
        if not _SEGMENT_CHARS.fullmatch(segment):
            return "path segment characters are limited to letters, numbers, dots, dashes, and underscores"
    return None


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """`spiffe://<trust_domain><path>`; construct with `parse` or `istio`, which validate."""

    trust_domain: str
    path: str

    def __post_init__(self) -> None:
        reason = validate_trust_domain(self.trust_domain) or validate_path(self.path)
        if reason is None and len(str(self).encode()) > MAX_ID_BYTES:
            reason = f"longer than {MAX_ID_BYTES} bytes"
        if reason is not None:
            raise SpiffeIdError(SCHEME_PREFIX + self.trust_domain + self.path, reason)

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse `text`, or raise SpiffeIdError whose `reason` says which §3.4 rule it breaks."""
        if not text:
            raise SpiffeIdError(text, "cannot be empty")
        if len(text.encode()) > MAX_ID_BYTES:
            raise SpiffeIdError(text, f"longer than {MAX_ID_BYTES} bytes")
        if not text.startswith(SCHEME_PREFIX):
            raise SpiffeIdError(text, "scheme is missing or invalid (must be lowercase 'spiffe://')")
        rest = text[len(SCHEME_PREFIX) :]
        if "?" in rest:
            raise SpiffeIdError(text, "query is not allowed")
        if "#" in rest:
            raise SpiffeIdError(text, "fragment is not allowed")
        td, slash, path = rest.partition("/")
        reason = validate_trust_domain(td) or validate_path(slash + path)
        if reason is not None:
            raise SpiffeIdError(text, reason)
        return cls(td, slash + path)

    @classmethod
    def istio(cls, trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
        """Istio's workload identity `spiffe://<td>/ns/<ns>/sa/<sa>` (istio-ambient.md §3.1).

        istiod replaces `@` with `.` in the trust domain when it writes URIs, so we do the same.
        """
        for label, value in (("namespace", namespace), ("service account", service_account)):
            if not value or "/" in value:
                raise SpiffeIdError(
                    f"{SCHEME_PREFIX}{trust_domain}/ns/{namespace}/sa/{service_account}",
                    f"{label} must be one non-empty path segment",
                )
        return cls(trust_domain.replace("@", "."), f"/ns/{namespace}/sa/{service_account}")

    @property
    def _istio_parts(self) -> tuple[str, str] | None:
        parts = self.path.split("/")
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
            return parts[2], parts[4]
        return None

    @property
    def namespace(self) -> str | None:
        """The namespace of an Istio-form ID; None for any other shape."""
        parts = self._istio_parts
        return parts[0] if parts else None

    @property
    def service_account(self) -> str | None:
        """The service account of an Istio-form ID; None for any other shape."""
        parts = self._istio_parts
        return parts[1] if parts else None

    @property
    def is_trust_domain_id(self) -> bool:
        """True for `spiffe://td` (no path): the ID a CA may carry, never a workload (§3.3)."""
        return self.path == ""

    @property
    def principal(self) -> str:
        """The ID as AuthorizationPolicy `principals` write it: without `spiffe://` (§3.1)."""
        return self.trust_domain + self.path

    def __str__(self) -> str:
        return SCHEME_PREFIX + self.trust_domain + self.path
