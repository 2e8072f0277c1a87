"""The node side of the control plane API: enrolment, the node identity on disk, and `GrpcCaClient`.

Enrolment (DESIGN.md §3): the node generates a key, sends a CSR with its join token to the enrolment
port, and gets its node SVID (`spiffe://<td>/zerotunnel/node/<NAME>`). The server is authenticated
against a root the operator hands over out of band (`--ca-root FILE`, the control plane's
`<state-dir>/ca/root-cert.pem`); there is deliberately no trust-on-first-use, because the join token
would be sent to whoever answered first.

The identity is kept in `<state-dir>/node/` (`node-key.pem` 0600, `node-cert.pem`, `root-cert.pem`,
`node.json`), written atomically (security.md §1e), so a restarted node reuses it instead of needing a new
token; it is renewed over mTLS at half-life (§3.4), like every other certificate.

`GrpcCaClient` implements `node.certs.CaClient`: it asks `CreateCertificate` with metadata
`ImpersonatedIdentity` (spec/istio-ambient.md §3.2) and checks that the leaf it gets back names exactly the
identity it asked for (ztunnel does the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2  # type: ignore[import-untyped]
from google.rpc import status_pb2

from zerotunnel.config import Config, load
from zerotunnel.control.castore import write_files
from zerotunnel.errors import InputError, ZerotunnelError
from zerotunnel.identity.ca import IssuedChain
from zerotunnel.identity.csr import generate_key, make_csr, private_key_pem, signature_hash
from zerotunnel.identity.rotation import needs_refresh, refresh_at
from zerotunnel.identity.spiffe import SpiffeId
from zerotunnel.identity.verify import VerificationError, svid_identity
from zerotunnel.proto import ca_pb2, ca_pb2_grpc, enrol_pb2, enrol_pb2_grpc, snapshot_pb2

log = logging.getLogger("zerotunnel.control.client")

SERVER_NAME = "istiod.istio-system.svc"
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
NODE_DIR = "node"
CHANNEL_CLOSE_GRACE = 5.0
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


class ControlPlaneError(ZerotunnelError):
    """The control plane refused or could not be reached; `code` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.detail = message


def _enrolment_address(ca_address: str) -> str:
    host, sep, port = ca_address.rpartition(":")
    if not sep or not port.isdigit():
        raise InputError(f"control plane address {ca_address!r}: expected HOST:PORT")
    return f"{host}:{int(port) + 1}"


RECONNECT_BACKOFF_MS = (500, 5000)
"""gRPC's own reconnect backoff (initial, max). Its default grows to 120 s, and while a channel waits
it fails every call at once with the cached "failed to connect" error: after a long control-plane
outage nodes kept failing for ~40 s after the control plane was back (security.md §4 item 25). Capped
below the config stream's 15 s so that ztunnel's xDS bound is what decides the resync time."""


def _channel_options(server_name: str) -> list[tuple[str, object]]:
    initial, most = RECONNECT_BACKOFF_MS
    return [
        ("grpc.ssl_target_name_override", server_name),
        ("grpc.default_authority", server_name),
        ("grpc.initial_reconnect_backoff_ms", initial),
        ("grpc.min_reconnect_backoff_ms", initial),
        ("grpc.max_reconnect_backoff_ms", most),
    ]


def _rpc_error(exc: grpc.aio.AioRpcError) -> ControlPlaneError:
    return ControlPlaneError(exc.code().name, exc.details() or "")


def _issuer_key(cert_pem: bytes) -> bytes:
    """The key that signed the first certificate in `cert_pem` (AKI; the issuer name when absent)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return cert.issuer.public_bytes()
    return aki.key_identifier or cert.issuer.public_bytes()


def chain_from_response(cert_chain: list[str], expected: SpiffeId) -> IssuedChain:
    """IstioCertificateResponse.cert_chain (§3.2) → IssuedChain, checking the leaf names `expected`."""
    if len(cert_chain) < 2:
        raise ControlPlaneError("INTERNAL", f"cert_chain has {len(cert_chain)} elements, need leaf and roots")
    leaf_pem = cert_chain[0].encode()
    try:
        got = svid_identity(x509.load_pem_x509_certificate(leaf_pem))
    except (ValueError, VerificationError) as exc:
        raise ControlPlaneError("INTERNAL", f"control plane returned an unusable leaf: {exc}") from None
    if got != expected:
        raise ControlPlaneError(
            "INTERNAL", f"control plane returned a certificate for {got}, asked for {expected}"
        )
    return IssuedChain(leaf_pem, tuple(p.encode() for p in cert_chain[1:-1]), cert_chain[-1].encode())


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """A node's SVID, its key and the roots it trusts the control plane with."""

    node: str
    identity: SpiffeId
    chain_pem: bytes
    key_pem: bytes
    roots_pem: bytes

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificates(self.chain_pem)[0]

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    def needs_refresh(self, now: datetime) -> bool:
        leaf = self.leaf
        return needs_refresh(now, leaf.not_valid_before_utc, leaf.not_valid_after_utc)

    def refresh_at(self) -> datetime:
        leaf = self.leaf
        return refresh_at(leaf.not_valid_before_utc, leaf.not_valid_after_utc)

    def __repr__(self) -> str:
        return f"NodeIdentity({self.identity}, not_after={self.not_after.isoformat()})"


def save_node_identity(state_dir: Path, ident: NodeIdentity) -> None:
    directory = state_dir / NODE_DIR
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    meta = json.dumps({"node": ident.node, "spiffe_id": str(ident.identity)}).encode()
    write_files({
        directory / "node-key.pem": (ident.key_pem, 0o600),
        directory / "node-cert.pem": (ident.chain_pem, 0o644),
        directory / "root-cert.pem": (ident.roots_pem, 0o644),
        directory / "node.json": (meta, 0o644),
    })


def load_node_identity(state_dir: Path) -> NodeIdentity | None:
    """The persisted identity, or None when this node never enrolled."""
    directory = state_dir / NODE_DIR
    if not (directory / "node.json").exists():
        return None
    try:
        meta = json.loads((directory / "node.json").read_text())
        return NodeIdentity(
            node=str(meta["node"]),
            identity=SpiffeId.parse(str(meta["spiffe_id"])),
            chain_pem=(directory / "node-cert.pem").read_bytes(),
            key_pem=(directory / "node-key.pem").read_bytes(),
            roots_pem=(directory / "root-cert.pem").read_bytes(),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{directory}: unreadable node identity ({exc})") from None


async def enroll(
    control: str,
    token: str,
    state_dir: Path,
    ca_root_pem: bytes,
    *,
    enrol_address: str | None = None,
    server_name: str = SERVER_NAME,
    timeout: float = 10.0,
) -> NodeIdentity:
    """Trade `token` for a node SVID at the control plane `control` (CA address; enrolment is port+1
    unless `enrol_address` says otherwise); persist and return it."""
    key = generate_key("ec-p256")
    # No SAN: the node does not name itself; the control plane names it after the token's node.
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, signature_hash(key))
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    creds = grpc.ssl_channel_credentials(root_certificates=ca_root_pem)
    address = enrol_address or _enrolment_address(control)
    async with grpc.aio.secure_channel(address, creds, options=_channel_options(server_name)) as channel:
        stub = enrol_pb2_grpc.NodeEnrolmentStub(channel)  # type: ignore[no-untyped-call]
        try:
            resp = await stub.Enrol(enrol_pb2.EnrolRequest(token=token, csr=csr), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc) from None
    identity = SpiffeId.parse(resp.spiffe_id)
    chain = chain_from_response(list(resp.cert_chain), identity)
    ident = NodeIdentity(resp.node_name, identity, chain.chain_pem, private_key_pem(key), chain.roots_pem)
    save_node_identity(state_dir, ident)
    log.info("enrolled as %s (valid until %s)", identity, ident.not_after.isoformat())
    return ident


async def ensure_node_identity(
    control: str, state_dir: Path, *, token: str | None, ca_root_pem: bytes | None, clock: Clock = utcnow
) -> NodeIdentity:
    """Reuse the persisted identity when it is still valid; otherwise enrol with `token`."""
    ident = load_node_identity(state_dir)
    if ident is not None and clock() < ident.not_after:
        return ident
    if token is None or ca_root_pem is None:
        why = "has expired" if ident is not None else "does not exist"
        raise InputError(
            f"node identity in {state_dir / NODE_DIR} {why}; enrol with --join-token TOKEN --ca-root FILE"
        )
    return await enroll(control, token, state_dir, ca_root_pem)


class GrpcCaClient:
    """`node.certs.CaClient` over the control plane's CA port, authenticated with the node SVID."""

    def __init__(
        self,
        control: str,
        state_dir: Path,
        *,
        server_name: str = SERVER_NAME,
        clock: Clock = utcnow,
        timeout: float = 10.0,
    ) -> None:
        ident = load_node_identity(state_dir)
        if ident is None:
            raise InputError(f"no node identity in {state_dir / NODE_DIR}; enrol first")
        self.identity = ident
        self._address = control
        self._state_dir = state_dir
        self._server_name = server_name
        self._clock = clock
        self._timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: ca_pb2_grpc.IstioCertificateServiceStub | None = None
        self._refresh_lock: asyncio.Lock | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def channel(self) -> grpc.aio.Channel:
        """The mTLS channel to the control plane (replaced when the node identity is renewed)."""
        self._connect()
        assert self._channel is not None
        return self._channel

    def _connect(self) -> ca_pb2_grpc.IstioCertificateServiceStub:
        if self._stub is None:
            ident = self.identity
            creds = grpc.ssl_channel_credentials(ident.roots_pem, ident.key_pem, ident.chain_pem)
            self._channel = grpc.aio.secure_channel(
                self._address, creds, options=_channel_options(self._server_name)
            )
            self._stub = ca_pb2_grpc.IstioCertificateServiceStub(self._channel)  # type: ignore[no-untyped-call]
        return self._stub

    async def _create(self, csr_pem: bytes, ttl: timedelta | None, impersonate: SpiffeId | None) -> list[str]:
        request = ca_pb2.IstioCertificateRequest(
            csr=csr_pem.decode(), validity_duration=int(ttl.total_seconds()) if ttl else 0
        )
        if impersonate is not None:
            metadata = struct_pb2.Struct()
            metadata.update({IMPERSONATED_IDENTITY: str(impersonate)})
            request.metadata.CopyFrom(metadata)
        try:
            resp = await self._connect().CreateCertificate(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc) from None
        return list(resp.cert_chain)

    async def sign(self, identity: SpiffeId, csr_pem: bytes, ttl: timedelta | None) -> IssuedChain:
        """CreateCertificate for a pod identity on this node (the control plane checks that it is)."""
        if self.identity.needs_refresh(self._clock()):
            await self.refresh_node_identity(only_if_due=True)
        chain = chain_from_response(await self._create(csr_pem, ttl, identity), identity)
        await self.adopt_roots(chain.roots_pem)
        if _issuer_key(chain.leaf_pem) != _issuer_key(self.identity.chain_pem):
            # The CA changed (root rotation step 2): follow it before step 3 retires the root that
            # signed our node SVID, or the control plane would stop recognising this node.
            await self.refresh_node_identity()
        return chain

    async def adopt_roots(self, roots_pem: bytes) -> None:
        """Trust the control plane's current root bundle for the next connections to it.

        The bundle arrived over the mTLS channel from the control plane itself, so it is as trustworthy
        as the one in a renewed node SVID; taking it at once means a root rotation's new root is trusted
        before the control plane's own certificate moves to it (security.md rule 16).
        """
        if not roots_pem or roots_pem == self.identity.roots_pem:
            return
        current = self.identity
        self.identity = NodeIdentity(current.node, current.identity, current.chain_pem, current.key_pem,
                                     roots_pem)
        save_node_identity(self._state_dir, self.identity)
        self._reset_channel()
        log.info("control plane root bundle updated (%d root(s))", roots_pem.count(b"BEGIN CERTIFICATE"))

    async def refresh_node_identity(self, *, only_if_due: bool = False) -> NodeIdentity:
        """Renew the node SVID over mTLS with the current one (no impersonation: SAN := caller).

        With `only_if_due`, callers that queued behind a renewal in progress do not renew again.
        """
        if self._refresh_lock is None:
            self._refresh_lock = asyncio.Lock()
        async with self._refresh_lock:
            current = self.identity
            if only_if_due and not current.needs_refresh(self._clock()):
                return current
            key = generate_key("ec-p256")
            chain = chain_from_response(
                await self._create(make_csr(current.identity, key), None, None), current.identity
            )
            fresh = NodeIdentity(current.node, current.identity, chain.chain_pem, private_key_pem(key),
                                 chain.roots_pem)
            save_node_identity(self._state_dir, fresh)
            self.identity = fresh
            self._reset_channel()
            log.info("node identity %s renewed until %s", fresh.identity, fresh.not_after.isoformat())
            return fresh

    async def maintain(self, stop: asyncio.Event, recheck: float = 5.0) -> None:
        """Renew the node SVID at half-life until `stop`; on failure retry every `recheck` seconds while
        the current SVID lasts (the node keeps working on cached certificates meanwhile)."""
        while not stop.is_set():
            wait = (self.identity.refresh_at() - self._clock()).total_seconds()
            if wait <= 0:
                try:
                    await self.refresh_node_identity()
                    continue
                except ControlPlaneError as exc:
                    log.warning("node identity renewal failed: %s", exc.message)
                wait = recheck
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(wait, recheck))

    def _reset_channel(self) -> None:
        """New calls get a new channel (new credentials); calls in flight on the old one may finish."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            task = asyncio.get_running_loop().create_task(channel.close(grace=CHANNEL_CLOSE_GRACE))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close(grace=0.2)
        await asyncio.gather(*self._closing, return_exceptions=True)


SNAPSHOT_TYPE = "type.googleapis.com/zerotunnel.control.v1.NodeSnapshot"
MAX_STREAM_BACKOFF = 15.0
"""security.md §4 item 24: after an outage nodes resync within ztunnel's xDS max backoff, 15 s."""
_INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A node's configuration as the control plane pushed it, already loaded (docs/control-plane.md)."""

    version: str
    node: str
    config_version: int
    documents: tuple[tuple[str, str], ...]
    trust_domain: str
    roots_pem: bytes
    config: Config

    def __repr__(self) -> str:
        return f"Snapshot(version={self.version}, node={self.node}, documents={len(self.documents)})"


def loader_input(documents: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """(name, JSON) pairs as `config.load` takes them: the `.json` suffix selects its JSON parser, about
    3x faster than parsing each document as a YAML stream (the text is the same either way)."""
    return [(f"{name}.json", text) for name, text in documents]


def decode_snapshot(response: discovery_pb2.DiscoveryResponse) -> Snapshot:
    """The snapshot in a DiscoveryResponse, loaded with the same loader as files; InputError/ConfigError
    (→ NACK) when it is not one we can use."""
    if response.type_url != SNAPSHOT_TYPE or len(response.resources) != 1:
        raise InputError(f"expected one {SNAPSHOT_TYPE} resource, got {len(response.resources)} "
                         f"of {response.type_url}")
    message = snapshot_pb2.NodeSnapshot()
    if not response.resources[0].Unpack(message):
        raise InputError(f"resource is a {response.resources[0].type_url}, not a NodeSnapshot")
    documents = tuple((d.name, d.json) for d in message.documents)
    config = load(loader_input(documents))
    if config.mesh.trust_domain != message.trust_domain:
        raise InputError(f"snapshot trust domain {message.trust_domain} does not match its MeshConfig "
                         f"({config.mesh.trust_domain})")
    return Snapshot(response.version_info, message.node, message.config_version, documents,
                    message.trust_domain, message.roots_pem.encode(), config)


class ConfigSubscription:
    """Keeps the node's config stream open: applies each snapshot, ACKs it, or NACKs it and keeps the
    last good one; reconnects with jittered exponential backoff when the control plane is away."""

    def __init__(
        self,
        client: GrpcCaClient,
        apply: Callable[[Snapshot], Awaitable[None] | None],
        *,
        rand: Callable[[], float] = random.random,
        initial_backoff: float = 0.5,
    ) -> None:
        self._client = client
        self._apply = apply
        self._rand = rand
        self._initial_backoff = initial_backoff
        self.current: Snapshot | None = None
        self.last_error: str | None = None
        self.connected = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set():
            try:
                if await self._stream(stop):
                    attempt = 0
            except grpc.aio.AioRpcError as exc:
                self.last_error = f"{exc.code().name}: {exc.details()}"
                log.warning("config stream: %s", self.last_error)
            finally:
                self.connected.clear()
            if stop.is_set():
                return
            delay = self._initial_backoff * 2 ** min(attempt, 16) * (0.5 + self._rand())
            delay = min(MAX_STREAM_BACKOFF, delay)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def _stream(self, stop: asyncio.Event) -> bool:
        """One stream until it ends or `stop`; True when at least one snapshot arrived on it."""
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._client.channel())
        call = stub.StreamAggregatedResources()
        got_one = False
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await call.write(discovery_pb2.DiscoveryRequest(
                type_url=SNAPSHOT_TYPE, node=base_pb2.Node(id=self._client.identity.node)
            ))
            while True:
                reading = asyncio.ensure_future(call.read())
                await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    reading.cancel()
                    return got_one
                response = reading.result()
                if response is grpc.aio.EOF:
                    return got_one
                got_one = True
                self.connected.set()
                await call.write(await self._handle(response))
        finally:
            stopping.cancel()
            call.cancel()

    async def _handle(self, response: discovery_pb2.DiscoveryResponse) -> discovery_pb2.DiscoveryRequest:
        accepted = self.current.version if self.current else ""
        try:
            snapshot = decode_snapshot(response)
            if snapshot.node != self._client.identity.node:
                raise InputError(f"snapshot is for node {snapshot.node}, not {self._client.identity.node}")
            result = self._apply(snapshot)
            if result is not None:
                await result
        except Exception as exc:  # any failure to take the snapshot is a NACK; the last good one stays
            message = getattr(exc, "message", None) or str(exc)
            self.last_error = f"snapshot version {response.version_info} rejected: {message}"
            log.error("%s; keeping version %s", self.last_error, accepted or "none")
            return discovery_pb2.DiscoveryRequest(
                version_info=accepted, type_url=SNAPSHOT_TYPE, response_nonce=response.nonce,
                error_detail=status_pb2.Status(code=_INVALID_ARGUMENT, message=message),
            )
        self.current, self.last_error = snapshot, None
        await self._client.adopt_roots(snapshot.roots_pem)
        log.info("snapshot version %s applied (%d documents)", snapshot.version, len(snapshot.documents))
        return discovery_pb2.DiscoveryRequest(
            version_info=snapshot.version, type_url=SNAPSHOT_TYPE, response_nonce=response.nonce
        )
