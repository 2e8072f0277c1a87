"""The control plane's gRPC server: the mesh CA, node enrolment and config distribution (issue 6).

docs/control-plane.md is the overview (ports, identities, rotation, the snapshot stream, status).

Two ports on one gRPC server, because grpcio cannot ask for a client certificate without requiring it:

- the CA port (default 127.0.0.1:15012, istiod's port, spec/istio-ambient.md §3.2) serves
  `CreateCertificate` and the config stream (`StreamAggregatedResources`) and requires a client
  certificate: a node SVID. grpc-core checks the chain against our roots during the handshake; we then
  re-verify the leaf with `identity.verify_peer` (DESIGN.md §6: OpenSSL accepts a CA certificate as a
  client leaf and knows nothing of SPIFFE) and refuse anything but TLS 1.3 (security.md rule 6);
- the enrolment port (default: CA port + 1, 15013) authenticates only the server; the join token in the
  request is the node's credential (`control/tokens.py`).

The server presents `spiffe://<td>/ns/istio-system/sa/istiod` with DNS SANs `istiod.istio-system.svc` and
`localhost` (what nodes check, as ztunnel checks istiod's), signed by the mesh CA at start. The CA key stays
in this process: it is loaded from `--ca-dir` (Istio's plug-in `cacerts` layout) or created once, 0600, in
`<state-dir>/ca` (§3.5), and re-read when its files change (root rotation). `status.json` in the state
directory is what `zerotunnel control status` reads; Prometheus metrics are on loopback 15014.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, json_format  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client import Counter as PromCounter

from zerotunnel.config import Config, ConfigError, load
from zerotunnel.config.yamlload import parse_documents
from zerotunnel.control import castore
from zerotunnel.control.ca_service import CaDenied, CaService, node_identity, node_name_of
from zerotunnel.control.client import loader_input
from zerotunnel.control.files import read_config_paths
from zerotunnel.control.tokens import TokenError, TokenStore
from zerotunnel.control.watch import FileConfigSource
from zerotunnel.errors import InputError
from zerotunnel.identity.bundle import TrustBundle
from zerotunnel.identity.ca import CLOCK_SKEW_GRACE, CaError, CertificateAuthority, IssuedChain
from zerotunnel.identity.csr import generate_key, private_key_pem, signature_hash
from zerotunnel.identity.rotation import refresh_at
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.identity.verify import VerificationError, VerifiedPeer, verify_peer
from zerotunnel.proto import ca_pb2, ca_pb2_grpc, enrol_pb2, enrol_pb2_grpc, snapshot_pb2

log = logging.getLogger("zerotunnel.control")

DEFAULT_LISTEN = "127.0.0.1:15012"
SERVER_DNS_NAME = "istiod.istio-system.svc"
SERVER_CERT_TTL = timedelta(days=365)
NODE_CERT_TTL = timedelta(hours=24)
MAX_MESSAGE_BYTES = 64 * 1024
STATUS_FILE = "status.json"
VERIFIED_CACHE_SIZE = 4096
Clock = Callable[[], datetime]

_CODES = {
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "permission-denied": grpc.StatusCode.PERMISSION_DENIED,
    "invalid-argument": grpc.StatusCode.INVALID_ARGUMENT,
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def split_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` → (host, port); InputError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise InputError(f"address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def enrolment_address(ca_address: str) -> str:
    """The default enrolment address for a CA address: same host, next port."""
    host, port = split_address(ca_address)
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port + 1}"


def load_or_create_ca(
    state_dir: Path, ca_dir: Path | None, trust_domain: str, now: datetime
) -> tuple[CertificateAuthority, Path]:
    """The plug-in CA in `ca_dir`, else the self-signed one in `<state_dir>/ca`, created on first start."""
    if ca_dir is not None:
        return castore.load_ca(ca_dir, now), ca_dir
    own = state_dir / "ca"
    if (own / "ca-cert.pem").exists():
        return castore.load_ca(own, now), own
    log.info("creating a self-signed root CA for %s in %s", trust_domain, own)
    return castore.init_root(own, trust_domain, now), own


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def server_certificate(
    ca: CertificateAuthority, trust_domain: str, hosts: Sequence[str], now: datetime
) -> tuple[bytes, bytes]:
    """(chain PEM, key PEM) for the CA port: an SVID with the DNS/IP names nodes dial us by."""
    key = generate_key("ec-p256")
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(str(SpiffeId.istio(trust_domain, "istio-system", "istiod"))),
        x509.DNSName(SERVER_DNS_NAME),
        x509.DNSName("localhost"),
    ]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if host and host not in ("localhost", SERVER_DNS_NAME):
                names.append(x509.DNSName(host))
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.signing_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW_GRACE)
        .not_valid_after(min(now + SERVER_CERT_TTL, ca.not_after))
        .add_extension(x509.SubjectAlternativeName(names), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # The AKI lets verifiers pick the right issuer when two roots share a name (root rotation).
        .add_extension(_aki(ca.signing_cert), critical=False)
        .sign(ca.signing_key, signature_hash(ca.signing_key))
    )
    chain = leaf.public_bytes(serialization.Encoding.PEM) + b"".join(ca.intermediates_pem)
    return chain, private_key_pem(key)


def _dir_stamp(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and mtimes of a CA directory's files: a cheap "did anything change" check."""
    try:
        files = [p for p in sorted(directory.iterdir()) if p.is_file()]
        return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    except OSError:
        return ()


def fingerprint(pem: bytes) -> str:
    """SHA-256 of the first certificate's DER, as `openssl x509 -fingerprint -sha256` prints it."""
    cert = x509.load_pem_x509_certificate(pem)
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def require_tls13(auth: dict[str, list[bytes]]) -> None:
    """security.md rule 6. grpcio offers no minimum TLS version, so grpc-core would complete a TLS 1.2
    handshake; every call on it is refused instead."""
    version = b"".join(auth.get("ssl_tls_version", []))
    if version != b"TLSv1.3":
        shown = version.decode() or "none"
        raise CaDenied("unauthenticated", f"TLS 1.3 is required, peer negotiated {shown}")


def _csr_names(csr: x509.CertificateSigningRequest) -> list[x509.GeneralName]:
    try:
        return list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _metadata_struct(request: ca_pb2.IstioCertificateRequest) -> dict[str, object]:
    if not request.HasField("metadata"):
        return {}
    out = json_format.MessageToDict(request.metadata)
    return out if isinstance(out, dict) else {}


@dataclass(slots=True)
class _Counters:
    enrolled: Counter[str]
    enrol_refused: Counter[str]
    last_seen: dict[str, str]


class ControlPlane:
    """Loads config and CA, serves the CA and enrolment ports, keeps `status.json` current."""

    def __init__(
        self,
        state_dir: Path,
        config_paths: Sequence[Path],
        *,
        ca_dir: Path | None = None,
        listen: str = DEFAULT_LISTEN,
        enrol_listen: str | None = None,
        metrics_listen: str | None = None,
        clock: Clock = utcnow,
        status_interval: float = 1.0,
    ) -> None:
        self.state_dir = state_dir
        self._source = FileConfigSource(config_paths)
        self._ca_dir = ca_dir
        self._listen = listen
        self._enrol_listen = enrol_listen or enrolment_address(listen)
        self._clock = clock
        self._status_interval = status_interval
        self._metrics_listen = metrics_listen
        self._metrics_server: Any = None
        self.metrics_port = 0
        self.metrics = ControlMetrics()
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._counters = _Counters(Counter(), Counter(), {})
        self._config_error: str | None = None
        self._ca_error: str | None = None
        self._ca_stamp: tuple[tuple[str, int, int], ...] = ()
        self._pending_tls: dict[str, grpc.ServerCertificateConfiguration] = {}
        self._server_refresh_at = clock()
        self._documents: tuple[snapshot_pb2.ConfigDocument, ...] = ()
        self._snapshot_roots = b""
        self._snapshot_config_version = 0
        self._snapshot_common: bytes | None = None
        self._snapshot_built = time.monotonic()
        self.snapshot_version = 0
        self._snapshot_changed = asyncio.Event()
        self.sessions: dict[str, NodeSession] = {}
        self._started = clock()
        self.ca_port = 0
        self.enrol_port = 0
        # A node presents the same SVID on every call: the full path validation is done once per
        # (certificate, CA) and the cached result is used only inside the certificate's validity window.
        self._verified: dict[tuple[bytes, bytes], VerifiedPeer] = {}
        self.tokens = TokenStore(state_dir)
        self._status_error: str | None = None
        self.ca: CertificateAuthority
        self.ca_source: Path
        self.config: Config
        self.service: CaService

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create state directory {self.state_dir}: {exc.strerror}") from None
        try:
            self.config = self._source.load().config
        except ConfigError as exc:
            raise InputError(f"configuration: {exc}") from None
        now = self._clock()
        td = self.config.mesh.trust_domain
        ca_dir = self._ca_dir or (Path(self.config.mesh.ca_dir) if self.config.mesh.ca_dir else None)
        self.ca, self.ca_source = load_or_create_ca(self.state_dir, ca_dir, td, now)
        self.service = CaService(lambda: self.ca, lambda: self.config)
        self._rebuild_snapshot(self._source.current.version if self._source.current else 0)
        self._ca_stamp = _dir_stamp(self.ca_source)
        initial = self._renew_server_certificate(now)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ]
        )
        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _CaServicer(self), server
        )
        enrol_pb2_grpc.add_NodeEnrolmentServicer_to_server(  # type: ignore[no-untyped-call]
            _EnrolServicer(self), server
        )
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_AdsServicer(self), server)
        # Dynamic credentials: grpc asks `_fetch_tls` before every handshake, so a renewed server
        # certificate or a new root bundle (root rotation) applies to the next connection.
        try:
            self.ca_port = server.add_secure_port(
                self._listen,
                grpc.dynamic_ssl_server_credentials(
                    initial["ca"], lambda: self._fetch_tls("ca"), require_client_authentication=True
                ),
            )
            self.enrol_port = server.add_secure_port(
                self._enrol_listen,
                grpc.dynamic_ssl_server_credentials(initial["enrol"], lambda: self._fetch_tls("enrol")),
            )
        except RuntimeError as exc:
            raise InputError(f"cannot listen on {self._listen} / {self._enrol_listen}: {exc}") from None
        if self._metrics_listen is not None:
            self._start_metrics(self._metrics_listen)
        await server.start()
        self._server = server
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._source.watch(self._on_config, self._on_config_error, self._stop)),
            loop.create_task(self._status_loop()),
            loop.create_task(self._maintain_tls()),
        ]
        log.info("control plane serving CA on %s (port %d), enrolment on %s (port %d); root %s",
                 self._listen, self.ca_port, self._enrol_listen, self.enrol_port,
                 fingerprint(self.ca.root_bundle_pem))
        self.write_status()

    # -- CA and server certificate rotation ------------------------------------------------------

    def _renew_server_certificate(self, now: datetime) -> dict[str, grpc.ServerCertificateConfiguration]:
        """A fresh server SVID from the current CA; both ports pick it up at their next handshake."""
        ca_host, _ = split_address(self._listen)
        enrol_host, _ = split_address(self._enrol_listen)
        chain, key = server_certificate(self.ca, self.config.mesh.trust_domain, sorted({ca_host, enrol_host}),
                                        now)
        leaf = x509.load_pem_x509_certificate(chain)
        self._server_refresh_at = refresh_at(leaf.not_valid_before_utc, leaf.not_valid_after_utc)
        configs = {
            "ca": grpc.ssl_server_certificate_configuration([(key, chain)], self.ca.root_bundle_pem),
            "enrol": grpc.ssl_server_certificate_configuration([(key, chain)]),
        }
        self._pending_tls = dict(configs)
        return configs

    def _fetch_tls(self, port: str) -> grpc.ServerCertificateConfiguration | None:
        return self._pending_tls.pop(port, None)

    def reload_ca(self) -> bool:
        """Load the CA directory again if its files changed (root rotation, plug-in CA renewal).

        A directory that does not load keeps the old CA in force and is reported in `status`, like a
        bad config. Returns True when a new CA took over.
        """
        stamp = _dir_stamp(self.ca_source)
        if stamp == self._ca_stamp:
            return False
        self._ca_stamp = stamp
        now = self._clock()
        try:
            fresh = castore.load_ca(self.ca_source, now)
        except InputError as exc:
            self._ca_error = exc.message
            log.error("CA directory %s rejected, keeping the current CA: %s", self.ca_source, exc.message)
            return False
        self._ca_error = None
        self.ca = fresh
        self._renew_server_certificate(now)
        self._rebuild_snapshot(self._snapshot_config_version)
        log.info("CA reloaded from %s: %d root(s), signing cert %s, root bundle sha256 %s", self.ca_source,
                 len(fresh.roots), fresh.signing_cert.subject.rfc4514_string(),
                 fingerprint(fresh.root_bundle_pem))
        return True

    async def _maintain_tls(self) -> None:
        while True:
            await asyncio.sleep(self._status_interval)
            try:
                self.reload_ca()
                if self._clock() >= self._server_refresh_at:
                    self._renew_server_certificate(self._clock())
            except Exception:  # keep serving with what we have; the next round retries
                log.exception("CA/server certificate maintenance failed")

    async def stop(self, grace: float = 1.0) -> None:
        self._stop.set()
        if self._server is not None:
            await self._server.stop(grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._server is not None:
            self.write_status()
            self._server = None
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    def _start_metrics(self, address: str) -> None:
        """Prometheus text on `address` (istiod's monitoring port 15014), loopback only (security.md
        rule 18: nothing administrative off-localhost)."""
        host, port = split_address(address)
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            raise InputError(f"--metrics-listen {address}: metrics are served on loopback addresses only")
        try:
            self._metrics_server, _thread = start_http_server(port, host, registry=self.metrics.registry)
        except OSError as exc:
            raise InputError(f"cannot listen on {address} for metrics: {exc.strerror}") from None
        self.metrics_port = int(self._metrics_server.server_address[1])

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    # -- config -----------------------------------------------------------------------------------

    def _on_config(self, config: Config, version: int) -> None:
        if config.mesh.trust_domain != self.config.mesh.trust_domain:
            msg = (f"trust domain change {self.config.mesh.trust_domain} → {config.mesh.trust_domain} "
                   "needs a restart; keeping the old config")
            log.error("%s", msg)
            self._config_error = msg
            return
        self.config = config
        self._config_error = None
        self._rebuild_snapshot(version)
        self.write_status()

    def _on_config_error(self, exc: InputError) -> None:
        self._config_error = str(exc)
        self.write_status()

    # -- config distribution (docs/control-plane.md) ------------------------------------------------

    def _rebuild_snapshot(self, config_version: int) -> None:
        """Recompute the documents nodes get; bump the snapshot version and wake the streams if they
        changed. Only a configuration that loads is ever pushed: the documents are re-read and loaded
        once more here, so an edit racing the watcher can never slip through unchecked."""
        try:
            documents = _node_documents(read_config_paths(self._source.paths))
            load(loader_input([(d.name, d.json) for d in documents]))
        except (InputError, ConfigError) as exc:
            log.warning("snapshot not rebuilt (config changed while reading it): %s", exc)
            return
        roots = self.ca.root_bundle_pem
        if documents == self._documents and roots == self._snapshot_roots:
            return
        self._documents, self._snapshot_roots = documents, roots
        self._snapshot_config_version = config_version
        self._snapshot_common = None
        self.snapshot_version += 1
        self._snapshot_built = time.monotonic()
        changed, self._snapshot_changed = self._snapshot_changed, asyncio.Event()
        changed.set()
        log.info("snapshot version %d (config version %d, %d documents, %d root(s))",
                 self.snapshot_version, config_version, len(documents), len(self.ca.roots))

    def snapshot_for(self, node: str) -> snapshot_pb2.NodeSnapshot:
        snapshot = snapshot_pb2.NodeSnapshot()
        snapshot.ParseFromString(self.snapshot_any(node).value)
        return snapshot

    def snapshot_any(self, node: str) -> any_pb2.Any:
        """The node's snapshot, packed. Only `node` differs between nodes, so the rest is serialized
        once per version and appended (concatenated protobuf messages merge into one)."""
        if self._snapshot_common is None:
            self._snapshot_common = snapshot_pb2.NodeSnapshot(
                documents=self._documents, trust_domain=self.config.mesh.trust_domain,
                roots_pem=self._snapshot_roots.decode(), config_version=self._snapshot_config_version,
            ).SerializeToString()
        value = snapshot_pb2.NodeSnapshot(node=node).SerializeToString() + self._snapshot_common
        return any_pb2.Any(type_url=SNAPSHOT_TYPE, value=value)

    def _node_status(self, node: str) -> dict[str, Any]:
        out: dict[str, Any] = {"name": node, "last_seen": self._counters.last_seen.get(node)}
        session = self.sessions.get(node)
        if session is not None:
            out.update({"streams": session.streams, "sent": session.sent, "acked": session.acked,
                        "nacked": session.nacked, "nack_error": session.nack_error})
        return out

    # -- authentication ---------------------------------------------------------------------------

    def caller_identity(self, context: grpc.aio.ServicerContext[Any, Any]) -> SpiffeId:
        """The verified node identity of a CA-port caller; CaDenied("unauthenticated") otherwise."""
        auth = context.auth_context()
        require_tls13(auth)
        pems = auth.get("x509_pem_cert")
        if not pems:
            raise CaDenied("unauthenticated", "no client certificate (use the node SVID from enrolment)")
        now = self._clock()
        key = (pems[0], self.ca.root_bundle_pem)
        cached = self._verified.get(key)
        if cached is not None and cached.leaf.not_valid_before_utc <= now <= cached.not_after:
            return cached.spiffe_id
        chain = auth.get("x509_pem_cert_chain") or []
        extra = [c for blob in chain for c in x509.load_pem_x509_certificates(blob)][1:]
        bundle = TrustBundle.from_certs(self.config.mesh.trust_domain, self.ca.roots)
        try:
            peer = verify_peer(
                pems[0], [*extra, *(x509.load_pem_x509_certificate(p) for p in self.ca.intermediates_pem)],
                bundle, now, peer_role="client",
            )
        except VerificationError as exc:
            raise CaDenied("unauthenticated", f"client certificate rejected: {exc.message}") from None
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.pop(next(iter(self._verified)))
        self._verified[key] = peer
        return peer.spiffe_id

    # -- status -----------------------------------------------------------------------------------

    def note_seen(self, node: str) -> None:
        self._counters.last_seen[node] = self._clock().isoformat()

    def status(self) -> dict[str, Any]:
        stats = self.service.stats()
        records = self.tokens.records()
        enrolled = sorted({r.node for r in records if r.used_at is not None} | set(self._counters.enrolled))
        loaded = self._source.current
        return {
            "updated": self._clock().isoformat(),
            "started": self._started.isoformat(),
            "listen": {"ca": f"{self._listen}", "ca_port": self.ca_port,
                       "enrolment": self._enrol_listen, "enrolment_port": self.enrol_port,
                       "metrics_port": self.metrics_port or None},
            "trust_domain": self.config.mesh.trust_domain,
            "ca": {"source": str(self.ca_source), "root_sha256": fingerprint(self.ca.root_bundle_pem),
                   "roots": len(self.ca.roots),
                   "roots_sha256": [r.fingerprint(hashes.SHA256()).hex(":").upper() for r in self.ca.roots],
                   "not_after": self.ca.not_after.isoformat(),
                   "error": self._ca_error},
            "config": {"version": loaded.version if loaded else None, "error": self._config_error},
            "certificates": {"issued": stats.issued, "refused": dict(stats.refused),
                             "issued_per_node": dict(stats.per_node)},
            "enrolment": {"accepted": sum(self._counters.enrolled.values()),
                          "refused": dict(self._counters.enrol_refused),
                          "tokens_pending": sum(1 for r in records
                                                if r.used_at is None and r.expires > self._clock())},
            "snapshot": {"version": self.snapshot_version, "documents": len(self._documents)},
            "nodes": [self._node_status(n) for n in sorted(set(enrolled) | set(self.sessions))],
        }

    def write_status(self) -> bool:
        """Write `status.json`; False when the state directory refused it (disk full, read-only).

        Issuance needs no disk, so a full state directory must not stop the CA or the config watch
        (issue 9, faults): the failure is logged once, when it starts, and once when writes work again.
        """
        body = json.dumps(self.status(), indent=1).encode()
        try:
            castore.write_files({self.state_dir / STATUS_FILE: (body, 0o600)})
        except (InputError, OSError) as exc:
            if self._status_error is None:
                log.error("status not written, serving on (state directory: %s)", exc)
            self._status_error = str(exc)
            return False
        if self._status_error is not None:
            log.warning("status written again after: %s", self._status_error)
            self._status_error = None
        return True

    async def _status_loop(self) -> None:
        last = ""
        while True:
            await asyncio.sleep(self._status_interval)
            snapshot = json.dumps({k: v for k, v in self.status().items() if k != "updated"})
            if snapshot != last and self.write_status():
                last = snapshot

    # -- enrolment --------------------------------------------------------------------------------

    def enrol(self, token: str, csr_pem: bytes, validity_seconds: int, peer: str) -> tuple[str, IssuedChain]:
        """Check the CSR, spend the token, sign the node SVID. The CSR is checked first so a typo in
        it does not burn the token; the token is spent before signing so it cannot be replayed."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            self._counters.enrol_refused["bad-csr"] += 1
            raise CaDenied("invalid-argument", "CSR is not a PEM certificate request") from None
        if not csr.is_signature_valid:
            self._counters.enrol_refused["bad-csr"] += 1
            raise CaDenied("invalid-argument", "CSR signature does not verify")
        if _csr_names(csr):
            self._counters.enrol_refused["bad-csr"] += 1
            raise CaDenied("invalid-argument", "an enrolment CSR must name nothing: the token names the node")
        now = self._clock()
        try:
            node = self.tokens.consume(token, now)
        except TokenError as exc:
            self._counters.enrol_refused[exc.reason] += 1
            self.metrics.enrolments.labels(f"refused-{exc.reason}").inc()
            log.warning("enrolment refused from %s: %s", peer, exc.message)
            raise CaDenied("unauthenticated", exc.message) from None
        identity = node_identity(self.config.mesh.trust_domain, node)
        ttl = NODE_CERT_TTL if validity_seconds <= 0 else min(timedelta(seconds=validity_seconds),
                                                              NODE_CERT_TTL)
        try:
            chain = self.ca.issue(csr_pem, identity, now, ttl)
        except CaError as exc:
            self._counters.enrol_refused["bad-csr"] += 1
            raise CaDenied("invalid-argument", exc.message) from None
        self._counters.enrolled[node] += 1
        self.metrics.enrolments.labels("accepted").inc()
        self.note_seen(node)
        log.info("node %s enrolled from %s as %s", node, peer, identity)
        self.write_status()
        return node, chain


class _CaServicer(ca_pb2_grpc.IstioCertificateServiceServicer):
    def __init__(self, plane: ControlPlane) -> None:
        self._plane = plane

    async def CreateCertificate(
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> ca_pb2.IstioCertificateResponse:
        plane = self._plane
        caller: SpiffeId | None = None
        plane.metrics.csr.inc()
        try:
            caller = plane.caller_identity(context)
            chain = plane.service.create_certificate(
                caller, request.csr.encode(), int(request.validity_duration), _metadata_struct(request),
                now=plane._clock(), peer=context.peer(),
            )
        except CaDenied as exc:
            if caller is None:
                plane.service.record_refusal(exc.code)
                log.warning("CSR refused (%s) peer=%s: %s", exc.code, context.peer(), exc.message)
            plane.metrics.refused.labels(exc.code).inc()
            if exc.code == "unauthenticated":
                plane.metrics.auth_failure.inc()
            await context.abort(_CODES[exc.code], exc.message)
            raise  # unreachable: abort raises
        plane.metrics.issued.inc()
        node = caller.path.rsplit("/", 1)[-1]
        plane.note_seen(node)
        return ca_pb2.IstioCertificateResponse(cert_chain=chain.as_cert_chain_response())


class _EnrolServicer(enrol_pb2_grpc.NodeEnrolmentServicer):
    def __init__(self, plane: ControlPlane) -> None:
        self._plane = plane

    async def Enrol(
        self, request: enrol_pb2.EnrolRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> enrol_pb2.EnrolResponse:
        plane = self._plane
        try:
            require_tls13(context.auth_context())
            node, chain = plane.enrol(
                request.token, request.csr.encode(), int(request.validity_duration), context.peer()
            )
        except CaDenied as exc:
            await context.abort(_CODES[exc.code], exc.message)
            raise
        return enrol_pb2.EnrolResponse(
            cert_chain=chain.as_cert_chain_response(),
            node_name=node,
            spiffe_id=str(node_identity(plane.config.mesh.trust_domain, node)),
        )


SNAPSHOT_TYPE = "type.googleapis.com/zerotunnel.control.v1.NodeSnapshot"


@dataclass(slots=True)
class NodeSession:
    """What the control plane knows of one node's config stream(s), for `status`."""

    streams: int = 0
    sent: int | None = None
    acked: int | None = None
    nacked: int | None = None
    nack_error: str | None = None


def _node_documents(files: Sequence[tuple[str, str]]) -> tuple[snapshot_pb2.ConfigDocument, ...]:
    """Every document of every file as JSON, except Secrets: they hold gateway keys, which no node
    needs (security.md §1e). InputError when a file does not parse."""
    out = []
    for name, text in files:
        docs, failure = parse_documents(name, text)
        if failure is not None:
            raise InputError(f"{name}: document {failure.index}: {failure.message}")
        for doc in docs:
            data = _without_secrets(doc.data)
            if data is None:
                continue
            out.append(snapshot_pb2.ConfigDocument(
                name=f"{name}#{doc.index}", json=json.dumps(data, default=str, sort_keys=True)
            ))
    return tuple(out)


def _without_secrets(data: Any) -> Any:
    """The document minus Secrets, also inside `kind: List` items (`kubectl get -o yaml` output);
    None when nothing is left."""
    if not isinstance(data, dict):
        return data
    if data.get("kind") == "Secret":
        return None
    if data.get("kind") == "List" and isinstance(data.get("items"), list):
        items = [kept for item in data["items"] if (kept := _without_secrets(item)) is not None]
        return {**data, "items": items}
    return data


class _AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """StreamAggregatedResources, State of the World, one resource type: the node's snapshot."""

    def __init__(self, plane: ControlPlane) -> None:
        self._plane = plane

    async def StreamAggregatedResources(
        self, request_iterator: object, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        plane = self._plane
        try:
            caller = plane.caller_identity(context)
        except CaDenied as exc:
            await context.abort(_CODES[exc.code], exc.message)
            raise
        node = node_name_of(caller)
        if node is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{caller} is not a node proxy")
            raise AssertionError("unreachable")
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        if first.type_url != SNAPSHOT_TYPE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown type_url {first.type_url!r}")
        session = plane.sessions.setdefault(node, NodeSession())
        session.streams += 1
        plane.metrics.connected.inc()
        plane.note_seen(node)
        log.info("node %s opened its config stream", node)
        nonces: dict[str, int] = {}

        async def reader() -> None:
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    return
                version = nonces.pop(request.response_nonce, None)
                if version is None:
                    continue  # a stale or unknown nonce: xDS says ignore it
                if request.HasField("error_detail"):
                    session.nacked, session.nack_error = version, request.error_detail.message
                    plane.metrics.rejects.inc()
                    log.warning("node %s NACKed snapshot version %d: %s", node, version,
                                request.error_detail.message)
                else:
                    session.acked = version
                    log.info("node %s ACKed snapshot version %d", node, version)

        reading = asyncio.get_running_loop().create_task(reader())
        last_sent: int | None = None
        try:
            while True:
                version, changed = plane.snapshot_version, plane._snapshot_changed
                # full state on (re)connect, then on every change; never an empty version-0 snapshot
                if version and last_sent != version:
                    nonce = secrets.token_hex(8)
                    resource = plane.snapshot_any(node)
                    nonces[nonce] = version
                    while len(nonces) > 16:
                        nonces.pop(next(iter(nonces)))
                    reconnect = last_sent is None
                    last_sent = session.sent = version
                    await context.write(discovery_pb2.DiscoveryResponse(
                        version_info=str(version), resources=[resource], type_url=SNAPSHOT_TYPE, nonce=nonce
                    ))
                    plane.metrics.pushes.labels("full" if reconnect else "change").inc()
                    if not reconnect:
                        plane.metrics.push_time.observe(time.monotonic() - plane._snapshot_built)
                waiter = asyncio.ensure_future(changed.wait())
                done, _ = await asyncio.wait({reading, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if reading in done:
                    break
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            session.streams -= 1
            plane.metrics.connected.dec()
            log.info("node %s closed its config stream", node)


class ControlMetrics:
    """istiod's metric names where one exists (citadel_*, pilot_*), in a registry of our own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.csr = PromCounter("citadel_server_csr", "CSRs received by the CA", registry=r)
        self.issued = PromCounter(
            "citadel_server_success_cert_issuance", "Certificates issued", registry=r
        )
        self.auth_failure = PromCounter(
            "citadel_server_authentication_failure", "CSRs without a valid node identity", registry=r
        )
        self.refused = PromCounter(
            "zerotunnel_ca_csr_refused", "CSRs refused, by reason", ["reason"], registry=r
        )
        self.enrolments = PromCounter(
            "zerotunnel_enrolments", "Node enrolment attempts, by result", ["result"], registry=r
        )
        self.connected = Gauge("pilot_xds", "Connected node config streams", registry=r)
        self.pushes = PromCounter(
            "pilot_xds_pushes", "Snapshots pushed (full on connect, change afterwards)", ["type"], registry=r
        )
        self.push_time = Histogram(
            "pilot_xds_push_time", "Seconds from a new snapshot to its push to a node", registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.rejects = PromCounter("pilot_total_xds_rejects", "Snapshots NACKed by nodes", registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
