"""What the ingress gateway serves, computed from Istio `Gateway`, `VirtualService` and `Secret`.

istio-ambient.md §7.1-§7.2. A `Gateway` (selected with `--gateway NS/NAME`, or every Istio Gateway in
the configuration) lists servers: port, hosts, and `tls` (SIMPLE, MUTUAL, OPTIONAL_MUTUAL; ISTIO_MUTUAL
and PASSTHROUGH are not served here and are reported). `credentialName` names a Secret in the
Gateway's namespace holding the server certificate (`tls.crt`/`tls.key` or `cert`/`key`, generic keys
win) and, for client verification, `ca.crt`/`cacert` (a bundle: several external CAs), `ca.crl`/`crl`,
or a separate `<credentialName>-cacert` Secret. Routes come from `VirtualService`s bound to the
Gateway (`gateways: [ns/name | name]`), matched on host then `uri` exact/prefix/regex.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from zerotunnel.config.model import Config, Gateway, HTTPRoute, Server, VirtualService
from zerotunnel.errors import InputError, ZerotunnelError
from zerotunnel.identity.ca import check_pem_framing

SERVED_MODES = ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL")
DEFAULT_GATEWAY_SA = "istio-ingressgateway-service-account"


class GatewayConfigError(ZerotunnelError):
    """A server cannot be served as configured (missing or malformed secret, unsupported mode)."""


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """PEM bytes of one server's TLS configuration (§7.2)."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes | None = None
    crl_pem: bytes | None = None


@dataclass(frozen=True, slots=True)
class ServerPlan:
    """One `servers[]` entry ready to listen: `tls` None means plaintext HTTP."""

    gateway: str
    port: int
    hosts: tuple[str, ...]
    mode: str | None
    tls: TlsMaterial | None
    subject_alt_names: tuple[str, ...] = ()
    min_version: str = "TLSV1_2"
    max_version: str = "TLS_AUTO"
    name: str | None = None


def _get(data: dict[str, bytes], key: str, secret: str) -> bytes | None:
    if key not in data:
        return None
    value = data[key]
    if not value.strip():
        raise GatewayConfigError(f'secret {secret}: found key "{key}", but it was empty')
    return value


def _pick(data: dict[str, bytes], names: tuple[str, ...], secret: str) -> tuple[str, bytes | None]:
    """The first of `names` present in the Secret (generic keys win, §7.2) and its value."""
    for name in names:
        value = _get(data, name, secret)
        if value is not None:
            return name, value
    return names[-1], None


def tls_material(config: Config, namespace: str, credential: str, *, need_ca: bool) -> TlsMaterial:
    """§7.2 key lookup, with Istio's error texts."""
    secret = config.secret(namespace, credential)
    if secret is None:
        raise GatewayConfigError(f"secret {namespace}/{credential} not found")
    data = dict(secret.data)
    label = f"{namespace}/{credential}"
    cert_name, key_name = "cert", "key"
    cert, key = _get(data, "cert", label), _get(data, "key", label)
    if cert is None or key is None:
        cert_name, key_name = "tls.crt", "tls.key"
        cert, key = _get(data, "tls.crt", label), _get(data, "tls.key", label)
    if cert is None or key is None:
        raise GatewayConfigError(
            f"secret {label}: found secret, but didn't have expected keys (cert and key) or "
            f"(tls.crt and tls.key); found: {', '.join(sorted(data)) or 'nothing'}"
        )
    ca_name, ca = _pick(data, ("cacert", "ca.crt"), label)
    crl_name, crl = _pick(data, ("crl", "ca.crl"), label)
    if ca is None:
        separate = config.secret(namespace, f"{credential}-cacert")
        if separate is not None:
            sdata = dict(separate.data)
            ca_name, ca = _pick(sdata, ("cacert", "ca.crt"), label + "-cacert")
            ca_name = f"{credential}-cacert {ca_name}"
            if crl is None:
                crl_name, crl = _pick(sdata, ("crl", "ca.crl"), label + "-cacert")
                crl_name = f"{credential}-cacert {crl_name}"
    if need_ca and ca is None:
        raise GatewayConfigError(
            f"secret {label}: no CA certificates (ca.crt, cacert or {credential}-cacert) "
            "for client verification"
        )
    try:
        check_material(cert_name, cert, key_name, key)
        if ca is not None:
            check_ca_bundle(ca_name, ca)
        if crl is not None:
            check_pem_framing(crl, crl_name)
            load_crls(crl)
    except (ValueError, InputError) as exc:
        message = exc.message if isinstance(exc, InputError) else str(exc)
        raise GatewayConfigError(f"secret {label}: {message}") from None
    return TlsMaterial(cert, key, ca, crl)


def check_material(cert_name: str, cert_pem: bytes, key_name: str, key_pem: bytes) -> None:
    """The server certificate and its key, checked before they replace the ones in service
    (security.md §4 item 28; ghostunnel's reload-broken-certificate): a PEM cut short, a file that is
    not PEM, a key that is not the certificate's — each named, so the last good pair stays."""
    check_pem_framing(cert_pem, cert_name)
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise InputError(f"{cert_name}: no PEM certificate found") from None
    check_pem_framing(key_pem, key_name)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{key_name} is not an unencrypted PEM private key ({exc})") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, spki) != certs[0].public_key().public_bytes(
            serialization.Encoding.DER, spki):
        raise InputError(f"{key_name} does not match {cert_name} ({certs[0].subject.rfc4514_string()})")


def check_ca_bundle(name: str, pem: bytes) -> list[x509.Certificate]:
    """A client-CA bundle: complete PEM, and CA certificates only — a leaf put there by mistake would
    become a trust anchor that signs nothing, refusing every client of the CA it replaced."""
    check_pem_framing(pem, name)
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise InputError(f"{name}: no PEM certificate found") from None
    for cert in certs:
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise InputError(f"{name}: {cert.subject.rfc4514_string()} is not a CA certificate "
                             "(basicConstraints CA=false or missing)")
    return certs


_CRL_BLOCK = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.S)


def load_crls(pem: bytes) -> list[x509.CertificateRevocationList]:
    """Every CRL in a PEM bundle (one per external CA)."""
    blocks = _CRL_BLOCK.findall(pem)
    if not blocks:
        raise ValueError("ca.crl holds no PEM CRL")
    return [x509.load_pem_x509_crl(b) for b in blocks]


def selected_gateways(config: Config, gateway: str | None) -> list[Gateway]:
    if gateway is None:
        return list(config.gateways)
    ns, _, name = gateway.partition("/")
    return [g for g in config.gateways if g.meta.namespace == ns and g.meta.name == name]


def plan_server(config: Config, gateway: Gateway, server: Server) -> ServerPlan:
    key = f"{gateway.meta.namespace}/{gateway.meta.name}"
    tls = server.tls
    if tls is None:
        return ServerPlan(key, server.port.number, server.hosts, None, None, name=server.name)
    if tls.mode not in SERVED_MODES:
        raise GatewayConfigError(
            f"gateway {key} port {server.port.number}: tls.mode {tls.mode} is not supported "
            f"by zerotunnel gateway (supported: {', '.join(SERVED_MODES)})"
        )
    if tls.credential_name is None:
        raise GatewayConfigError(f"gateway {key} port {server.port.number}: tls.credentialName is required")
    material = tls_material(
        config, gateway.meta.namespace, tls.credential_name, need_ca=tls.mode in ("MUTUAL", "OPTIONAL_MUTUAL")
    )
    if tls.subject_alt_names and tls.mode == "SIMPLE":
        raise GatewayConfigError(f"gateway {key} port {server.port.number}: subjectAltNames requires MUTUAL")
    return ServerPlan(
        key,
        server.port.number,
        server.hosts,
        tls.mode,
        material,
        tls.subject_alt_names,
        tls.min_protocol_version,
        tls.max_protocol_version,
        server.name,
    )


# -- routing ----------------------------------------------------------------------------------------


def host_matches(pattern: str, host: str) -> bool:
    """Gateway/VirtualService host matching: `*`, `*.suffix`, exact; case-insensitive, one trailing dot
    and the port ignored (security.md §1a: one canonical form for routing and policy)."""
    host = strip_port(host).lower().removesuffix(".")
    pattern = pattern.partition("/")[2] if "/" in pattern else pattern
    pattern = pattern.lower().removesuffix(".")
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def strip_port(host: str) -> str:
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() else host


def _bound(vs: VirtualService, gateway: str) -> bool:
    ns, _, name = gateway.partition("/")
    for ref in vs.gateways:
        rns, sep, rname = ref.partition("/")
        if not sep:
            rns, rname = vs.meta.namespace, ref
        if (rns, rname) == (ns, name):
            return True
    return False


@dataclass(frozen=True, slots=True)
class RouteTarget:
    """Where a request goes: a service hostname (FQDN) and port, and the route that chose it."""

    hostname: str
    port: int | None
    virtual_service: str
    route: str | None


def _uri_matches(route: HTTPRoute, path: str) -> bool:
    if not route.match:
        return True
    for m in route.match:
        uri = m.uri
        if uri is None:
            return True
        value = path.lower() if m.ignore_uri_case else path
        expect = uri.value.lower() if m.ignore_uri_case else uri.value
        if uri.kind == "exact" and value == expect:
            return True
        if uri.kind == "prefix" and value.startswith(expect):
            return True
        if uri.kind == "regex" and re.fullmatch(uri.value, path):
            return True
    return False


def fqdn(host: str, namespace: str) -> str:
    """`app-a` → `app-a.<ns>.svc.cluster.local`; `app-a.ns` → `app-a.ns.svc.cluster.local`."""
    parts = host.split(".")
    if len(parts) == 1:
        return f"{host}.{namespace}.svc.cluster.local"
    if len(parts) == 2:
        return f"{host}.svc.cluster.local"
    return host


def _specificity(pattern: str) -> int:
    """Envoy picks the most specific virtual host: an exact name, then the longest wildcard suffix."""
    pattern = pattern.partition("/")[2] if "/" in pattern else pattern
    if pattern == "*":
        return 0
    if pattern.startswith("*."):
        return len(pattern)
    return 10_000


def route_request(
    config: Config, gateway: str, server_hosts: tuple[str, ...], host: str, path: str
) -> RouteTarget | None:
    """The first matching route among the VirtualServices bound to `gateway` whose host is the most
    specific match for `host` (Envoy's virtual host selection: no fall-through to a wildcard)."""
    if not any(host_matches(h, host) for h in server_hosts):
        return None
    candidates = [
        (max(_specificity(h) for h in vs.hosts if host_matches(h, host)), i, vs)
        for i, vs in enumerate(config.virtual_services)
        if _bound(vs, gateway) and any(host_matches(h, host) for h in vs.hosts)
    ]
    best = max((c[0] for c in candidates), default=0)
    for _, _, vs in sorted(c for c in candidates if c[0] == best):
        for route in vs.http:
            if not _uri_matches(route, path) or not route.route:
                continue
            dest = route.route[0].destination
            return RouteTarget(
                fqdn(dest.host, vs.meta.namespace),
                dest.port,
                f"{vs.meta.namespace}/{vs.meta.name}",
                route.name,
            )
    return None


def gateway_identity(config: Config, gateway: Gateway) -> str:
    """The mesh identity of the gateway's pods (the one selected by the Gateway's `selector`);
    Istio's default ingress service account otherwise."""
    sa = DEFAULT_GATEWAY_SA
    for pod in config.pods:
        if gateway.selector and all(pod.meta.labels.get(k) == v for k, v in gateway.selector.items()):
            sa = pod.service_account
            return f"spiffe://{config.mesh.trust_domain}/ns/{pod.meta.namespace}/sa/{sa}"
    return f"spiffe://{config.mesh.trust_domain}/ns/{gateway.meta.namespace}/sa/{sa}"
