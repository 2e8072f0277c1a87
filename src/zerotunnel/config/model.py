"""The configuration the rest of zerotunnel sees: frozen dataclasses, never pydantic models.

DESIGN.md §2: one loader turns YAML documents into these objects, whether they came from files or
from the Kubernetes API, so nothing downstream knows the source. Field names are the upstream
camelCase names in snake_case; lists are tuples (`()` when absent) and maps are read-only
`FrozenMap`s, so every object is hashable and can be shared between snapshots without copying.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")

AMBIENT_LABEL = "istio.io/dataplane-mode"
"""users-spiffe-conventions.md §5.3: on a Namespace or a Pod (the pod wins); `ambient` or `none`."""
USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE_LABEL = "istio.io/use-waypoint-namespace"
WAYPOINT_FOR_LABEL = "istio.io/waypoint-for"
DRY_RUN_ANNOTATION = "istio.io/dry-run"
WAYPOINT_GATEWAY_CLASS = "istio-waypoint"


class FrozenMap(Mapping[K, V]):
    """A read-only, hashable mapping: frozen dataclasses holding one stay hashable."""

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[K, V] | None = None) -> None:
        self._data: dict[K, V] = dict(data or {})
        self._hash: int | None = None

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self._data.items()) == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


def _empty_str_map() -> Mapping[str, str]:
    return FrozenMap()


# --------------------------------------------------------------------------------------------- common


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """`metadata`. `order` is the object's position in load order: the tie-break for "oldest"
    (istio-ambient.md §5.1: among PeerAuthentications at the same level the oldest by
    creationTimestamp wins); load order breaks ties and stands in for a missing timestamp."""

    name: str
    namespace: str
    labels: Mapping[str, str] = field(default_factory=_empty_str_map)
    annotations: Mapping[str, str] = field(default_factory=_empty_str_map)
    creation_timestamp: datetime | None = None
    order: int = 0


@dataclass(frozen=True, slots=True)
class WorkloadSelector:
    """`spec.selector` of Istio policies. An empty `match_labels` selects every workload."""

    match_labels: Mapping[str, str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items())


@dataclass(frozen=True, slots=True)
class PolicyTargetReference:
    """`spec.targetRef` / `spec.targetRefs[]` (istio-ambient.md §5: policies attached to a waypoint
    Gateway or a Service are enforced by the waypoint)."""

    group: str
    kind: str
    name: str
    namespace: str | None = None


# ---------------------------------------------------------------------------------- Kubernetes core


@dataclass(frozen=True, slots=True)
class Namespace:
    meta: ObjectMeta


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    meta: ObjectMeta


@dataclass(frozen=True, slots=True)
class EnvVar:
    """`env[]`. `value` is None when the upstream entry uses `valueFrom` (which we do not resolve)."""

    name: str
    value: str | None


@dataclass(frozen=True, slots=True)
class ContainerPort:
    name: str | None
    container_port: int
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class Container:
    name: str
    image: str | None = None
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[EnvVar, ...] = ()
    ports: tuple[ContainerPort, ...] = ()
    working_dir: str | None = None


@dataclass(frozen=True, slots=True)
class Pod:
    """DESIGN.md §2: `status.podIP` is optional because the local cluster assigns one."""

    meta: ObjectMeta
    service_account: str
    node_name: str | None
    containers: tuple[Container, ...]
    pod_ip: str | None = None
    host_network: bool = False
    init_containers: tuple[Container, ...] = ()

    def identity(self, trust_domain: str) -> str:
        """istio-ambient.md §4.4: `spiffe://<td>/ns/<namespace>/sa/<serviceAccount>`."""
        return f"spiffe://{trust_domain}/ns/{self.meta.namespace}/sa/{self.service_account}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str | None
    port: int
    target_port: int | str
    protocol: str = "TCP"
    app_protocol: str | None = None


@dataclass(frozen=True, slots=True)
class Service:
    """`selector` is None for a Service without a selector (endpoints managed elsewhere)."""

    meta: ObjectMeta
    selector: Mapping[str, str] | None
    ports: tuple[ServicePort, ...]
    cluster_ip: str | None = None
    type: str = "ClusterIP"

    @property
    def hostname(self) -> str:
        """The cluster-local FQDN (`name.ns.svc.cluster.local`) Istio uses as the service host."""
        return f"{self.meta.name}.{self.meta.namespace}.svc.cluster.local"


@dataclass(frozen=True, slots=True)
class NodeAddress:
    type: str
    address: str


@dataclass(frozen=True, slots=True)
class Node:
    meta: ObjectMeta
    pod_cidr: str | None = None
    addresses: tuple[NodeAddress, ...] = ()


@dataclass(frozen=True, slots=True)
class Secret:
    """`data` is base64-decoded and merged with `stringData` (stringData wins, as in Kubernetes)."""

    meta: ObjectMeta
    type: str
    data: Mapping[str, bytes]


# ------------------------------------------------------------------------------------- Istio security


@dataclass(frozen=True, slots=True)
class Source:
    """`rules[].from[].source`: every list is a tuple of strings, `()` when absent."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()
    trust_domains: tuple[str, ...] = ()
    not_trust_domains: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    """`rules[].to[].operation`; ports are strings as in the upstream schema."""

    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Condition:
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    from_: tuple[Source, ...] = ()
    to: tuple[Operation, ...] = ()
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    """istio-ambient.md §5. `dry_run` comes from the `istio.io/dry-run` annotation ("true");
    an annotation that is present but not a boolean is treated as false and flagged so `analyze`
    can warn."""

    meta: ObjectMeta
    selector: WorkloadSelector | None
    target_refs: tuple[PolicyTargetReference, ...]
    action: str  # "ALLOW" | "DENY" | "AUDIT" | "CUSTOM"
    provider: str | None
    rules: tuple[Rule, ...]
    dry_run: bool = False
    dry_run_annotation_invalid: bool = False


@dataclass(frozen=True, slots=True)
class PeerAuthentication:
    """istio-ambient.md §6. `mtls_mode` is "UNSET" when absent (inherit from the parent scope)."""

    meta: ObjectMeta
    selector: WorkloadSelector | None
    mtls_mode: str  # "UNSET" | "DISABLE" | "PERMISSIVE" | "STRICT"
    port_level_mtls: Mapping[int, str]


@dataclass(frozen=True, slots=True)
class JwtRule:
    issuer: str
    audiences: tuple[str, ...] = ()
    jwks: str | None = None
    jwks_uri: str | None = None
    from_headers: tuple[tuple[str, str], ...] = ()  # (name, prefix)
    from_params: tuple[str, ...] = ()
    forward_original_token: bool = False
    output_payload_to_header: str | None = None
    output_claim_to_headers: tuple[tuple[str, str], ...] = ()  # (header, claim)
    from_cookies: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    meta: ObjectMeta
    selector: WorkloadSelector | None
    target_refs: tuple[PolicyTargetReference, ...]
    jwt_rules: tuple[JwtRule, ...]


# ----------------------------------------------------------------------------------- Istio networking


@dataclass(frozen=True, slots=True)
class WorkloadEntry:
    """A workload outside any pod (a VM or a host); `ports` maps port names to numbers."""

    meta: ObjectMeta
    address: str | None
    labels: Mapping[str, str]
    service_account: str
    ports: Mapping[str, int]
    network: str | None = None
    locality: str | None = None
    weight: int | None = None

    def identity(self, trust_domain: str) -> str:
        return f"spiffe://{trust_domain}/ns/{self.meta.namespace}/sa/{self.service_account}"


@dataclass(frozen=True, slots=True)
class GatewayPort:
    number: int
    protocol: str
    name: str | None = None
    target_port: int | None = None


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """`servers[].tls` of an Istio Gateway (istio-ambient.md §7)."""

    # PASSTHROUGH (the proto default) | SIMPLE | MUTUAL | AUTO_PASSTHROUGH | ISTIO_MUTUAL | OPTIONAL_MUTUAL
    mode: str = "PASSTHROUGH"
    https_redirect: bool = False
    credential_name: str | None = None
    credential_names: tuple[str, ...] = ()
    server_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    ca_crl: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    verify_certificate_spki: tuple[str, ...] = ()
    verify_certificate_hash: tuple[str, ...] = ()
    min_protocol_version: str = "TLS_AUTO"
    max_protocol_version: str = "TLS_AUTO"
    cipher_suites: tuple[str, ...] = ()
    ca_cert_credential_name: str | None = None
    insecure_skip_verify: bool = False


@dataclass(frozen=True, slots=True)
class Server:
    port: GatewayPort
    hosts: tuple[str, ...]
    tls: ServerTLS | None = None
    bind: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Gateway:
    """Istio `networking.istio.io` Gateway (the ingress gateway's listeners)."""

    meta: ObjectMeta
    selector: Mapping[str, str]
    servers: tuple[Server, ...]


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: str  # "exact" | "prefix" | "regex"
    value: str


@dataclass(frozen=True, slots=True)
class HTTPMatchRequest:
    name: str | None = None
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: Mapping[str, StringMatch] = field(default_factory=FrozenMap)
    query_params: Mapping[str, StringMatch] = field(default_factory=FrozenMap)
    port: int | None = None
    ignore_uri_case: bool = False
    gateways: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Destination:
    host: str
    subset: str | None = None
    port: int | None = None


@dataclass(frozen=True, slots=True)
class HTTPRouteDestination:
    destination: Destination
    weight: int | None = None


@dataclass(frozen=True, slots=True)
class HTTPRewrite:
    uri: str | None = None
    authority: str | None = None


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    name: str | None = None
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[HTTPRouteDestination, ...] = ()
    rewrite: HTTPRewrite | None = None
    timeout: timedelta | None = None


@dataclass(frozen=True, slots=True)
class TCPRoute:
    """`tcp[]` and `tls[]` routes, reduced to what the gateway routes on."""

    route: tuple[HTTPRouteDestination, ...] = ()
    sni_hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class VirtualService:
    meta: ObjectMeta
    hosts: tuple[str, ...]
    gateways: tuple[str, ...]
    http: tuple[HTTPRoute, ...]
    tcp: tuple[TCPRoute, ...] = ()
    tls: tuple[TCPRoute, ...] = ()
    export_to: tuple[str, ...] = ()


# -------------------------------------------------------------------------------------- Gateway API


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    port: int
    protocol: str
    hostname: str | None = None


@dataclass(frozen=True, slots=True)
class K8sGateway:
    """Gateway API `Gateway`; with `gatewayClassName: istio-waypoint` it declares a waypoint
    (istio-ambient.md §10, users-spiffe-conventions.md §5.2)."""

    meta: ObjectMeta
    gateway_class_name: str
    listeners: tuple[Listener, ...]
    addresses: tuple[str, ...] = ()

    @property
    def is_waypoint(self) -> bool:
        return self.gateway_class_name == WAYPOINT_GATEWAY_CLASS

    @property
    def waypoint_for(self) -> str:
        """`service` (the default) | `workload` | `all` | `none`; unvalidated label text."""
        return self.meta.labels.get(WAYPOINT_FOR_LABEL, "service")


# ------------------------------------------------------------------------------------------ the mesh


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """Our `zerotunnel.io/v1alpha1` MeshConfig document (DESIGN.md §2); the defaults are Istio's."""

    trust_domain: str = "cluster.local"
    trust_domain_aliases: tuple[str, ...] = ()
    root_namespace: str = "istio-system"
    workload_cert_ttl: timedelta = timedelta(hours=24)
    max_workload_cert_ttl: timedelta = timedelta(days=90)
    ca_dir: str | None = None
    path_normalization: str = "BASE"  # NONE | BASE | MERGE_SLASHES | DECODE_AND_MERGE_SLASHES


@dataclass(frozen=True, slots=True)
class Config:
    """The whole loaded configuration; each tuple is in load order."""

    mesh: MeshConfig = field(default_factory=MeshConfig)
    namespaces: tuple[Namespace, ...] = ()
    service_accounts: tuple[ServiceAccount, ...] = ()
    pods: tuple[Pod, ...] = ()
    services: tuple[Service, ...] = ()
    nodes: tuple[Node, ...] = ()
    secrets: tuple[Secret, ...] = ()
    workload_entries: tuple[WorkloadEntry, ...] = ()
    authorization_policies: tuple[AuthorizationPolicy, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    request_authentications: tuple[RequestAuthentication, ...] = ()
    gateways: tuple[Gateway, ...] = ()
    virtual_services: tuple[VirtualService, ...] = ()
    k8s_gateways: tuple[K8sGateway, ...] = ()

    def namespace(self, name: str) -> Namespace | None:
        return next((n for n in self.namespaces if n.meta.name == name), None)

    def pods_in(self, namespace: str) -> tuple[Pod, ...]:
        return tuple(p for p in self.pods if p.meta.namespace == namespace)

    def pod(self, namespace: str, name: str) -> Pod | None:
        return next((p for p in self.pods if p.meta.namespace == namespace and p.meta.name == name), None)

    def service(self, namespace: str, name: str) -> Service | None:
        return next((s for s in self.services if s.meta.namespace == namespace and s.meta.name == name), None)

    def secret(self, namespace: str, name: str) -> Secret | None:
        return next((s for s in self.secrets if s.meta.namespace == namespace and s.meta.name == name), None)

    def node(self, name: str) -> Node | None:
        return next((n for n in self.nodes if n.meta.name == name), None)

    def is_ambient(self, namespace: str) -> bool:
        """users-spiffe-conventions.md §5.3: the namespace carries `istio.io/dataplane-mode: ambient`."""
        ns = self.namespace(namespace)
        return ns is not None and ns.meta.labels.get(AMBIENT_LABEL) == "ambient"

    def pod_is_ambient(self, pod: Pod) -> bool:
        """The pod label wins over the namespace label: `none` opts a pod out, `ambient` opts it in.

        Host-network pods are never captured, as in Istio's CNI: they have no network namespace of their
        own to redirect.
        """
        if pod.host_network:
            return False
        mode = pod.meta.labels.get(AMBIENT_LABEL)
        if mode is not None:
            return mode == "ambient"
        return self.is_ambient(pod.meta.namespace)

    def identity_of(self, pod: Pod) -> str:
        """`spiffe://<trust-domain>/ns/<namespace>/sa/<serviceAccount>` (DESIGN.md §2)."""
        return pod.identity(self.mesh.trust_domain)
