"""The upstream schemas, as pydantic models: the only place pydantic is used.

DESIGN.md §2: a user's real manifests must load unchanged, so every field of the upstream schema is
declared here — the ones we act on with their type, the ones we ignore as `Any` — and anything else
(a misspelt field) is rejected (`extra="forbid"`). Validation is strict, as Kubernetes' JSON decoding
is: a number is not a string, "true" is not a boolean. Field names are the upstream camelCase names so
that error paths read like the manifest. These models never leave the config package: `convert`
turns them into the frozen dataclasses of `model`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator
from pydantic_core import PydanticCustomError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=False)


def _int_or_string(value: Any) -> int | str:
    """Kubernetes `IntOrString` (e.g. `targetPort: 8080` or `targetPort: http`)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value
    raise PydanticCustomError(
        "int_or_string", "expected an integer or a string, got {got}", {"got": repr(value)}
    )


IntOrString = Annotated[int | str, PlainValidator(_int_or_string)]


def _port_key(value: Any) -> int:
    """Map keys that are ports: YAML gives `8080:` as an int and `"8080":` as a string (JSON keys are
    always strings), and protobuf's JSON mapping accepts both."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise PydanticCustomError(
        "port_key", "expected a port number as the key, got {got}", {"got": repr(value)}
    )


PortKey = Annotated[int, PlainValidator(_port_key)]

StrList = list[str] | None
StrMap = dict[str, str] | None


# ------------------------------------------------------------------------------------------- common


class ObjectMetaSchema(Strict):
    name: str | None = None
    generateName: Any = None
    namespace: str | None = None
    selfLink: Any = None
    uid: Any = None
    resourceVersion: Any = None
    generation: Any = None
    creationTimestamp: str | None = None
    deletionTimestamp: Any = None
    deletionGracePeriodSeconds: Any = None
    labels: StrMap = None
    annotations: StrMap = None
    ownerReferences: Any = None
    finalizers: Any = None
    managedFields: Any = None


class Document(Strict):
    """What every object has at the top level."""

    apiVersion: str
    kind: str
    metadata: ObjectMetaSchema | None = None


# ------------------------------------------------------------------------------------- Kubernetes v1


class NamespaceDoc(Document):
    spec: Any = None
    status: Any = None


class ServiceAccountDoc(Document):
    automountServiceAccountToken: Any = None
    imagePullSecrets: Any = None
    secrets: Any = None


class EnvVarSchema(Strict):
    name: str
    value: str | None = None
    valueFrom: Any = None


class ContainerPortSchema(Strict):
    containerPort: int
    hostIP: Any = None
    hostPort: Any = None
    name: str | None = None
    protocol: Literal["TCP", "UDP", "SCTP"] | None = None


class ContainerSchema(Strict):
    name: str
    image: str | None = None
    command: StrList = None
    args: StrList = None
    env: list[EnvVarSchema] | None = None
    ports: list[ContainerPortSchema] | None = None
    workingDir: str | None = None
    envFrom: Any = None
    imagePullPolicy: Any = None
    lifecycle: Any = None
    livenessProbe: Any = None
    readinessProbe: Any = None
    startupProbe: Any = None
    resizePolicy: Any = None
    resources: Any = None
    restartPolicy: Any = None
    securityContext: Any = None
    stdin: Any = None
    stdinOnce: Any = None
    terminationMessagePath: Any = None
    terminationMessagePolicy: Any = None
    tty: Any = None
    volumeDevices: Any = None
    volumeMounts: Any = None


class PodSpecSchema(Strict):
    containers: list[ContainerSchema]
    initContainers: list[ContainerSchema] | None = None
    serviceAccountName: str | None = None
    serviceAccount: str | None = None  # deprecated alias of serviceAccountName
    nodeName: str | None = None
    hostNetwork: bool | None = None
    activeDeadlineSeconds: Any = None
    affinity: Any = None
    automountServiceAccountToken: Any = None
    dnsConfig: Any = None
    dnsPolicy: Any = None
    enableServiceLinks: Any = None
    ephemeralContainers: Any = None
    hostAliases: Any = None
    hostIPC: Any = None
    hostPID: Any = None
    hostUsers: Any = None
    hostname: Any = None
    imagePullSecrets: Any = None
    nodeSelector: Any = None
    os: Any = None
    overhead: Any = None
    preemptionPolicy: Any = None
    priority: Any = None
    priorityClassName: Any = None
    readinessGates: Any = None
    resourceClaims: Any = None
    resources: Any = None
    restartPolicy: Any = None
    runtimeClassName: Any = None
    schedulerName: Any = None
    schedulingGates: Any = None
    securityContext: Any = None
    setHostnameAsFQDN: Any = None
    shareProcessNamespace: Any = None
    subdomain: Any = None
    terminationGracePeriodSeconds: Any = None
    tolerations: Any = None
    topologySpreadConstraints: Any = None
    volumes: Any = None


class PodStatusSchema(Strict):
    podIP: str | None = None
    podIPs: Any = None
    conditions: Any = None
    containerStatuses: Any = None
    ephemeralContainerStatuses: Any = None
    hostIP: Any = None
    hostIPs: Any = None
    initContainerStatuses: Any = None
    message: Any = None
    nominatedNodeName: Any = None
    phase: Any = None
    qosClass: Any = None
    reason: Any = None
    resize: Any = None
    resourceClaimStatuses: Any = None
    startTime: Any = None
    observedGeneration: Any = None


class PodDoc(Document):
    spec: PodSpecSchema
    status: PodStatusSchema | None = None


class ServicePortSchema(Strict):
    port: int
    name: str | None = None
    targetPort: IntOrString | None = None
    protocol: Literal["TCP", "UDP", "SCTP"] | None = None
    appProtocol: str | None = None
    nodePort: Any = None


class ServiceSpecSchema(Strict):
    selector: StrMap = None
    ports: list[ServicePortSchema] | None = None
    clusterIP: str | None = None
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] | None = None
    allocateLoadBalancerNodePorts: Any = None
    clusterIPs: Any = None
    externalIPs: Any = None
    externalName: Any = None
    externalTrafficPolicy: Any = None
    healthCheckNodePort: Any = None
    internalTrafficPolicy: Any = None
    ipFamilies: Any = None
    ipFamilyPolicy: Any = None
    loadBalancerClass: Any = None
    loadBalancerIP: Any = None
    loadBalancerSourceRanges: Any = None
    publishNotReadyAddresses: Any = None
    sessionAffinity: Any = None
    sessionAffinityConfig: Any = None
    trafficDistribution: Any = None


class ServiceDoc(Document):
    spec: ServiceSpecSchema | None = None
    status: Any = None


class NodeSpecSchema(Strict):
    podCIDR: str | None = None
    podCIDRs: Any = None
    configSource: Any = None
    externalID: Any = None
    providerID: Any = None
    taints: Any = None
    unschedulable: Any = None


class NodeAddressSchema(Strict):
    type: str
    address: str


class NodeStatusSchema(Strict):
    addresses: list[NodeAddressSchema] | None = None
    allocatable: Any = None
    capacity: Any = None
    conditions: Any = None
    config: Any = None
    daemonEndpoints: Any = None
    features: Any = None
    images: Any = None
    nodeInfo: Any = None
    phase: Any = None
    runtimeHandlers: Any = None
    volumesAttached: Any = None
    volumesInUse: Any = None


class NodeDoc(Document):
    spec: NodeSpecSchema | None = None
    status: NodeStatusSchema | None = None


class SecretDoc(Document):
    type: str | None = None
    data: StrMap = None
    stringData: StrMap = None
    immutable: Any = None


# ------------------------------------------------------------------------------ security.istio.io


class WorkloadSelectorSchema(Strict):
    matchLabels: StrMap = None


class TargetRefSchema(Strict):
    group: str | None = None
    kind: str
    name: str
    namespace: str | None = None


class SourceSchema(Strict):
    principals: StrList = None
    notPrincipals: StrList = None
    requestPrincipals: StrList = None
    notRequestPrincipals: StrList = None
    namespaces: StrList = None
    notNamespaces: StrList = None
    ipBlocks: StrList = None
    notIpBlocks: StrList = None
    remoteIpBlocks: StrList = None
    notRemoteIpBlocks: StrList = None
    serviceAccounts: StrList = None
    notServiceAccounts: StrList = None
    trustDomains: StrList = None
    notTrustDomains: StrList = None


class FromSchema(Strict):
    source: SourceSchema | None = None


class OperationSchema(Strict):
    hosts: StrList = None
    notHosts: StrList = None
    ports: StrList = None
    notPorts: StrList = None
    methods: StrList = None
    notMethods: StrList = None
    paths: StrList = None
    notPaths: StrList = None


class ToSchema(Strict):
    operation: OperationSchema | None = None


class ConditionSchema(Strict):
    key: str
    values: StrList = None
    notValues: StrList = None


class RuleSchema(Strict):
    from_: list[FromSchema] | None = Field(default=None, alias="from")
    to: list[ToSchema] | None = None
    when: list[ConditionSchema] | None = None


class ProviderSchema(Strict):
    name: str


class AuthorizationPolicySpec(Strict):
    selector: WorkloadSelectorSchema | None = None
    targetRef: TargetRefSchema | None = None
    targetRefs: list[TargetRefSchema] | None = None
    action: Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"] | None = None
    provider: ProviderSchema | None = None
    rules: list[RuleSchema] | None = None


MtlsMode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]


class MtlsSchema(Strict):
    mode: MtlsMode | None = None


class PeerAuthenticationSpec(Strict):
    selector: WorkloadSelectorSchema | None = None
    mtls: MtlsSchema | None = None
    portLevelMtls: dict[PortKey, MtlsSchema] | None = None


class JwtHeaderSchema(Strict):
    name: str
    prefix: str | None = None


class ClaimToHeaderSchema(Strict):
    header: str
    claim: str


class JwtRuleSchema(Strict):
    issuer: str
    audiences: StrList = None
    jwksUri: str | None = None
    jwks: str | None = None
    fromHeaders: list[JwtHeaderSchema] | None = None
    fromParams: StrList = None
    fromCookies: StrList = None
    outputPayloadToHeader: str | None = None
    outputClaimToHeaders: list[ClaimToHeaderSchema] | None = None
    forwardOriginalToken: bool | None = None
    timeout: Any = None


class RequestAuthenticationSpec(Strict):
    selector: WorkloadSelectorSchema | None = None
    targetRef: TargetRefSchema | None = None
    targetRefs: list[TargetRefSchema] | None = None
    jwtRules: list[JwtRuleSchema] | None = None


class AuthorizationPolicyDoc(Document):
    spec: AuthorizationPolicySpec | None = None
    status: Any = None


class PeerAuthenticationDoc(Document):
    spec: PeerAuthenticationSpec | None = None
    status: Any = None


class RequestAuthenticationDoc(Document):
    spec: RequestAuthenticationSpec | None = None
    status: Any = None


# --------------------------------------------------------------------------- networking.istio.io


class WorkloadEntrySpec(Strict):
    address: str | None = None
    ports: dict[str, int] | None = None
    labels: StrMap = None
    network: str | None = None
    locality: str | None = None
    weight: int | None = None
    serviceAccount: str | None = None


class WorkloadEntryDoc(Document):
    spec: WorkloadEntrySpec | None = None
    status: Any = None


TlsMode = Literal["PASSTHROUGH", "SIMPLE", "MUTUAL", "AUTO_PASSTHROUGH", "ISTIO_MUTUAL", "OPTIONAL_MUTUAL"]
TlsVersion = Literal["TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3"]


class GatewayPortSchema(Strict):
    number: int
    protocol: str
    name: str | None = None
    targetPort: int | None = None


class ServerTlsSchema(Strict):
    httpsRedirect: bool | None = None
    mode: TlsMode | None = None
    serverCertificate: str | None = None
    privateKey: str | None = None
    caCertificates: str | None = None
    caCrl: str | None = None
    credentialName: str | None = None
    credentialNames: StrList = None
    caCertCredentialName: str | None = None
    tlsCertificates: Any = None
    subjectAltNames: StrList = None
    verifyCertificateSpki: StrList = None
    verifyCertificateHash: StrList = None
    minProtocolVersion: TlsVersion | None = None
    maxProtocolVersion: TlsVersion | None = None
    cipherSuites: StrList = None
    insecureSkipVerify: bool | None = None


class ServerSchema(Strict):
    port: GatewayPortSchema
    hosts: list[str]
    tls: ServerTlsSchema | None = None
    bind: str | None = None
    name: str | None = None
    defaultEndpoint: Any = None


class GatewaySpec(Strict):
    selector: StrMap = None
    servers: list[ServerSchema] | None = None


class GatewayDoc(Document):
    spec: GatewaySpec | None = None
    status: Any = None


class StringMatchSchema(Strict):
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None


class PortSelectorSchema(Strict):
    number: int | None = None


class DestinationSchema(Strict):
    host: str
    subset: str | None = None
    port: PortSelectorSchema | None = None


class HttpRouteDestinationSchema(Strict):
    destination: DestinationSchema
    weight: int | None = None
    headers: Any = None


class HttpMatchSchema(Strict):
    name: str | None = None
    uri: StringMatchSchema | None = None
    scheme: StringMatchSchema | None = None
    method: StringMatchSchema | None = None
    authority: StringMatchSchema | None = None
    headers: dict[str, StringMatchSchema] | None = None
    queryParams: dict[str, StringMatchSchema] | None = None
    port: int | None = None
    ignoreUriCase: bool | None = None
    gateways: StrList = None
    withoutHeaders: Any = None
    sourceLabels: Any = None
    sourceNamespace: Any = None
    statPrefix: Any = None


class HttpRewriteSchema(Strict):
    uri: str | None = None
    authority: str | None = None
    uriRegexRewrite: Any = None


class HttpRouteSchema(Strict):
    name: str | None = None
    match: list[HttpMatchSchema] | None = None
    route: list[HttpRouteDestinationSchema] | None = None
    rewrite: HttpRewriteSchema | None = None
    timeout: str | None = None
    redirect: Any = None
    directResponse: Any = None
    delegate: Any = None
    retries: Any = None
    fault: Any = None
    mirror: Any = None
    mirrors: Any = None
    mirrorPercentage: Any = None
    mirrorPercent: Any = None
    mirror_percent: Any = None
    corsPolicy: Any = None
    headers: Any = None


class RouteDestinationSchema(Strict):
    destination: DestinationSchema
    weight: int | None = None


class L4MatchSchema(Strict):
    """`tcp[].match[]` and `tls[].match[]` (TLS adds `sniHosts`)."""

    sniHosts: StrList = None
    port: int | None = None
    destinationSubnets: Any = None
    sourceSubnet: Any = None
    sourceLabels: Any = None
    gateways: Any = None
    sourceNamespace: Any = None


class L4RouteSchema(Strict):
    match: list[L4MatchSchema] | None = None
    route: list[RouteDestinationSchema] | None = None


class VirtualServiceSpec(Strict):
    hosts: StrList = None
    gateways: StrList = None
    http: list[HttpRouteSchema] | None = None
    tls: list[L4RouteSchema] | None = None
    tcp: list[L4RouteSchema] | None = None
    exportTo: StrList = None


class VirtualServiceDoc(Document):
    spec: VirtualServiceSpec | None = None
    status: Any = None


# --------------------------------------------------------------------- gateway.networking.k8s.io


class ListenerSchema(Strict):
    name: str
    port: int
    protocol: str
    hostname: str | None = None
    tls: Any = None
    allowedRoutes: Any = None


class GatewayAddressSchema(Strict):
    type: str | None = None
    value: str


class K8sGatewaySpec(Strict):
    gatewayClassName: str
    listeners: list[ListenerSchema] | None = None
    addresses: list[GatewayAddressSchema] | None = None
    infrastructure: Any = None
    backendTLS: Any = None
    allowedListeners: Any = None
    tls: Any = None


class K8sGatewayDoc(Document):
    spec: K8sGatewaySpec
    status: Any = None


# ------------------------------------------------------------------------------- zerotunnel.io


PATH_NORMALIZATIONS = ("NONE", "BASE", "DEFAULT", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES")


def _path_normalization(value: Any) -> str:
    """istio-ambient.md §6.3: accept our short form `pathNormalization: BASE` and Istio MeshConfig's
    `pathNormalization: {normalization: BASE}`; `DEFAULT` is `BASE`."""
    if isinstance(value, dict) and set(value) <= {"normalization"}:
        value = value.get("normalization", "BASE")
    if isinstance(value, str) and value in PATH_NORMALIZATIONS:
        return "BASE" if value == "DEFAULT" else value
    raise PydanticCustomError(
        "path_normalization",
        "got {got}; accepted: {accepted} (or {{normalization: <one of them>}})",
        {"got": repr(value), "accepted": ", ".join(PATH_NORMALIZATIONS)},
    )


PathNormalization = Annotated[str, PlainValidator(_path_normalization)]


class MeshConfigSpec(Strict):
    trustDomain: str | None = None
    trustDomainAliases: StrList = None
    rootNamespace: str | None = None
    workloadCertTTL: str | None = None
    maxWorkloadCertTTL: str | None = None
    caDir: str | None = None
    pathNormalization: PathNormalization | None = None


class MeshConfigDoc(Document):
    spec: MeshConfigSpec | None = None


class ListDoc(Strict):
    """`kind: List` (kubectl get -o yaml); each item is validated as its own object."""

    apiVersion: str
    kind: Literal["List"]
    items: list[Any] | None = None
    metadata: Any = None
