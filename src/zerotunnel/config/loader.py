"""`load`: (file name, text) pairs → one validated `Config`, or a `ConfigError` listing every problem.

DESIGN.md §2. Three stages, each collecting problems instead of stopping at the first:
1. parse each file as YAML 1.2 (`yamlload`); a syntax error ends that file, not the load;
2. pick the schema by `apiVersion` + `kind` and validate with pydantic (`schema`);
3. convert to the frozen dataclasses of `model`, checking what the upstream API server or Istio's
   validation webhook would reject (mutually exclusive fields, ranges, base64, durations) and
   duplicate (kind, namespace, name). These checks read typed values, so they run for a document
   only once its schema problems (all reported by stage 2) are fixed.
A single problem anywhere means no `Config` is returned: a bad change never half-applies.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Union

from pydantic import BaseModel, ValidationError

from zerotunnel.config import model as m
from zerotunnel.config import schema as s
from zerotunnel.config.errors import ConfigError, ConfigProblem
from zerotunnel.config.yamlload import parse_documents

Loc = tuple[str | int, ...]


# -------------------------------------------------------------------------------------- kind table


@dataclass(frozen=True, slots=True)
class _Kind:
    group: str
    kind: str
    versions: tuple[str, ...]
    schema: type[s.Document]
    namespaced: bool = True

    @property
    def api_versions(self) -> tuple[str, ...]:
        return tuple(f"{self.group}/{v}" if self.group else v for v in self.versions)


_ISTIO_SECURITY = ("v1", "v1beta1")
_ISTIO_NETWORKING = ("v1", "v1beta1", "v1alpha3")
_GATEWAY_API = ("v1", "v1beta1")

KINDS: tuple[_Kind, ...] = (
    _Kind("", "Namespace", ("v1",), s.NamespaceDoc, namespaced=False),
    _Kind("", "ServiceAccount", ("v1",), s.ServiceAccountDoc),
    _Kind("", "Pod", ("v1",), s.PodDoc),
    _Kind("", "Service", ("v1",), s.ServiceDoc),
    _Kind("", "Node", ("v1",), s.NodeDoc, namespaced=False),
    _Kind("", "Secret", ("v1",), s.SecretDoc),
    _Kind("security.istio.io", "AuthorizationPolicy", _ISTIO_SECURITY, s.AuthorizationPolicyDoc),
    _Kind("security.istio.io", "PeerAuthentication", _ISTIO_SECURITY, s.PeerAuthenticationDoc),
    _Kind("security.istio.io", "RequestAuthentication", _ISTIO_SECURITY, s.RequestAuthenticationDoc),
    _Kind("networking.istio.io", "Gateway", _ISTIO_NETWORKING, s.GatewayDoc),
    _Kind("networking.istio.io", "VirtualService", _ISTIO_NETWORKING, s.VirtualServiceDoc),
    _Kind("networking.istio.io", "WorkloadEntry", _ISTIO_NETWORKING, s.WorkloadEntryDoc),
    _Kind("gateway.networking.k8s.io", "Gateway", _GATEWAY_API, s.K8sGatewayDoc),
    _Kind("zerotunnel.io", "MeshConfig", ("v1alpha1",), s.MeshConfigDoc, namespaced=False),
)
_BY_GROUP_KIND = {(k.group, k.kind): k for k in KINDS}


def accepted_kinds() -> list[str]:
    """`apiVersion kind` for every kind the loader accepts (for messages and `--help`)."""
    return [f"{k.api_versions[0]} {k.kind}" for k in KINDS] + ["v1 List"]


# ----------------------------------------------------------------------------------------- paths


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def format_path(loc: Loc) -> str:
    """`('spec', 'rules', 0, 'from', 1)` → `spec.rules[0].from[1]`; map keys that are not plain
    identifiers (label keys, header names) are written `labels["istio.io/rev"]`."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (key)"
        elif isinstance(part, str) and _IDENT.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(str(part))}]"
    return out


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {value!r}" if len(value) <= 60 else f"string {value[:57]!r}..."
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _unwrap(tp: Any) -> Any:
    """Strip `Annotated[...]` and `X | None` down to the one interesting type."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp


def _model_at(root: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The schema model that the location `loc` (inside a `root` document) points into."""
    tp: Any = root
    for part in loc:
        tp = _unwrap(tp)
        origin = typing.get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            found = next((f for n, f in tp.model_fields.items() if (f.alias or n) == part), None)
            if found is None:
                return None
            tp = found.annotation
        elif origin is list:
            tp = typing.get_args(tp)[0]
        elif origin is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _field_names(model: type[BaseModel]) -> list[str]:
    return sorted(f.alias or n for n, f in model.model_fields.items())


_TYPE_WORDS = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _message(error: Mapping[str, Any], root: type[BaseModel]) -> str:
    kind = error["type"]
    value = error.get("input")
    loc: Loc = tuple(error["loc"])
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        accepted = f"; accepted fields here: {', '.join(_field_names(parent))}" if parent else ""
        return f"unknown field {str(loc[-1])!r}{accepted}"
    if kind == "bool_type":
        hint = " (YAML 1.2: only true/false are booleans)" if isinstance(value, str) else ""
        return f"expected true or false, got {_describe(value)}{hint}"
    if kind == "literal_error":
        return f"got {_describe(value)}; accepted: {error.get('ctx', {}).get('expected', '')}"
    if kind in _TYPE_WORDS:
        hint = ""
        if kind == "string_type" and isinstance(value, (bool, int, float)):
            hint = " (quote it to make it a string)"
        return f"expected {_TYPE_WORDS[kind]}, got {_describe(value)}{hint}"
    if kind in ("int_or_string", "port_key", "path_normalization"):
        return str(error["msg"])
    return f"{error['msg']} (got {_describe(value)})"


# --------------------------------------------------------------------------------------- context


@dataclass
class _Doc:
    """Where problems in the current document are reported."""

    file: str
    index: int
    problems: list[ConfigProblem]
    prefix: Loc = ()
    resource: str = ""

    def report(self, loc: Loc, message: str) -> None:
        self.problems.append(
            ConfigProblem(self.file, self.index, format_path(self.prefix + loc), message, self.resource)
        )


@dataclass
class _Collected:
    mesh: list[tuple[m.MeshConfig, str]] = field(default_factory=list)
    objects: dict[str, list[Any]] = field(default_factory=dict)
    seen: dict[tuple[str, str, str], str] = field(default_factory=dict)
    order: int = 0


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")
_DURATION_UNITS = {
    "ns": timedelta(microseconds=0.001),
    "us": timedelta(microseconds=1),
    "µs": timedelta(microseconds=1),
    "ms": timedelta(milliseconds=1),
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
}


def parse_duration(text: str) -> timedelta | None:
    """Go duration syntax (`90s`, `1h30m`) plus `d` for days; None when it does not parse."""
    if not text or _DURATION.sub("", text) != "":
        return None
    total = timedelta()
    for number, unit in _DURATION.findall(text):
        total += float(number) * _DURATION_UNITS[unit]
    return total


def _parse_timestamp(text: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _tuple(values: Sequence[str] | None) -> tuple[str, ...]:
    return tuple(values or ())


def _fmap(values: Mapping[str, str] | None) -> m.FrozenMap[str, str]:
    return m.FrozenMap(values or {})


def _check_port(doc: _Doc, loc: Loc, port: int | None) -> None:
    if port is not None and not 1 <= port <= 65535:
        doc.report(loc, f"port {port} is out of range; accepted: 1-65535")


# ------------------------------------------------------------------------------------- converters


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_SUBDOMAIN_RULE = "lower-case letters, digits, '-' and '.', starting and ending with a letter or digit"


def _check_name(doc: _Doc, loc: Loc, value: str, *, label: bool = False) -> bool:
    """Kubernetes object names: a DNS-1123 subdomain (≤ 253), or a DNS-1123 label (≤ 63) for
    namespaces. They end up in SPIFFE IDs and DNS names, so a bad one is rejected here, as the API
    server would."""
    limit, pattern = (63, _DNS_LABEL) if label else (253, _DNS_SUBDOMAIN)
    if len(value) <= limit and pattern.match(value):
        return True
    rule = _SUBDOMAIN_RULE.replace(", '-' and '.'", " and '-'") if label else _SUBDOMAIN_RULE
    doc.report(loc, f"{value!r} is not a valid name; accepted: {rule}, at most {limit} characters")
    return False


def _check_labels(doc: _Doc, loc: Loc, labels: Mapping[str, str]) -> None:
    """Kubernetes label syntax: `[prefix/]name` keys and short values (selectors compare them)."""
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if (prefix and not (len(prefix) <= 253 and _DNS_SUBDOMAIN.match(prefix))) or not (
            len(name) <= 63 and _LABEL_NAME.match(name)
        ):
            doc.report(
                (*loc, key),
                "is not a valid label key; accepted: an optional DNS-subdomain prefix and '/', then at most "
                "63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit",
            )
        elif value and not (len(value) <= 63 and _LABEL_NAME.match(value)):
            doc.report(
                (*loc, key),
                f"{value!r} is not a valid label value; accepted: empty, or at most 63 letters, digits, "
                "'-', '_' or '.', starting and ending with a letter or digit",
            )


def _meta(doc: _Doc, kind: _Kind, data: s.Document, order: int) -> m.ObjectMeta | None:
    meta = data.metadata or s.ObjectMetaSchema()
    name = meta.name
    if not name:
        if kind.kind == "MeshConfig":
            name = "mesh"
        else:
            doc.report(("metadata", "name"), "required field is missing")
            return None
    _check_name(doc, ("metadata", "name"), name, label=kind.kind == "Namespace")
    if kind.namespaced and meta.namespace:
        _check_name(doc, ("metadata", "namespace"), meta.namespace, label=True)
    _check_labels(doc, ("metadata", "labels"), meta.labels or {})
    created = None
    if meta.creationTimestamp is not None:
        created = _parse_timestamp(meta.creationTimestamp)
        if created is None:
            doc.report(
                ("metadata", "creationTimestamp"),
                f"got {_describe(meta.creationTimestamp)}; accepted: an RFC 3339 time such as "
                "2024-05-01T12:00:00Z",
            )
    namespace = (meta.namespace or "default") if kind.namespaced else ""
    return m.ObjectMeta(
        name=name,
        namespace=namespace,
        labels=_fmap(meta.labels),
        annotations=_fmap(meta.annotations),
        creation_timestamp=created,
        order=order,
    )


def _selector(sel: s.WorkloadSelectorSchema | None) -> m.WorkloadSelector | None:
    return None if sel is None else m.WorkloadSelector(_fmap(sel.matchLabels))


def _target_refs(
    doc: _Doc, spec: s.AuthorizationPolicySpec | s.RequestAuthenticationSpec
) -> tuple[m.PolicyTargetReference, ...]:
    """istio-ambient.md §4.4: `targetRef` (deprecated singular) or `targetRefs` (at most 16), never
    together with `selector`."""
    if spec.targetRef is not None and spec.targetRefs is not None:
        doc.report(("spec",), "targetRef and targetRefs are mutually exclusive; use targetRefs")
    refs = spec.targetRefs or ([spec.targetRef] if spec.targetRef is not None else [])
    if refs and spec.selector is not None:
        doc.report(("spec",), "selector and targetRefs are mutually exclusive; use one of them")
    if len(refs) > 16:
        doc.report(("spec", "targetRefs"), f"{len(refs)} targetRefs; accepted: at most 16")
    return tuple(m.PolicyTargetReference(r.group or "", r.kind, r.name, r.namespace) for r in refs)


_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def _source(doc: _Doc, loc: Loc, src: s.SourceSchema | None) -> m.Source:
    if src is None:
        doc.report((*loc, "source"), "required field is missing")
        return m.Source()
    if all(getattr(src, n) is None for n in s.SourceSchema.model_fields):
        doc.report((*loc, "source"), "must not be empty; set at least one field")
    if (src.serviceAccounts or src.notServiceAccounts) and (
        src.principals or src.notPrincipals or src.namespaces or src.notNamespaces
    ):
        doc.report(
            (*loc, "source"),
            "serviceAccounts cannot be combined with principals or namespaces (Istio CRD validation)",
        )
    return m.Source(
        principals=_tuple(src.principals),
        not_principals=_tuple(src.notPrincipals),
        request_principals=_tuple(src.requestPrincipals),
        not_request_principals=_tuple(src.notRequestPrincipals),
        namespaces=_tuple(src.namespaces),
        not_namespaces=_tuple(src.notNamespaces),
        ip_blocks=_tuple(src.ipBlocks),
        not_ip_blocks=_tuple(src.notIpBlocks),
        remote_ip_blocks=_tuple(src.remoteIpBlocks),
        not_remote_ip_blocks=_tuple(src.notRemoteIpBlocks),
        service_accounts=_tuple(src.serviceAccounts),
        not_service_accounts=_tuple(src.notServiceAccounts),
        trust_domains=_tuple(src.trustDomains),
        not_trust_domains=_tuple(src.notTrustDomains),
    )


def _operation(doc: _Doc, loc: Loc, op: s.OperationSchema | None) -> m.Operation:
    if op is None:
        doc.report((*loc, "operation"), "required field is missing")
        return m.Operation()
    if all(getattr(op, n) is None for n in s.OperationSchema.model_fields):
        doc.report((*loc, "operation"), "must not be empty; set at least one field")
    return m.Operation(
        hosts=_tuple(op.hosts),
        not_hosts=_tuple(op.notHosts),
        ports=_tuple(op.ports),
        not_ports=_tuple(op.notPorts),
        methods=_tuple(op.methods),
        not_methods=_tuple(op.notMethods),
        paths=_tuple(op.paths),
        not_paths=_tuple(op.notPaths),
    )


def _rule(doc: _Doc, loc: Loc, rule: s.RuleSchema) -> m.Rule:
    for name, entries in (("from", rule.from_), ("to", rule.to), ("when", rule.when)):
        if entries is not None and not entries:
            doc.report((*loc, name), "must not be an empty list; omit it to match anything")
    conditions = []
    for i, cond in enumerate(rule.when or ()):
        if not cond.values and not cond.notValues:
            doc.report((*loc, "when", i), "set values or notValues")
        conditions.append(m.Condition(cond.key, _tuple(cond.values), _tuple(cond.notValues)))
    return m.Rule(
        from_=tuple(_source(doc, (*loc, "from", i), f.source) for i, f in enumerate(rule.from_ or ())),
        to=tuple(_operation(doc, (*loc, "to", i), t.operation) for i, t in enumerate(rule.to or ())),
        when=tuple(conditions),
    )


def _authorization_policy(doc: _Doc, meta: m.ObjectMeta, data: s.AuthorizationPolicyDoc) -> Any:
    spec = data.spec or s.AuthorizationPolicySpec()
    refs = _target_refs(doc, spec)
    action = spec.action or "ALLOW"
    provider = spec.provider.name if spec.provider is not None else None
    if action == "CUSTOM" and provider is None:
        doc.report(("spec", "provider"), "required when action is CUSTOM")
    if action != "CUSTOM" and provider is not None:
        doc.report(("spec", "provider"), f"only allowed with action CUSTOM, not {action}")
    annotation = meta.annotations.get(m.DRY_RUN_ANNOTATION)
    return m.AuthorizationPolicy(
        meta=meta,
        selector=_selector(spec.selector),
        target_refs=refs,
        action=action,
        provider=provider,
        rules=tuple(_rule(doc, ("spec", "rules", i), r) for i, r in enumerate(spec.rules or ())),
        dry_run=annotation in _TRUE,
        dry_run_annotation_invalid=annotation is not None and annotation not in _TRUE | _FALSE,
    )


def _peer_authentication(doc: _Doc, meta: m.ObjectMeta, data: s.PeerAuthenticationDoc) -> Any:
    """istio-ambient.md §5.1: `portLevelMtls` needs a selector; ports are workload ports."""
    spec = data.spec or s.PeerAuthenticationSpec()
    ports: dict[int, str] = {}
    for port, mtls in (spec.portLevelMtls or {}).items():
        _check_port(doc, ("spec", "portLevelMtls", port), port)
        ports[port] = mtls.mode or "UNSET"
    if ports and spec.selector is None:
        doc.report(("spec", "portLevelMtls"), "requires a selector (port-level mTLS applies to workloads)")
    return m.PeerAuthentication(
        meta=meta,
        selector=_selector(spec.selector),
        mtls_mode=(spec.mtls.mode if spec.mtls is not None and spec.mtls.mode else "UNSET"),
        port_level_mtls=m.FrozenMap(ports),
    )


def _request_authentication(doc: _Doc, meta: m.ObjectMeta, data: s.RequestAuthenticationDoc) -> Any:
    spec = data.spec or s.RequestAuthenticationSpec()
    rules = []
    for i, r in enumerate(spec.jwtRules or ()):
        if not r.issuer:
            doc.report(("spec", "jwtRules", i, "issuer"), "must not be empty")
        rules.append(
            m.JwtRule(
                issuer=r.issuer,
                audiences=_tuple(r.audiences),
                jwks=r.jwks,
                jwks_uri=r.jwksUri,
                from_headers=tuple((h.name, h.prefix or "") for h in r.fromHeaders or ()),
                from_params=_tuple(r.fromParams),
                forward_original_token=bool(r.forwardOriginalToken),
                output_payload_to_header=r.outputPayloadToHeader,
                output_claim_to_headers=tuple((h.header, h.claim) for h in r.outputClaimToHeaders or ()),
                from_cookies=_tuple(r.fromCookies),
            )
        )
    return m.RequestAuthentication(
        meta=meta,
        selector=_selector(spec.selector),
        target_refs=_target_refs(doc, spec),
        jwt_rules=tuple(rules),
    )


def _container(doc: _Doc, loc: Loc, c: s.ContainerSchema) -> m.Container:
    ports = []
    for i, p in enumerate(c.ports or ()):
        _check_port(doc, (*loc, "ports", i, "containerPort"), p.containerPort)
        ports.append(m.ContainerPort(p.name, p.containerPort, p.protocol or "TCP"))
    return m.Container(
        name=c.name,
        image=c.image,
        command=_tuple(c.command),
        args=_tuple(c.args),
        env=tuple(m.EnvVar(e.name, e.value if e.valueFrom is None else None) for e in c.env or ()),
        ports=tuple(ports),
        working_dir=c.workingDir,
    )


def _pod(doc: _Doc, meta: m.ObjectMeta, data: s.PodDoc) -> Any:
    spec = data.spec
    if not spec.containers:
        doc.report(("spec", "containers"), "must list at least one container")
    for field_name in ("serviceAccountName", "serviceAccount"):
        value = getattr(spec, field_name)
        if value:
            _check_name(doc, ("spec", field_name), value)
    return m.Pod(
        meta=meta,
        service_account=spec.serviceAccountName or spec.serviceAccount or "default",
        node_name=spec.nodeName,
        containers=tuple(
            _container(doc, ("spec", "containers", i), c) for i, c in enumerate(spec.containers)
        ),
        pod_ip=data.status.podIP if data.status is not None else None,
        host_network=bool(spec.hostNetwork),
        init_containers=tuple(
            _container(doc, ("spec", "initContainers", i), c) for i, c in enumerate(spec.initContainers or ())
        ),
    )


def _service(doc: _Doc, meta: m.ObjectMeta, data: s.ServiceDoc) -> Any:
    spec = data.spec or s.ServiceSpecSchema()
    ports = []
    for i, p in enumerate(spec.ports or ()):
        _check_port(doc, ("spec", "ports", i, "port"), p.port)
        target: int | str = p.port if p.targetPort is None else p.targetPort
        if isinstance(target, int):
            _check_port(doc, ("spec", "ports", i, "targetPort"), target)
        elif not target:
            doc.report(("spec", "ports", i, "targetPort"), "must not be empty; give a number or a port name")
        ports.append(m.ServicePort(p.name, p.port, target, p.protocol or "TCP", p.appProtocol))
    return m.Service(
        meta=meta,
        selector=None if spec.selector is None else _fmap(spec.selector),
        ports=tuple(ports),
        cluster_ip=spec.clusterIP,
        type=spec.type or "ClusterIP",
    )


def _secret(doc: _Doc, meta: m.ObjectMeta, data: s.SecretDoc) -> Any:
    """Kubernetes semantics: `data` is base64, `stringData` is plain text and wins on a clash."""
    values: dict[str, bytes] = {}
    for key, text in (data.data or {}).items():
        try:
            values[key] = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            doc.report(("data", key), "is not valid base64 (use stringData for plain text)")
    for key, text in (data.stringData or {}).items():
        values[key] = text.encode()
    return m.Secret(meta=meta, type=data.type or "Opaque", data=m.FrozenMap(values))


def _workload_entry(doc: _Doc, meta: m.ObjectMeta, data: s.WorkloadEntryDoc) -> Any:
    spec = data.spec or s.WorkloadEntrySpec()
    for name, port in (spec.ports or {}).items():
        _check_port(doc, ("spec", "ports", name), port)
    if spec.serviceAccount:
        _check_name(doc, ("spec", "serviceAccount"), spec.serviceAccount)
    _check_labels(doc, ("spec", "labels"), spec.labels or {})
    return m.WorkloadEntry(
        meta=meta,
        address=spec.address,
        labels=_fmap(spec.labels),
        service_account=spec.serviceAccount or "default",
        ports=m.FrozenMap(spec.ports or {}),
        network=spec.network,
        locality=spec.locality,
        weight=spec.weight,
    )


def _server_tls(tls: s.ServerTlsSchema) -> m.ServerTLS:
    return m.ServerTLS(
        mode=tls.mode or "PASSTHROUGH",
        https_redirect=bool(tls.httpsRedirect),
        credential_name=tls.credentialName,
        credential_names=_tuple(tls.credentialNames),
        server_certificate=tls.serverCertificate,
        private_key=tls.privateKey,
        ca_certificates=tls.caCertificates,
        ca_crl=tls.caCrl,
        subject_alt_names=_tuple(tls.subjectAltNames),
        verify_certificate_spki=_tuple(tls.verifyCertificateSpki),
        verify_certificate_hash=_tuple(tls.verifyCertificateHash),
        min_protocol_version=tls.minProtocolVersion or "TLS_AUTO",
        max_protocol_version=tls.maxProtocolVersion or "TLS_AUTO",
        cipher_suites=_tuple(tls.cipherSuites),
        ca_cert_credential_name=tls.caCertCredentialName,
        insecure_skip_verify=bool(tls.insecureSkipVerify),
    )


def _gateway(doc: _Doc, meta: m.ObjectMeta, data: s.GatewayDoc) -> Any:
    spec = data.spec or s.GatewaySpec()
    servers = []
    for i, srv in enumerate(spec.servers or ()):
        loc: Loc = ("spec", "servers", i)
        _check_port(doc, (*loc, "port", "number"), srv.port.number)
        _check_port(doc, (*loc, "port", "targetPort"), srv.port.targetPort)
        if not srv.hosts:
            doc.report((*loc, "hosts"), 'must list at least one host ("*" for any)')
        tls = _server_tls(srv.tls) if srv.tls is not None else None
        if tls is not None and tls.subject_alt_names and tls.mode not in ("MUTUAL", "OPTIONAL_MUTUAL"):
            doc.report((*loc, "tls", "subjectAltNames"), "requires mode MUTUAL or OPTIONAL_MUTUAL")
        servers.append(
            m.Server(
                port=m.GatewayPort(srv.port.number, srv.port.protocol, srv.port.name, srv.port.targetPort),
                hosts=tuple(srv.hosts),
                tls=tls,
                bind=srv.bind,
                name=srv.name,
            )
        )
    return m.Gateway(meta=meta, selector=_fmap(spec.selector), servers=tuple(servers))


def _string_match(doc: _Doc, loc: Loc, sm: s.StringMatchSchema | None) -> m.StringMatch | None:
    if sm is None:
        return None
    set_ = [
        (k, v) for k, v in (("exact", sm.exact), ("prefix", sm.prefix), ("regex", sm.regex)) if v is not None
    ]
    if len(set_) != 1:
        doc.report(loc, "set exactly one of exact, prefix or regex")
        return None
    if set_[0][0] == "regex":
        try:
            re.compile(set_[0][1])
        except re.error as exc:
            doc.report((*loc, "regex"), f"invalid regular expression: {exc}")
    return m.StringMatch(*set_[0])


def _string_matches(
    doc: _Doc, loc: Loc, matches: Mapping[str, s.StringMatchSchema] | None
) -> m.FrozenMap[str, m.StringMatch]:
    out = {}
    for key, sm in (matches or {}).items():
        converted = _string_match(doc, (*loc, key), sm)
        if converted is not None:
            out[key] = converted
    return m.FrozenMap(out)


def _destination(doc: _Doc, loc: Loc, d: s.RouteDestinationSchema | s.HttpRouteDestinationSchema) -> Any:
    port = d.destination.port.number if d.destination.port is not None else None
    _check_port(doc, (*loc, "destination", "port", "number"), port)
    if d.weight is not None and not 0 <= d.weight <= 100:
        doc.report((*loc, "weight"), f"{d.weight} is out of range; accepted: 0-100")
    return m.HTTPRouteDestination(m.Destination(d.destination.host, d.destination.subset, port), d.weight)


def _virtual_service(doc: _Doc, meta: m.ObjectMeta, data: s.VirtualServiceDoc) -> Any:
    spec = data.spec or s.VirtualServiceSpec()
    http = []
    for i, route in enumerate(spec.http or ()):
        loc: Loc = ("spec", "http", i)
        matches = []
        for j, mr in enumerate(route.match or ()):
            mloc: Loc = (*loc, "match", j)
            matches.append(
                m.HTTPMatchRequest(
                    name=mr.name,
                    uri=_string_match(doc, (*mloc, "uri"), mr.uri),
                    scheme=_string_match(doc, (*mloc, "scheme"), mr.scheme),
                    method=_string_match(doc, (*mloc, "method"), mr.method),
                    authority=_string_match(doc, (*mloc, "authority"), mr.authority),
                    headers=_string_matches(doc, (*mloc, "headers"), mr.headers),
                    query_params=_string_matches(doc, (*mloc, "queryParams"), mr.queryParams),
                    port=mr.port,
                    ignore_uri_case=bool(mr.ignoreUriCase),
                    gateways=_tuple(mr.gateways),
                )
            )
        timeout = None
        if route.timeout is not None:
            timeout = parse_duration(route.timeout)
            if timeout is None:
                doc.report(
                    (*loc, "timeout"), f"got {_describe(route.timeout)}; accepted: a duration like 1.5s"
                )
        rewrite = m.HTTPRewrite(route.rewrite.uri, route.rewrite.authority) if route.rewrite else None
        http.append(
            m.HTTPRoute(
                name=route.name,
                match=tuple(matches),
                route=tuple(
                    _destination(doc, (*loc, "route", j), d) for j, d in enumerate(route.route or ())
                ),
                rewrite=rewrite,
                timeout=timeout,
            )
        )

    def l4(section: str, routes: Sequence[s.L4RouteSchema] | None) -> tuple[m.TCPRoute, ...]:
        return tuple(
            m.TCPRoute(
                route=tuple(
                    _destination(doc, ("spec", section, i, "route", j), d)
                    for j, d in enumerate(r.route or ())
                ),
                sni_hosts=tuple(h for mt in r.match or () for h in mt.sniHosts or ()),
                ports=tuple(mt.port for mt in r.match or () if mt.port is not None),
            )
            for i, r in enumerate(routes or ())
        )

    return m.VirtualService(
        meta=meta,
        hosts=_tuple(spec.hosts),
        gateways=_tuple(spec.gateways),
        http=tuple(http),
        tcp=l4("tcp", spec.tcp),
        tls=l4("tls", spec.tls),
        export_to=_tuple(spec.exportTo),
    )


def _k8s_gateway(doc: _Doc, meta: m.ObjectMeta, data: s.K8sGatewayDoc) -> Any:
    spec = data.spec
    for i, listener in enumerate(spec.listeners or ()):
        _check_port(doc, ("spec", "listeners", i, "port"), listener.port)
    waypoint_for = meta.labels.get(m.WAYPOINT_FOR_LABEL)
    if waypoint_for is not None and waypoint_for not in ("service", "workload", "all", "none"):
        doc.report(
            ("metadata", "labels", m.WAYPOINT_FOR_LABEL),
            f"got {waypoint_for!r}; accepted: service, workload, all, none",
        )
    return m.K8sGateway(
        meta=meta,
        gateway_class_name=spec.gatewayClassName,
        listeners=tuple(m.Listener(x.name, x.port, x.protocol, x.hostname) for x in spec.listeners or ()),
        addresses=tuple(a.value for a in spec.addresses or ()),
    )


_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")


def _mesh_config(doc: _Doc, meta: m.ObjectMeta, data: s.MeshConfigDoc) -> Any:
    spec = data.spec or s.MeshConfigSpec()
    defaults = m.MeshConfig()
    for i, td in enumerate([spec.trustDomain, *list(spec.trustDomainAliases or ())]):
        loc: Loc = ("spec", "trustDomain") if i == 0 else ("spec", "trustDomainAliases", i - 1)
        if td is not None and not _TRUST_DOMAIN.match(td):
            doc.report(
                loc, f"got {td!r}; accepted: a SPIFFE trust domain (lower-case letters, digits, . - _)"
            )

    def ttl(name: str, text: str | None, default: timedelta) -> timedelta:
        if text is None:
            return default
        value = parse_duration(text)
        if value is None or value <= timedelta():
            doc.report(
                ("spec", name), f"got {_describe(text)}; accepted: a positive duration like 24h, 90d, 30m"
            )
            return default
        return value

    if spec.rootNamespace is not None:
        _check_name(doc, ("spec", "rootNamespace"), spec.rootNamespace, label=True)
    cert_ttl = ttl("workloadCertTTL", spec.workloadCertTTL, defaults.workload_cert_ttl)
    max_ttl = ttl("maxWorkloadCertTTL", spec.maxWorkloadCertTTL, defaults.max_workload_cert_ttl)
    if cert_ttl > max_ttl:
        doc.report(("spec", "workloadCertTTL"), "must not exceed maxWorkloadCertTTL")
    return m.MeshConfig(
        trust_domain=spec.trustDomain or defaults.trust_domain,
        trust_domain_aliases=_tuple(spec.trustDomainAliases),
        root_namespace=spec.rootNamespace or defaults.root_namespace,
        workload_cert_ttl=cert_ttl,
        max_workload_cert_ttl=max_ttl,
        ca_dir=spec.caDir,
        path_normalization=spec.pathNormalization or defaults.path_normalization,
    )


def _simple(cls: Callable[[m.ObjectMeta], Any]) -> Callable[[_Doc, m.ObjectMeta, Any], Any]:
    return lambda _doc, meta, _data: cls(meta)


def _node(doc: _Doc, meta: m.ObjectMeta, data: s.NodeDoc) -> Any:
    return m.Node(
        meta=meta,
        pod_cidr=data.spec.podCIDR if data.spec is not None else None,
        addresses=tuple(
            m.NodeAddress(a.type, a.address)
            for a in (data.status.addresses or () if data.status is not None else ())
        ),
    )


_CONVERTERS: dict[tuple[str, str], tuple[str, Callable[[_Doc, m.ObjectMeta, Any], Any]]] = {
    ("", "Namespace"): ("namespaces", _simple(m.Namespace)),
    ("", "ServiceAccount"): ("service_accounts", _simple(m.ServiceAccount)),
    ("", "Pod"): ("pods", _pod),
    ("", "Service"): ("services", _service),
    ("", "Node"): ("nodes", _node),
    ("", "Secret"): ("secrets", _secret),
    ("security.istio.io", "AuthorizationPolicy"): ("authorization_policies", _authorization_policy),
    ("security.istio.io", "PeerAuthentication"): ("peer_authentications", _peer_authentication),
    ("security.istio.io", "RequestAuthentication"): ("request_authentications", _request_authentication),
    ("networking.istio.io", "Gateway"): ("gateways", _gateway),
    ("networking.istio.io", "VirtualService"): ("virtual_services", _virtual_service),
    ("networking.istio.io", "WorkloadEntry"): ("workload_entries", _workload_entry),
    ("gateway.networking.k8s.io", "Gateway"): ("k8s_gateways", _k8s_gateway),
    ("zerotunnel.io", "MeshConfig"): ("mesh", _mesh_config),
}


# -------------------------------------------------------------------------------------- the load


def _resource_name(data: Mapping[Any, Any]) -> str:
    kind = data.get("kind")
    meta = data.get("metadata")
    if not isinstance(kind, str):
        return ""
    if isinstance(meta, dict) and isinstance(meta.get("name"), str):
        ns = meta.get("namespace")
        return f"{kind} {ns}/{meta['name']}" if isinstance(ns, str) else f"{kind} {meta['name']}"
    return kind


def _find_kind(doc: _Doc, api_version: str, kind: str) -> _Kind | None:
    group, _, version = api_version.rpartition("/")
    known = _BY_GROUP_KIND.get((group, kind))
    if known is not None and version in known.versions:
        return known
    same_name = [k for k in KINDS if k.kind == kind]
    if same_name:
        accepted = ", ".join(v for k in same_name for v in k.api_versions)
        doc.report(
            ("apiVersion",), f"kind {kind} is not served by apiVersion {api_version!r}; accepted: {accepted}"
        )
    else:
        doc.report(
            ("kind",), f"unknown kind {kind!r} ({api_version}); accepted: {', '.join(accepted_kinds())}"
        )
    return None


def _load_object(doc: _Doc, data: Any, out: _Collected) -> None:
    if not isinstance(data, dict):
        doc.report((), f"expected a mapping with apiVersion and kind, got {_describe(data)}")
        return
    doc.resource = _resource_name(data)
    api_version, kind = data.get("apiVersion"), data.get("kind")
    bad = False
    for name, value in (("apiVersion", api_version), ("kind", kind)):
        if not isinstance(value, str) or not value:
            doc.report(
                (name,),
                "required field is missing"
                if value is None
                else f"expected a string, got {_describe(value)}",
            )
            bad = True
    if bad:
        return
    assert isinstance(api_version, str) and isinstance(kind, str)
    if kind == "List" and api_version == "v1":
        _load_list(doc, data, out)
        return
    known = _find_kind(doc, api_version, kind)
    if known is None:
        return
    try:
        validated = known.schema.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            doc.report(tuple(error["loc"]), _message(error, known.schema))
        return
    before = len(doc.problems)
    meta = _meta(doc, known, validated, out.order)
    if meta is None:
        return
    out.order += 1
    if known.namespaced:
        doc.resource = f"{kind} {meta.namespace}/{meta.name}"
    else:
        doc.resource = f"{kind} {meta.name}"
    attr, convert = _CONVERTERS[(known.group, known.kind)]
    obj = convert(doc, meta, validated)
    if len(doc.problems) != before:
        return
    where = f"{doc.file}: document {doc.index}" + (f" ({format_path(doc.prefix)})" if doc.prefix else "")
    if attr == "mesh":
        if out.mesh:
            doc.report((), f"a second MeshConfig; only one is accepted (the first is in {out.mesh[0][1]})")
            return
        out.mesh.append((obj, where))
        return
    key = (f"{known.group}/{known.kind}", meta.namespace, meta.name)
    first = out.seen.get(key)
    if first is not None:
        doc.report(
            ("metadata", "name"),
            f"duplicate {kind} {meta.namespace or '-'}/{meta.name}; first defined in {first}",
        )
        return
    out.seen[key] = where
    out.objects.setdefault(attr, []).append(obj)


def _load_list(doc: _Doc, data: Mapping[Any, Any], out: _Collected) -> None:
    try:
        listed = s.ListDoc.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            doc.report(tuple(error["loc"]), _message(error, s.ListDoc))
        return
    for i, item in enumerate(listed.items or ()):
        _load_object(_Doc(doc.file, doc.index, doc.problems, (*doc.prefix, "items", i)), item, out)


def load(files: Sequence[tuple[str, str]]) -> m.Config:
    """Load (file name, text) pairs, in the order given, into one `Config`.

    Raises `ConfigError` carrying every problem found in every file; nothing is returned unless
    the whole configuration is valid.
    """
    problems: list[ConfigProblem] = []
    out = _Collected()
    for name, text in files:
        documents, failure = parse_documents(name, text)
        for parsed in documents:
            _load_object(_Doc(name, parsed.index, problems), parsed.data, out)
        if failure is not None:
            problems.append(ConfigProblem(name, failure.index, "", failure.message))
    if problems:
        raise ConfigError(problems)
    objects = {k: tuple(v) for k, v in out.objects.items()}
    mesh = out.mesh[0][0] if out.mesh else m.MeshConfig()
    return m.Config(mesh=mesh, **objects)
