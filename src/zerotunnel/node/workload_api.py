"""The SPIFFE Workload API on a per-pod Unix socket (spec/users-spiffe-conventions.md §3.1-§3.2).

One `WorkloadApiServer` per pod, on the path the pod finds in `SPIFFE_ENDPOINT_SOCKET`. The socket *is*
the attestation: it lives where only that pod can reach it, so everything it serves is that pod's own
identity and nothing else (issue 6: "the socket identifies the pod"). The certificates come from the
node's `CertificateManager` (fetched from the control plane with `ImpersonatedIdentity`), so a pod's
SVID is the very one its node proxy presents for it over HBONE.

Semantics from §3.1/§3.2:
- every call must carry metadata `workload.spiffe.io: true`, else `InvalidArgument` (clients do not retry);
- no identity yet → `PermissionDenied` (clients retry with backoff);
- streams send the full state at once and again on every rotation (`CertificateManager.on_update`);
- keys are PKCS#8 DER, chains and bundles concatenated DER; bundle map keys are `spiffe://<td>`.

The same socket serves Envoy SDS (`envoy.service.secret.v3.SecretDiscoveryService`, a separate service
as §3.1 asks for extensions) with Istio's resource names: `default` (the pod's certificate chain and key)
and `ROOTCA` (the trust bundle), pushed again on every rotation.

JWT-SVIDs are signed by a per-node ES256 key held in memory (`JwtAuthority`), published as a JWK set by
`FetchJWTBundles`; a token is therefore verifiable by workloads on the same node (their bundle carries
this node's key) — mesh-wide JWT bundles need the control plane's config push (issue 6, part two).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2  # type: ignore[import-untyped]

from zerotunnel.identity.spiffe import SpiffeId, SpiffeIdError
from zerotunnel.node.certs import CertificateError, CertificateManager
from zerotunnel.node.tls import WorkloadCredentials
from zerotunnel.proto import workload_pb2, workload_pb2_grpc

log = logging.getLogger("zerotunnel.workload_api")

HEADER_KEY = "workload.spiffe.io"
HEADER_VALUE = "true"
FIRST_SVID_WAIT = 5.0
"""How long a first fetch waits for the pod's certificate before answering PermissionDenied."""
JWT_TTL_SECONDS = 300
"""JWT-SVID lifetime (SPIRE's default, users-spiffe-conventions.md §4); short because it is a bearer token."""
JWT_ALG = "ES256"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class JwtAuthority:
    """A node's JWT-SVID signing key (ES256, in memory only) and its JWK set."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        numbers = self._key.public_key().public_numbers()
        self._jwk = {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64url(numbers.x.to_bytes(32, "big")),
            "y": _b64url(numbers.y.to_bytes(32, "big")),
        }
        canonical = json.dumps(self._jwk, sort_keys=True, separators=(",", ":")).encode()
        self.kid = _b64url(hashlib.sha256(canonical).digest())  # RFC 7638 thumbprint

    def jwks(self) -> bytes:
        return json.dumps({"keys": [{**self._jwk, "kid": self.kid, "use": "jwt-svid"}]}).encode()

    def mint(self, identity: SpiffeId, audience: list[str], now: float) -> str:
        claims = {"sub": str(identity), "aud": audience, "iat": int(now), "exp": int(now) + JWT_TTL_SECONDS}
        return jwt.encode(claims, self._key, algorithm=JWT_ALG, headers={"kid": self.kid, "typ": "JWT"})

    def validate(self, token: str, audience: str) -> dict[str, Any]:
        """The claims of a token this node signed for `audience`; jwt.PyJWTError otherwise."""
        header = jwt.get_unverified_header(token)
        if header.get("kid") != self.kid:
            raise jwt.InvalidTokenError("token was not signed by a key in this trust bundle")
        claims: dict[str, Any] = jwt.decode(
            token, self._key.public_key(), algorithms=[JWT_ALG], audience=audience,
            options={"require": ["sub", "aud", "exp"]},
        )
        return claims


def _ders(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)


def x509_svid_response(creds: WorkloadCredentials) -> workload_pb2.X509SVIDResponse:
    """§3.2 X509SVIDResponse from the manager's credentials: DER chain, PKCS#8 DER key, DER bundle."""
    key = serialization.load_pem_private_key(creds.key_pem, password=None)
    own = creds.identity.trust_domain
    svid = workload_pb2.X509SVID(
        spiffe_id=str(creds.identity),
        x509_svid=_ders(x509.load_pem_x509_certificates(creds.chain_pem)),
        x509_svid_key=key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        bundle=_ders(creds.bundle.roots_for(own)),
    )
    federated = {f"spiffe://{td}": _ders(c) for td, c in creds.bundle.roots.items() if td != own}
    return workload_pb2.X509SVIDResponse(svids=[svid], federated_bundles=federated)


def x509_bundles_response(creds: WorkloadCredentials) -> workload_pb2.X509BundlesResponse:
    return workload_pb2.X509BundlesResponse(
        bundles={f"spiffe://{td}": _ders(c) for td, c in creds.bundle.roots.items()}
    )


class WorkloadApiServer:
    """Serves one pod's identity on `socket_path`; `start` binds, `close` unbinds and releases."""

    def __init__(
        self,
        socket_path: Path,
        identity: SpiffeId,
        manager: CertificateManager,
        *,
        jwt_authority: JwtAuthority | None = None,
        first_wait: float = FIRST_SVID_WAIT,
    ) -> None:
        self.socket_path = socket_path
        self.identity = identity
        self._manager = manager
        self.jwt_authority = jwt_authority or JwtAuthority()
        self._first_wait = first_wait
        self._creds: WorkloadCredentials | None = None
        self._changed = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._holder: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def endpoint(self) -> str:
        """The value for the pod's `SPIFFE_ENDPOINT_SOCKET` (§3.1: `unix:///abs/path`)."""
        return f"unix://{self.socket_path.resolve()}"

    async def start(self) -> None:
        self._manager.on_update(self._on_update)
        self._holder = asyncio.get_running_loop().create_task(self._hold())
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024)])
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(  # type: ignore[no-untyped-call]
            _Servicer(self), server
        )
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(_SdsServicer(self), server)
        server.add_insecure_port(f"unix:{self.socket_path}")
        await server.start()
        # The pod's processes may run as any user; the socket's location, not its mode, limits access.
        os.chmod(self.socket_path, 0o666)  # noqa: S103 - see the comment above
        self._server = server
        log.info("SPIFFE Workload API for %s on %s", self.identity, self.socket_path)

    async def close(self, grace: float = 0.5) -> None:
        self._closed = True
        self._changed.set()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._holder is not None:
            self._holder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._holder
            self._holder = None
            self._manager.release(self.identity)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    async def _hold(self) -> None:
        """Keep the identity in use (and refreshed) for as long as the socket exists."""
        while True:
            try:
                self._set(await self._manager.acquire(self.identity))
                break
            except CertificateError as exc:
                log.warning("Workload API for %s has no certificate yet: %s", self.identity, exc.message)
        await asyncio.Event().wait()

    def _on_update(self, creds: WorkloadCredentials) -> None:
        if creds.identity == self.identity:
            self._set(creds)

    def _set(self, creds: WorkloadCredentials) -> None:
        if self._creds is creds:
            return
        self._creds = creds
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def changed(self) -> None:
        """Return at the next credentials change (or when the server closes)."""
        await self._changed.wait()

    def current(self) -> WorkloadCredentials | None:
        return self._creds if self._creds is not None else self._manager.current(self.identity)

    async def first(self, context: grpc.aio.ServicerContext[Any, Any]) -> WorkloadCredentials:
        creds = self.current()
        if creds is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self._first_wait)
            creds = self.current()
        if creds is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued yet for this pod")
            raise AssertionError("unreachable")
        return creds

    async def updates(
        self, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[WorkloadCredentials]:
        """The current credentials, then each new one (full state every time, §3.2)."""
        creds = await self.first(context)
        while True:
            waiter = self._changed
            yield creds
            while self._creds is creds or self._creds is None:
                await waiter.wait()
                if self._closed:
                    return
                waiter = self._changed
            creds = self._creds


async def _check_header(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """§3.1: the security header is mandatory; its absence is InvalidArgument (not retried)."""
    metadata = context.invocation_metadata() or ()
    if not any(k == HEADER_KEY and v == HEADER_VALUE for k, v in metadata):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"security header missing from request: {HEADER_KEY}: true"
        )


class _Servicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    def __init__(self, api: WorkloadApiServer) -> None:
        self._api = api

    async def FetchX509SVID(
        self, request: workload_pb2.X509SVIDRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        await _check_header(context)
        async for creds in self._api.updates(context):
            yield x509_svid_response(creds)

    async def FetchX509Bundles(
        self, request: workload_pb2.X509BundlesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[workload_pb2.X509BundlesResponse]:
        await _check_header(context)
        last = b""
        async for creds in self._api.updates(context):
            response = x509_bundles_response(creds)
            encoded = response.SerializeToString(deterministic=True)
            if encoded != last:  # only bundle changes matter to this stream, not leaf rotations
                last = encoded
                yield response

    async def FetchJWTSVID(
        self, request: workload_pb2.JWTSVIDRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> workload_pb2.JWTSVIDResponse:
        await _check_header(context)
        audience = [a for a in request.audience if a]
        if not audience:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if request.spiffe_id and request.spiffe_id != str(self._api.identity):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"this workload is not entitled to {request.spiffe_id}"
            )
        await self._api.first(context)
        token = self._api.jwt_authority.mint(self._api.identity, audience, time.time())
        return workload_pb2.JWTSVIDResponse(
            svids=[workload_pb2.JWTSVID(spiffe_id=str(self._api.identity), svid=token)]
        )

    async def FetchJWTBundles(
        self, request: workload_pb2.JWTBundlesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[workload_pb2.JWTBundlesResponse]:
        await _check_header(context)
        await self._api.first(context)
        yield workload_pb2.JWTBundlesResponse(
            bundles={f"spiffe://{self._api.identity.trust_domain}": self._api.jwt_authority.jwks()}
        )
        await asyncio.Event().wait()  # the key never changes while the node runs; keep the stream open

    async def ValidateJWTSVID(
        self, request: workload_pb2.ValidateJWTSVIDRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> workload_pb2.ValidateJWTSVIDResponse:
        await _check_header(context)
        if not request.audience:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "svid must be specified")
        try:
            claims = self._api.jwt_authority.validate(request.svid, request.audience)
            subject = SpiffeId.parse(str(claims["sub"]))
        except (jwt.PyJWTError, SpiffeIdError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid JWT-SVID: {exc}")
            raise AssertionError("unreachable") from None
        response = workload_pb2.ValidateJWTSVIDResponse(spiffe_id=str(subject))
        response.claims.update(claims)
        return response


SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105 - a type URL
SDS_DEFAULT = "default"
SDS_ROOTCA = "ROOTCA"


def sds_resources(creds: WorkloadCredentials, names: Iterable[str]) -> list[any_pb2.Any]:
    """Istio's SDS secrets: `default` = chain + key, `ROOTCA` = the roots; other names are not ours."""
    out = []
    for name in names:
        if name == SDS_DEFAULT:
            secret = secret_pb2.Secret(name=name, tls_certificate=common_pb2.TlsCertificate(
                certificate_chain=base_pb2.DataSource(inline_bytes=creds.chain_pem),
                private_key=base_pb2.DataSource(inline_bytes=creds.key_pem),
            ))
        elif name == SDS_ROOTCA:
            secret = secret_pb2.Secret(name=name, validation_context=common_pb2.CertificateValidationContext(
                trusted_ca=base_pb2.DataSource(inline_bytes=creds.roots_pem().encode()),
            ))
        else:
            continue
        resource = any_pb2.Any()
        resource.Pack(secret)
        out.append(resource)
    return out


def _sds_response(
    creds: WorkloadCredentials, names: Iterable[str], version: int
) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse(
        version_info=str(version), resources=sds_resources(creds, names), type_url=SECRET_TYPE,
        nonce=os.urandom(8).hex(),
    )


class _SdsServicer(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    """SotW SDS: every request (re)names the wanted secrets; every rotation pushes them again."""

    def __init__(self, api: WorkloadApiServer) -> None:
        self._api = api

    async def FetchSecrets(
        self, request: discovery_pb2.DiscoveryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> discovery_pb2.DiscoveryResponse:
        creds = await self._api.first(context)
        return _sds_response(creds, request.resource_names or (SDS_DEFAULT,), 1)

    async def StreamSecrets(
        self, request_iterator: object, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        names: list[str] = list(first.resource_names) or [SDS_DEFAULT]
        requested = asyncio.Event()

        async def reader() -> None:
            nonlocal names
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    return
                if not request.response_nonce or (
                    request.resource_names and list(request.resource_names) != names
                ):
                    names = list(request.resource_names) or names
                    requested.set()
                if request.HasField("error_detail"):
                    log.warning("SDS client for %s rejected secrets: %s", self._api.identity,
                                request.error_detail.message)

        reading = asyncio.get_running_loop().create_task(reader())
        version = 0
        try:
            async for creds in self._api.updates(context):
                while True:
                    version += 1
                    await context.write(_sds_response(creds, names, version))
                    requested.clear()
                    rotated = asyncio.ensure_future(self._api.changed())
                    if self._api.current() is not creds:  # rotated while we were writing
                        rotated.cancel()
                        break
                    wanted = asyncio.ensure_future(requested.wait())
                    done, _ = await asyncio.wait(
                        {reading, rotated, wanted}, return_when=asyncio.FIRST_COMPLETED
                    )
                    rotated.cancel()
                    wanted.cancel()
                    if reading in done:
                        return
                    if rotated in done:
                        break
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
