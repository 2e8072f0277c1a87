"""Request headers an HBONE client sends with its CONNECT (spec/istio-ambient.md §1.3).

The server treats every one of these as attacker-controlled telemetry hints (security.md rule 1):
identity comes only from the TLS peer certificate. Randomness for `traceparent` is passed in so the
package stays pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from zerotunnel.hbone.authority import HboneAuthority

Header = tuple[bytes, bytes]

_WORKLOAD_TYPES = frozenset({"deployment", "cronjob", "pod", "job"})


@dataclass(frozen=True, slots=True)
class Baggage:
    """The source workload as §1.3 lists it; empty fields are left out."""

    cluster: str = ""
    namespace: str = ""
    workload_type: str = "deployment"
    workload_name: str = ""
    service_name: str = ""
    service_version: str = ""
    region: str = ""
    zone: str = ""

    def encode(self) -> str:
        """Comma-joined `k=v` in §1.3's fixed order."""
        kind = self.workload_type.lower()
        if kind not in _WORKLOAD_TYPES:
            kind = "pod"
        pairs = (
            ("k8s.cluster.name", self.cluster),
            ("k8s.namespace.name", self.namespace),
            (f"k8s.{kind}.name", self.workload_name),
            ("service.name", self.service_name),
            ("service.version", self.service_version),
            ("cloud.region", self.region),
            ("cloud.availability_zone", self.zone),
        )
        return ",".join(f"{k}={v}" for k, v in pairs if v)


def parse_baggage(value: str) -> dict[str, str]:
    """The server-side reading of `baggage` (§1.3): telemetry only, never trusted; empty values unset."""
    out: dict[str, str] = {}
    for item in value.split(","):
        key, sep, val = item.strip().partition("=")
        if sep and key and val.strip():
            out[key.strip()] = val.strip()
    return out


def format_forwarded(src_ip: str, src_port: int, host: str | None = None) -> str:
    """`for="ip:port"`, plus `;host=<fqdn>` when the intended Service is known (§1.3)."""
    addr = f"[{src_ip}]:{src_port}" if ":" in src_ip else f"{src_ip}:{src_port}"
    value = f'for="{addr}"'
    if host:
        value += f";host={host}"
    return value


def parse_forwarded_host(value: str) -> str | None:
    """`host=` of a `forwarded` header: quotes stripped, ASCII only, empty → None (§1.3)."""
    for part in value.split(";"):
        key, sep, val = part.strip().partition("=")
        if sep and key.lower() == "host":
            val = val.strip().strip('"')
            if val and val.isascii() and val.isprintable():
                return val
            return None
    return None


def format_traceparent(trace_id: bytes, parent_id: bytes) -> str:
    """W3C `00-<32 hex>-<16 hex>-00`, random per outbound app connection (§1.3)."""
    if len(trace_id) != 16 or len(parent_id) != 8:
        raise ValueError("traceparent needs a 16-byte trace id and an 8-byte parent id")
    return f"00-{trace_id.hex()}-{parent_id.hex()}-00"


def build_request_headers(
    *,
    baggage: Baggage | None = None,
    forwarded_for: tuple[str, int] | None = None,
    forwarded_host: str | None = None,
    trace_id: bytes | None = None,
    parent_id: bytes | None = None,
) -> list[Header]:
    """The extra CONNECT headers, in the order ztunnel writes them (§1.3)."""
    headers: list[Header] = []
    if baggage is not None:
        encoded = baggage.encode()
        if encoded:
            headers.append((b"baggage", encoded.encode()))
    if forwarded_for is not None:
        headers.append((b"forwarded", format_forwarded(*forwarded_for, forwarded_host).encode()))
    if trace_id is not None and parent_id is not None:
        headers.append((b"traceparent", format_traceparent(trace_id, parent_id).encode()))
    return headers


def connect_request_headers(
    authority: HboneAuthority | str, extra: list[Header] | None = None
) -> list[Header]:
    """Plain RFC 9113 §8.5 CONNECT (§1.1): `:method` and `:authority` only, no `:scheme`/`:path`."""
    return [(b":method", b"CONNECT"), (b":authority", str(authority).encode()), *(extra or [])]
