"""Who may obtain which certificate from the control plane's CA (spec/istio-ambient.md §3.2, §3.3).

The rule is Istio's impersonation rule, tightened (security.md rule 7):

- the caller is known only from its verified mTLS client certificate; no certificate, one that does not
  verify, or one from another trust domain → `unauthenticated`;
- only node proxies call the CA. A node's identity is `spiffe://<td>/zerotunnel/node/<NAME>`, a path no
  pod can have (pods are always `/ns/<ns>/sa/<sa>`), so a workload SVID can never pass for a node SVID
  and a node SVID can only come from enrolment with a join token;
- a node asking with metadata `ImpersonatedIdentity` gets that identity only if a pod with that identity
  is scheduled on it (`spec.nodeName`), else `permission-denied`; without the metadata it renews its own
  node identity (Istio: "without impersonation SAN := caller identity");
- the SAN is always the authorized identity; a CSR naming anything else is refused, not rewritten;
- TTL: 0 or less → the mesh default (24 h), above the mesh maximum (90 d) → `invalid-argument`.

This module decides and signs; the gRPC layer (`control/server.py`) maps `CaDenied.code` to a status.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from zerotunnel.config import Config
from zerotunnel.errors import ZerotunnelError
from zerotunnel.identity.ca import CaError, CertificateAuthority, IssuedChain
from zerotunnel.identity.spiffe import SpiffeId, SpiffeIdError

log = logging.getLogger("zerotunnel.control.ca")

IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
NODE_PATH_PREFIX = "/zerotunnel/node/"


class CaDenied(ZerotunnelError):
    """A refused CSR; `code` is `unauthenticated`, `permission-denied` or `invalid-argument`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, status=403 if code == "permission-denied" else 401)
        self.code = code


def node_identity(trust_domain: str, node: str) -> SpiffeId:
    """The SPIFFE ID of node proxy `node` (see the module docstring for why not `/ns/../sa/..`)."""
    return SpiffeId(trust_domain.replace("@", "."), NODE_PATH_PREFIX + node)


def node_name_of(identity: SpiffeId) -> str | None:
    """The node name a node SVID stands for; None for any other identity."""
    if not identity.path.startswith(NODE_PATH_PREFIX):
        return None
    name = identity.path[len(NODE_PATH_PREFIX) :]
    return name if name and "/" not in name else None


@dataclass(frozen=True, slots=True)
class Grant:
    """An authorized request: who asked (`node`) and the identity the certificate will carry."""

    node: str
    identity: SpiffeId


def authorize(config: Config, caller: SpiffeId | None, metadata: Mapping[str, object]) -> Grant:
    """Decide which identity `caller` may have signed; CaDenied otherwise. Pure (config passed in)."""
    td = config.mesh.trust_domain.replace("@", ".")
    if caller is None:
        raise CaDenied("unauthenticated", "no verified client certificate")
    if caller.trust_domain != td:
        raise CaDenied("unauthenticated", f"caller {caller} is not in trust domain {td}")
    node = node_name_of(caller)
    if node is None:
        raise CaDenied("permission-denied", f"caller {caller} is not a node proxy; only nodes may request")
    wanted = metadata.get(IMPERSONATED_IDENTITY)
    if wanted is None or wanted == "":
        return Grant(node, caller)
    if not isinstance(wanted, str):
        raise CaDenied("invalid-argument", f"{IMPERSONATED_IDENTITY} must be a string")
    try:
        identity = SpiffeId.parse(wanted)
    except SpiffeIdError as exc:
        raise CaDenied("invalid-argument", f"{IMPERSONATED_IDENTITY}: {exc.reason}") from None
    if identity.trust_domain != td:
        raise CaDenied("permission-denied", f"node {node} may not obtain {identity}: foreign trust domain")
    wanted_text = str(identity)
    on_node = [p for p in config.pods if p.node_name == node and config.identity_of(p) == wanted_text]
    if not on_node:
        raise CaDenied(
            "permission-denied",
            f"node {node} may not obtain {identity}: no pod with that identity is scheduled on it",
        )
    return Grant(node, identity)


def requested_ttl(config: Config, validity_seconds: int) -> timedelta:
    """§3.3: ≤ 0 → the mesh default; above the mesh maximum → invalid-argument (never silently cut)."""
    if validity_seconds <= 0:
        return config.mesh.workload_cert_ttl
    ttl = timedelta(seconds=validity_seconds)
    limit = config.mesh.max_workload_cert_ttl
    if ttl > limit:
        raise CaDenied(
            "invalid-argument",
            f"requested TTL {validity_seconds}s is greater than the max allowed TTL "
            f"{int(limit.total_seconds())}s",
        )
    return ttl


@dataclass(frozen=True, slots=True)
class CaStats:
    issued: int
    refused: Mapping[str, int]
    per_node: Mapping[str, int]


class CaService:
    """Authorizes and signs CSRs with the control plane's CA; counts both outcomes for `status`.

    `config` and `ca` are read on every call so a config reload or a CA swap (root rotation) takes
    effect for the next request. Signing is CPU-bound and may run on a worker thread, hence the lock
    around the counters only.
    """

    def __init__(self, ca: Callable[[], CertificateAuthority], config: Callable[[], Config]) -> None:
        self._ca = ca
        self._config = config
        self._lock = threading.Lock()
        self._issued = 0
        self._refused: Counter[str] = Counter()
        self._per_node: Counter[str] = Counter()

    def create_certificate(
        self,
        caller: SpiffeId | None,
        csr_pem: bytes,
        validity_seconds: int,
        metadata: Mapping[str, object],
        *,
        now: datetime,
        peer: str = "",
    ) -> IssuedChain:
        config = self._config()
        try:
            grant = authorize(config, caller, metadata)
            ttl = requested_ttl(config, validity_seconds)
            try:
                chain = self._ca().issue(csr_pem, grant.identity, now, ttl)
            except CaError as exc:
                raise CaDenied("invalid-argument", exc.message) from None
        except CaDenied as exc:
            with self._lock:
                self._refused[exc.code] += 1
            log.warning("CSR refused (%s) caller=%s peer=%s: %s", exc.code, caller or "-", peer, exc.message)
            raise
        with self._lock:
            self._issued += 1
            self._per_node[grant.node] += 1
        log.info("certificate issued for %s to node %s (ttl %ss)", grant.identity, grant.node,
                 int(ttl.total_seconds()))
        return chain

    def record_refusal(self, code: str) -> None:
        """Count a refusal decided before this service was reached (e.g. TLS layer checks)."""
        with self._lock:
            self._refused[code] += 1

    def stats(self) -> CaStats:
        with self._lock:
            return CaStats(self._issued, dict(self._refused), dict(self._per_node))
