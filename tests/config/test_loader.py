"""zerotunnel.config.loader: every kind loads; every problem is reported with file, document, path."""

from __future__ import annotations

import contextlib
import json
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zerotunnel.config import ConfigError, ConfigProblem, load, parse_duration
from zerotunnel.config import model as m
from zerotunnel.config.loader import KINDS, _Kind, accepted_kinds, format_path
from zerotunnel.control.files import read_config_paths
from zerotunnel.errors import InputError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "config"


def y(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def load1(text: str) -> m.Config:
    return load([("t.yaml", y(text))])


def problems(text: str, name: str = "t.yaml") -> tuple[ConfigProblem, ...]:
    with pytest.raises(ConfigError) as info:
        load([(name, y(text))])
    return info.value.errors


def one_problem(text: str) -> ConfigProblem:
    found = problems(text)
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


# ------------------------------------------------------------------------------- every kind loads

KIND_CASES = [
    (
        "namespace",
        """
        apiVersion: v1
        kind: Namespace
        metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}, uid: abc, resourceVersion: "12"}
        status: {phase: Active}
        """,
        "namespaces",
        lambda o: (
            o.meta.name == "demo"
            and o.meta.namespace == ""
            and o.meta.labels["istio.io/dataplane-mode"] == "ambient"
        ),
    ),
    (
        "serviceaccount",
        """
        apiVersion: v1
        kind: ServiceAccount
        metadata: {name: sleep, namespace: demo}
        automountServiceAccountToken: false
        """,
        "service_accounts",
        lambda o: (o.meta.namespace, o.meta.name) == ("demo", "sleep"),
    ),
    (
        "pod",
        """
        apiVersion: v1
        kind: Pod
        metadata: {name: web, namespace: demo, labels: {app: web}}
        spec:
          serviceAccountName: web-sa
          nodeName: node-a
          containers:
          - name: app
            image: nginx
            command: [python3, -m, http.server]
            args: ["8080"]
            env: [{name: A, value: b}, {name: C, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
            ports: [{name: http, containerPort: 8080, protocol: TCP}]
        status: {podIP: 10.0.0.5, phase: Running}
        """,
        "pods",
        lambda o: (
            o.service_account == "web-sa"
            and o.node_name == "node-a"
            and o.pod_ip == "10.0.0.5"
            and o.containers[0].command == ("python3", "-m", "http.server")
            and o.containers[0].args == ("8080",)
            and o.containers[0].env == (m.EnvVar("A", "b"), m.EnvVar("C", None))
            and o.containers[0].ports == (m.ContainerPort("http", 8080, "TCP"),)
        ),
    ),
    (
        "service",
        """
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: demo}
        spec:
          selector: {app: web}
          clusterIP: 10.96.0.10
          ports:
          - {name: http, port: 80, targetPort: http, appProtocol: http}
          - {port: 9090}
        """,
        "services",
        lambda o: (
            o.selector == {"app": "web"}
            and o.cluster_ip == "10.96.0.10"
            and o.ports
            == (
                m.ServicePort("http", 80, "http", "TCP", "http"),
                m.ServicePort(None, 9090, 9090, "TCP", None),
            )
            and o.hostname == "web.demo.svc.cluster.local"
        ),
    ),
    (
        "node",
        """
        apiVersion: v1
        kind: Node
        metadata: {name: node-a, namespace: ignored}
        spec: {podCIDR: 10.244.1.0/24}
        status: {addresses: [{type: InternalIP, address: 172.18.0.2}]}
        """,
        "nodes",
        lambda o: (
            o.meta.namespace == ""
            and o.pod_cidr == "10.244.1.0/24"
            and o.addresses == (m.NodeAddress("InternalIP", "172.18.0.2"),)
        ),
    ),
    (
        "secret",
        """
        apiVersion: v1
        kind: Secret
        metadata: {name: cert, namespace: istio-system}
        type: kubernetes.io/tls
        data: {tls.crt: aGVsbG8=, ca.crt: Y2E=}
        stringData: {ca.crt: plain}
        """,
        "secrets",
        lambda o: o.type == "kubernetes.io/tls" and dict(o.data) == {"tls.crt": b"hello", "ca.crt": b"plain"},
    ),
    (
        "authorizationpolicy v1",
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow, namespace: demo}
        spec:
          selector: {matchLabels: {app: web}}
          rules:
          - from: [{source: {principals: [cluster.local/ns/demo/sa/sleep], notNamespaces: [x]}}]
            to: [{operation: {ports: ["8080"], methods: [GET], paths: ["/api/*"]}}]
            when: [{key: "request.headers[x-env]", values: [prod], notValues: [dev]}]
        """,
        "authorization_policies",
        lambda o: (
            o.action == "ALLOW"
            and o.selector == m.WorkloadSelector(m.FrozenMap({"app": "web"}))
            and o.rules[0].from_[0].principals == ("cluster.local/ns/demo/sa/sleep",)
            and o.rules[0].from_[0].not_namespaces == ("x",)
            and o.rules[0].to[0] == m.Operation(ports=("8080",), methods=("GET",), paths=("/api/*",))
            and o.rules[0].when == (m.Condition("request.headers[x-env]", ("prod",), ("dev",)),)
            and not o.dry_run
        ),
    ),
    (
        "authorizationpolicy v1beta1 targetRefs deny",
        """
        apiVersion: security.istio.io/v1beta1
        kind: AuthorizationPolicy
        metadata: {name: deny, namespace: demo, annotations: {istio.io/dry-run: "true"}}
        spec:
          targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
          action: DENY
          rules: [{}]
        """,
        "authorization_policies",
        lambda o: (
            o.action == "DENY"
            and o.selector is None
            and o.target_refs
            == (m.PolicyTargetReference("gateway.networking.k8s.io", "Gateway", "waypoint"),)
            and o.rules == (m.Rule(),)
            and o.dry_run
            and not o.dry_run_annotation_invalid
        ),
    ),
    (
        "authorizationpolicy empty spec (allow-nothing)",
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow-nothing, namespace: istio-system}
        spec: {}
        """,
        "authorization_policies",
        lambda o: o.action == "ALLOW" and o.rules == () and o.selector is None and o.target_refs == (),
    ),
    (
        "authorizationpolicy custom with provider, singular targetRef",
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: ext, namespace: demo}
        spec:
          targetRef: {kind: Service, name: web}
          action: CUSTOM
          provider: {name: ext-authz}
          rules: [{to: [{operation: {paths: [/admin]}}]}]
        """,
        "authorization_policies",
        lambda o: (
            o.provider == "ext-authz" and o.target_refs == (m.PolicyTargetReference("", "Service", "web"),)
        ),
    ),
    (
        "peerauthentication",
        """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: web, namespace: demo}
        spec:
          selector: {matchLabels: {app: web}}
          mtls: {mode: STRICT}
          portLevelMtls:
            8080: {mode: PERMISSIVE}
            "9090": {mode: DISABLE}
            7070: {}
        """,
        "peer_authentications",
        lambda o: (
            o.mtls_mode == "STRICT"
            and dict(o.port_level_mtls) == {8080: "PERMISSIVE", 9090: "DISABLE", 7070: "UNSET"}
        ),
    ),
    (
        "peerauthentication unset",
        """
        apiVersion: security.istio.io/v1beta1
        kind: PeerAuthentication
        metadata: {name: default, namespace: istio-system}
        """,
        "peer_authentications",
        lambda o: o.mtls_mode == "UNSET" and o.selector is None and dict(o.port_level_mtls) == {},
    ),
    (
        "requestauthentication",
        """
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {name: jwt, namespace: demo}
        spec:
          targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
          jwtRules:
          - issuer: https://issuer
            jwksUri: https://issuer/jwks.json
            audiences: [api]
            forwardOriginalToken: true
            fromHeaders: [{name: Authorization, prefix: "Bearer "}, {name: x-jwt}]
            fromParams: [token]
            outputPayloadToHeader: x-payload
            outputClaimToHeaders: [{header: x-sub, claim: sub}]
        """,
        "request_authentications",
        lambda o: (
            o.jwt_rules
            == (
                m.JwtRule(
                    issuer="https://issuer",
                    audiences=("api",),
                    jwks=None,
                    jwks_uri="https://issuer/jwks.json",
                    from_headers=(("Authorization", "Bearer "), ("x-jwt", "")),
                    from_params=("token",),
                    forward_original_token=True,
                    output_payload_to_header="x-payload",
                    output_claim_to_headers=(("x-sub", "sub"),),
                ),
            )
        ),
    ),
    (
        "workloadentry",
        """
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata: {name: vm1, namespace: demo}
        spec:
          {address: 192.168.1.10, labels: {app: vm}, serviceAccount: vm-sa, ports: {http: 8080}, network: n1}
        """,
        "workload_entries",
        lambda o: (
            o.address == "192.168.1.10"
            and o.service_account == "vm-sa"
            and dict(o.ports) == {"http": 8080}
            and o.identity("td") == "spiffe://td/ns/demo/sa/vm-sa"
        ),
    ),
    (
        "istio gateway",
        """
        apiVersion: networking.istio.io/v1beta1
        kind: Gateway
        metadata: {name: ingress, namespace: istio-system}
        spec:
          selector: {istio: ingressgateway}
          servers:
          - port: {number: 443, name: https, protocol: HTTPS}
            hosts: ["*.example.com"]
            tls:
              mode: MUTUAL
              credentialName: example-cert
              subjectAltNames: [client.example.com]
              minProtocolVersion: TLSV1_2
              maxProtocolVersion: TLSV1_3
              cipherSuites: [ECDHE-ECDSA-AES128-GCM-SHA256]
          - port: {number: 80, name: http, protocol: HTTP}
            hosts: ["*"]
            tls: {httpsRedirect: true}
        """,
        "gateways",
        lambda o: (
            o.selector == {"istio": "ingressgateway"}
            and o.servers[0].port == m.GatewayPort(443, "HTTPS", "https")
            and o.servers[0].tls is not None
            and o.servers[0].tls.mode == "MUTUAL"
            and o.servers[0].tls.credential_name == "example-cert"
            and o.servers[0].tls.subject_alt_names == ("client.example.com",)
            and o.servers[0].tls.min_protocol_version == "TLSV1_2"
            and o.servers[1].tls == m.ServerTLS(https_redirect=True)
        ),
    ),
    (
        "virtualservice",
        """
        apiVersion: networking.istio.io/v1alpha3
        kind: VirtualService
        metadata: {name: web, namespace: demo}
        spec:
          hosts: [web.example.com]
          gateways: [istio-system/ingress]
          http:
          - match:
            - uri: {prefix: /api}
              headers: {x-env: {exact: prod}}
            route:
            - destination: {host: web.demo.svc.cluster.local, port: {number: 80}, subset: v1}
              weight: 90
            - destination: {host: web2}
              weight: 10
            timeout: 1.5s
            rewrite: {uri: /}
          tls:
          - match: [{sniHosts: [a.example.com], port: 443}]
            route: [{destination: {host: a}}]
        """,
        "virtual_services",
        lambda o: (
            o.hosts == ("web.example.com",)
            and o.http[0].match[0].uri == m.StringMatch("prefix", "/api")
            and o.http[0].match[0].headers == {"x-env": m.StringMatch("exact", "prod")}
            and o.http[0].route[0]
            == m.HTTPRouteDestination(m.Destination("web.demo.svc.cluster.local", "v1", 80), 90)
            and o.http[0].timeout == timedelta(seconds=1.5)
            and o.http[0].rewrite == m.HTTPRewrite("/", None)
            and o.tls[0].sni_hosts == ("a.example.com",)
        ),
    ),
    (
        "gateway api waypoint",
        """
        apiVersion: gateway.networking.k8s.io/v1
        kind: Gateway
        metadata: {name: waypoint, namespace: demo, labels: {istio.io/waypoint-for: all}}
        spec:
          gatewayClassName: istio-waypoint
          listeners: [{name: mesh, port: 15008, protocol: HBONE}]
        """,
        "k8s_gateways",
        lambda o: (
            o.is_waypoint and o.waypoint_for == "all" and o.listeners == (m.Listener("mesh", 15008, "HBONE"),)
        ),
    ),
    (
        "gateway api v1beta1 default waypoint-for",
        """
        apiVersion: gateway.networking.k8s.io/v1beta1
        kind: Gateway
        metadata: {name: gw, namespace: demo}
        spec: {gatewayClassName: istio}
        """,
        "k8s_gateways",
        lambda o: not o.is_waypoint and o.waypoint_for == "service",
    ),
]


@pytest.mark.parametrize(
    ("text", "attr", "check"), [c[1:] for c in KIND_CASES], ids=[c[0] for c in KIND_CASES]
)
def test_every_kind_loads(text: str, attr: str, check: object) -> None:
    config = load1(text)
    objects = getattr(config, attr)
    assert len(objects) == 1
    assert callable(check)
    assert check(objects[0])


def test_every_registered_kind_has_a_case() -> None:
    covered = {c[1].split("kind: ")[1].split()[0] for c in KIND_CASES}
    assert {k.kind for k in KINDS} - {"MeshConfig"} <= covered


def test_every_api_version_of_every_kind_is_accepted() -> None:
    for kind in KINDS:
        for api_version in kind.api_versions:
            spec = "spec: {gatewayClassName: x}" if kind.schema.__name__ == "K8sGatewayDoc" else ""
            if kind.kind == "Pod":
                spec = "spec: {containers: [{name: c}]}"
            load1(f"apiVersion: {api_version}\nkind: {kind.kind}\nmetadata: {{name: n}}\n{spec}\n")


def test_mesh_config_defaults_and_values() -> None:
    assert load([]).mesh == m.MeshConfig(
        trust_domain="cluster.local",
        root_namespace="istio-system",
        workload_cert_ttl=timedelta(hours=24),
        max_workload_cert_ttl=timedelta(days=90),
        path_normalization="BASE",
    )
    config = load1(
        """
        apiVersion: zerotunnel.io/v1alpha1
        kind: MeshConfig
        spec:
          trustDomain: example.org
          trustDomainAliases: [old.example.org]
          rootNamespace: mesh-root
          workloadCertTTL: 1h30m
          maxWorkloadCertTTL: 30d
          caDir: /var/lib/zerotunnel/ca
          pathNormalization: {normalization: DECODE_AND_MERGE_SLASHES}
        """
    )
    assert config.mesh == m.MeshConfig(
        trust_domain="example.org",
        trust_domain_aliases=("old.example.org",),
        root_namespace="mesh-root",
        workload_cert_ttl=timedelta(hours=1, minutes=30),
        max_workload_cert_ttl=timedelta(days=30),
        ca_dir="/var/lib/zerotunnel/ca",
        path_normalization="DECODE_AND_MERGE_SLASHES",
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("NONE", "NONE"),
        ("BASE", "BASE"),
        ("DEFAULT", "BASE"),
        ("MERGE_SLASHES", "MERGE_SLASHES"),
        ({}, "BASE"),
    ],
)
def test_path_normalization_forms(given: object, expected: str) -> None:
    text = json.dumps(
        {"apiVersion": "zerotunnel.io/v1alpha1", "kind": "MeshConfig", "spec": {"pathNormalization": given}}
    )
    assert load([("m.json", text)]).mesh.path_normalization == expected


# ------------------------------------------------------------------------------- model behaviour


def test_namespaced_objects_default_to_default_namespace_and_keep_load_order() -> None:
    config = load(
        [
            (
                "a.yaml",
                "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a}\n---\n---\n"
                "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: b}\n",
            ),
            ("b.yaml", "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: c, namespace: x}\n"),
        ]
    )
    assert [(s.meta.namespace, s.meta.name, s.meta.order) for s in config.service_accounts] == [
        ("default", "a", 0),
        ("default", "b", 1),
        ("x", "c", 2),
    ]


def test_creation_timestamp_is_parsed_with_timezone() -> None:
    config = load1(
        """
        apiVersion: v1
        kind: Namespace
        metadata: {name: demo, creationTimestamp: 2024-05-01T12:00:00Z}
        """
    )
    assert config.namespaces[0].meta.creation_timestamp == datetime(2024, 5, 1, 12, tzinfo=UTC)


POD = """
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: demo, labels: LABELS}
spec: {containers: [{name: c}]}
"""
NS = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: NSLABELS}\n---\n"


@pytest.mark.parametrize(
    ("ns_labels", "pod_labels", "ambient"),
    [
        ("{istio.io/dataplane-mode: ambient}", "{}", True),
        ("{istio.io/dataplane-mode: ambient}", "{istio.io/dataplane-mode: none}", False),
        ("{}", "{istio.io/dataplane-mode: ambient}", True),
        ("{}", "{}", False),
    ],
)
def test_ambient_enrolment_pod_label_wins(ns_labels: str, pod_labels: str, ambient: bool) -> None:
    config = load1(NS.replace("NSLABELS", ns_labels) + POD.replace("LABELS", pod_labels))
    pod = config.pod("demo", "p")
    assert pod is not None
    assert config.pod_is_ambient(pod) is ambient
    assert config.is_ambient("demo") is (ns_labels != "{}")


def test_identity_uses_service_account_or_default_and_the_mesh_trust_domain() -> None:
    config = load1(
        """
        apiVersion: zerotunnel.io/v1alpha1
        kind: MeshConfig
        spec: {trustDomain: example.org}
        ---
        apiVersion: v1
        kind: Pod
        metadata: {name: a, namespace: demo}
        spec: {containers: [{name: c}]}
        ---
        apiVersion: v1
        kind: Pod
        metadata: {name: b, namespace: demo}
        spec: {serviceAccountName: web, containers: [{name: c}]}
        ---
        apiVersion: v1
        kind: Pod
        metadata: {name: c, namespace: demo}
        spec: {serviceAccount: legacy, containers: [{name: c}]}
        """
    )
    assert [config.identity_of(p) for p in config.pods] == [
        "spiffe://example.org/ns/demo/sa/default",
        "spiffe://example.org/ns/demo/sa/web",
        "spiffe://example.org/ns/demo/sa/legacy",
    ]
    assert config.pods_in("demo") == config.pods
    assert config.pod("demo", "zzz") is None


@pytest.mark.parametrize(
    ("value", "dry_run", "invalid"),
    [
        ("true", True, False),
        ("True", True, False),
        ("1", True, False),
        ("false", False, False),
        ("yes", False, True),
        ("", False, True),
    ],
)
def test_dry_run_annotation(value: str, dry_run: bool, invalid: bool) -> None:
    config = load1(
        f"""
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: p, namespace: demo, annotations: {{istio.io/dry-run: "{value}"}}}}
        """
    )
    policy = config.authorization_policies[0]
    assert (policy.dry_run, policy.dry_run_annotation_invalid) == (dry_run, invalid)


def test_kind_list_from_kubectl() -> None:
    config = load1(
        """
        apiVersion: v1
        kind: List
        metadata: {resourceVersion: ""}
        items:
        - {apiVersion: v1, kind: Namespace, metadata: {name: a}}
        - {apiVersion: v1, kind: ServiceAccount, metadata: {name: s, namespace: a}}
        """
    )
    assert [n.meta.name for n in config.namespaces] == ["a"]
    assert [s.meta.name for s in config.service_accounts] == ["s"]


def test_same_name_in_different_kinds_or_namespaces_is_not_a_duplicate() -> None:
    config = load1(
        """
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {name: gw, namespace: demo}
        ---
        apiVersion: gateway.networking.k8s.io/v1
        kind: Gateway
        metadata: {name: gw, namespace: demo}
        spec: {gatewayClassName: istio}
        ---
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {name: gw, namespace: other}
        """
    )
    assert len(config.gateways) == 2
    assert len(config.k8s_gateways) == 1


def test_yaml_1_1_booleans_stay_strings_where_the_schema_wants_a_string() -> None:
    config = load1(
        """
        apiVersion: v1
        kind: Namespace
        metadata: {name: demo, labels: {enabled: yes, legacy: on, mode: off, answer: no}}
        """
    )
    assert dict(config.namespaces[0].meta.labels) == {
        "enabled": "yes",
        "legacy": "on",
        "mode": "off",
        "answer": "no",
    }


def test_model_objects_are_frozen_and_hashable() -> None:
    config = load([("demo.yaml", (EXAMPLES / "demo.yaml").read_text())])
    pod = config.pods[0]
    with pytest.raises(AttributeError):
        pod.service_account = "x"  # type: ignore[misc]
    assert len({*config.pods, *config.pods}) == len(config.pods)
    assert hash(config) == hash(config)


def test_real_world_manifests_load_unchanged() -> None:
    """Pods with probes, resources, securityContext, volumes; a Service with type and sessionAffinity."""
    config = load(read_config_paths([EXAMPLES]))
    httpbin = config.pod("demo", "httpbin")
    assert httpbin is not None
    assert httpbin.containers[0].ports == (m.ContainerPort("http", 8080, "TCP"),)
    assert config.service("demo", "httpbin") is not None
    assert config.mesh.path_normalization == "MERGE_SLASHES"
    assert [g.meta.name for g in config.k8s_gateways if g.is_waypoint] == ["waypoint"]
    assert config.node("node-a") is not None


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        (
            """
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: p, namespace: demo}
            spec:
              rules:
              - from: [{source: {principals: [a]}}, {source: {principals: a}}]
            """,
            "spec.rules[0].from[1].source.principals",
            "expected a list, got string 'a'",
        ),
        (
            """
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: p, namespace: demo}
            spec: {rules: [{from: [{source: {principal: [a]}}]}]}
            """,
            "spec.rules[0].from[0].source.principal",
            "unknown field 'principal'; accepted fields here: ipBlocks, namespaces,",
        ),
        (
            """
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: p, namespace: demo}
            spec: {action: allow}
            """,
            "spec.action",
            "got string 'allow'; accepted: 'ALLOW', 'DENY', 'AUDIT' or 'CUSTOM'",
        ),
        (
            """
            apiVersion: v1
            kind: Pod
            metadata: {name: p}
            spec: {hostNetwork: yes, containers: [{name: c}]}
            """,
            "spec.hostNetwork",
            "expected true or false, got string 'yes' (YAML 1.2: only true/false are booleans)",
        ),
        (
            """
            apiVersion: security.istio.io/v1
            kind: RequestAuthentication
            metadata: {name: p}
            spec: {jwtRules: [{issuer: x, forwardOriginalToken: on}]}
            """,
            "spec.jwtRules[0].forwardOriginalToken",
            "expected true or false, got string 'on'",
        ),
        (
            """
            apiVersion: v1
            kind: Pod
            metadata: {name: p, labels: {version: 1}}
            spec: {containers: [{name: c}]}
            """,
            "metadata.labels.version",
            "expected a string, got integer 1 (quote it to make it a string)",
        ),
        (
            """
            apiVersion: v1
            kind: Namespace
            metadata: {name: p, labels: {istio.io/rev: true}}
            """,
            'metadata.labels["istio.io/rev"]',
            "expected a string, got boolean true",
        ),
        (
            """
            apiVersion: v1
            kind: Pod
            metadata: {name: p}
            spec: {containers: [{name: c, ports: [{containerPort: "80"}]}]}
            """,
            "spec.containers[0].ports[0].containerPort",
            "expected an integer, got string '80'",
        ),
        (
            """
            apiVersion: v1
            kind: Pod
            metadata: {name: p}
            spec: {containers: [{image: x}]}
            """,
            "spec.containers[0].name",
            "required field is missing",
        ),
        (
            """
            apiVersion: v1
            kind: Pod
            metadata: {name: p}
            spec: {containers: []}
            """,
            "spec.containers",
            "must list at least one container",
        ),
        (
            """
            apiVersion: v1
            kind: Pod
            metadata: {name: p}
            spec: {containers: [{name: c, ports: [{containerPort: 70000}]}]}
            """,
            "spec.containers[0].ports[0].containerPort",
            "port 70000 is out of range; accepted: 1-65535",
        ),
        (
            """
            apiVersion: v1
            kind: Service
            metadata: {name: s}
            spec: {ports: [{port: 80, targetPort: true}]}
            """,
            "spec.ports[0].targetPort",
            "expected an integer or a string, got True",
        ),
        (
            """
            apiVersion: v1
            kind: Service
            metadata: {name: s}
            spec: {type: Internal}
            """,
            "spec.type",
            "accepted: 'ClusterIP', 'NodePort', 'LoadBalancer' or 'ExternalName'",
        ),
        (
            """
            apiVersion: v1
            kind: ServiceAccount
            metadata: {namespace: demo}
            """,
            "metadata.name",
            "required field is missing",
        ),
        (
            """
            apiVersion: v1
            kind: Namespace
            metadata: {name: demo, creationTimestamp: yesterday}
            """,
            "metadata.creationTimestamp",
            "accepted: an RFC 3339 time",
        ),
        (
            """
            apiVersion: v1
            kind: Secret
            metadata: {name: s}
            data: {tls.crt: "not base64!"}
            """,
            'data["tls.crt"]',
            "is not valid base64",
        ),
        (
            """
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: p}
            spec:
              selector: {matchLabels: {app: a}}
              targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: w}]
            """,
            "spec",
            "selector and targetRefs are mutually exclusive",
        ),
        (
            """
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: p}
            spec: {action: CUSTOM}
            """,
            "spec.provider",
            "required when action is CUSTOM",
        ),
        (
            """
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: p}
            spec: {rules: [{from: [{source: {serviceAccounts: [a], principals: [b]}}]}]}
            """,
            "spec.rules[0].from[0].source",
            "serviceAccounts cannot be combined with principals or namespaces",
        ),
        (
            """
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: p}
            spec: {rules: [{from: [{}]}]}
            """,
            "spec.rules[0].from[0].source",
            "required field is missing",
        ),
        (
            """
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: p}
            spec: {rules: [{to: [{operation: {}}]}]}
            """,
            "spec.rules[0].to[0].operation",
            "must not be empty",
        ),
        (
            """
            apiVersion: security.istio.io/v1
            kind: AuthorizationPolicy
            metadata: {name: p}
            spec: {rules: [{when: [{key: source.ip}]}]}
            """,
            "spec.rules[0].when[0]",
            "set values or notValues",
        ),
        (
            """
            apiVersion: security.istio.io/v1
            kind: PeerAuthentication
            metadata: {name: p}
            spec: {portLevelMtls: {8080: {mode: STRICT}}}
            """,
            "spec.portLevelMtls",
            "requires a selector",
        ),
        (
            """
            apiVersion: security.istio.io/v1
            kind: PeerAuthentication
            metadata: {name: p}
            spec: {selector: {matchLabels: {a: b}}, portLevelMtls: {http: {mode: STRICT}}}
            """,
            "spec.portLevelMtls.http (key)",
            "expected a port number as the key, got 'http'",
        ),
        (
            """
            apiVersion: security.istio.io/v1
            kind: PeerAuthentication
            metadata: {name: p}
            spec: {mtls: {mode: strict}}
            """,
            "spec.mtls.mode",
            "accepted: 'UNSET', 'DISABLE', 'PERMISSIVE' or 'STRICT'",
        ),
        (
            """
            apiVersion: networking.istio.io/v1
            kind: Gateway
            metadata: {name: g}
            spec:
              servers:
              - port: {number: 443, protocol: HTTPS}
                hosts: [a]
                tls: {mode: MUTUAL, minProtocolVersion: TLS1_2}
            """,
            "spec.servers[0].tls.minProtocolVersion",
            "accepted: 'TLS_AUTO', 'TLSV1_0', 'TLSV1_1', 'TLSV1_2' or 'TLSV1_3'",
        ),
        (
            """
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: v}
            spec: {http: [{match: [{uri: {exact: /a, prefix: /b}}]}]}
            """,
            "spec.http[0].match[0].uri",
            "set exactly one of exact, prefix or regex",
        ),
        (
            """
            apiVersion: gateway.networking.k8s.io/v1
            kind: Gateway
            metadata: {name: w, labels: {istio.io/waypoint-for: services}}
            spec: {gatewayClassName: istio-waypoint}
            """,
            'metadata.labels["istio.io/waypoint-for"]',
            "got 'services'; accepted: service, workload, all, none",
        ),
        (
            """
            apiVersion: zerotunnel.io/v1alpha1
            kind: MeshConfig
            spec: {workloadCertTTL: 1 day}
            """,
            "spec.workloadCertTTL",
            "accepted: a positive duration like 24h, 90d, 30m",
        ),
        (
            """
            apiVersion: zerotunnel.io/v1alpha1
            kind: MeshConfig
            spec: {workloadCertTTL: 100d}
            """,
            "spec.workloadCertTTL",
            "must not exceed maxWorkloadCertTTL",
        ),
        (
            """
            apiVersion: zerotunnel.io/v1alpha1
            kind: MeshConfig
            spec: {pathNormalization: MERGE}
            """,
            "spec.pathNormalization",
            "got 'MERGE'; accepted: NONE, BASE, DEFAULT, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES",
        ),
        (
            """
            apiVersion: zerotunnel.io/v1alpha1
            kind: MeshConfig
            spec: {trustDomain: "spiffe://Example.org"}
            """,
            "spec.trustDomain",
            "accepted: a SPIFFE trust domain",
        ),
        (
            """
            apiVersion: v1
            kind: ServiceAccount
            metadata: {name: My_SA}
            """,
            "metadata.name",
            "'My_SA' is not a valid name; accepted: lower-case letters, digits, '-' and '.'",
        ),
        (
            """
            apiVersion: v1
            kind: Namespace
            metadata: {name: a.b}
            """,
            "metadata.name",
            "'a.b' is not a valid name; accepted: lower-case letters, digits and '-'",
        ),
        (
            """
            apiVersion: v1
            kind: ServiceAccount
            metadata: {name: a, namespace: Demo}
            """,
            "metadata.namespace",
            "'Demo' is not a valid name",
        ),
        (
            """
            apiVersion: v1
            kind: Pod
            metadata: {name: p}
            spec: {serviceAccountName: "sa/../x", containers: [{name: c}]}
            """,
            "spec.serviceAccountName",
            "is not a valid name",
        ),
        (
            """
            apiVersion: v1
            kind: Namespace
            metadata: {name: a, labels: {"bad key!": x}}
            """,
            'metadata.labels["bad key!"]',
            "is not a valid label key",
        ),
        (
            """
            apiVersion: v1
            kind: Namespace
            metadata: {name: a, labels: {app: "has space"}}
            """,
            "metadata.labels.app",
            "'has space' is not a valid label value",
        ),
        (
            """
            apiVersion: zerotunnel.io/v1alpha1
            kind: MeshConfig
            spec: {rootNamespace: Istio_System}
            """,
            "spec.rootNamespace",
            "'Istio_System' is not a valid name",
        ),
        (
            """
            apiVersion: apps/v1
            kind: Deployment
            metadata: {name: d}
            """,
            "kind",
            "unknown kind 'Deployment' (apps/v1); accepted: v1 Namespace,",
        ),
        (
            """
            apiVersion: security.istio.io/v2
            kind: AuthorizationPolicy
            metadata: {name: d}
            """,
            "apiVersion",
            "kind AuthorizationPolicy is not served by apiVersion 'security.istio.io/v2'; accepted: "
            "security.istio.io/v1, security.istio.io/v1beta1",
        ),
        (
            """
            apiVersion: v1
            metadata: {name: d}
            """,
            "kind",
            "required field is missing",
        ),
        (
            """
            - not a mapping
            """,
            "",
            "expected a mapping with apiVersion and kind, got a list",
        ),
    ],
)
def test_error_names_file_document_path_and_what_is_accepted(text: str, path: str, message: str) -> None:
    found = problems(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: first}\n---\n" + y(text), name="dir/x.yaml"
    )
    assert len(found) == 1, [str(p) for p in found]
    problem = found[0]
    assert (problem.file, problem.document, problem.path) == ("dir/x.yaml", 1, path)
    assert message in problem.message
    assert str(problem).startswith("dir/x.yaml: document 1")


def test_all_errors_are_reported_at_once_across_documents_and_files() -> None:
    with pytest.raises(ConfigError) as info:
        load(
            [
                (
                    "a.yaml",
                    y("""
                    apiVersion: v1
                    kind: Pod
                    metadata: {name: p}
                    spec: {hostNetwork: yes, containers: [{name: c, bogus: 1}]}
                    ---
                    apiVersion: v1
                    kind: Nope
                    """),
                ),
                (
                    "b.yaml",
                    "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labels: {x: 1}}\n---\n[unclosed\n",
                ),
            ]
        )
    error = info.value
    assert [(p.file, p.document, p.path) for p in error.errors] == [
        ("a.yaml", 0, "spec.containers[0].bogus"),
        ("a.yaml", 0, "spec.hostNetwork"),
        ("a.yaml", 1, "kind"),
        ("b.yaml", 0, "metadata.labels.x"),
        ("b.yaml", 1, ""),
    ]
    lines = str(error).splitlines()
    assert lines[0] == "invalid configuration (5 problems)"
    assert lines[1:] == [str(p) for p in error.errors]
    assert isinstance(error, InputError)


def test_duplicate_object_is_an_error_naming_the_first() -> None:
    found = problems(
        """
        apiVersion: v1
        kind: Service
        metadata: {name: web}
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: web, namespace: default}
        """
    )
    assert len(found) == 1
    assert (found[0].document, found[0].path) == (1, "metadata.name")
    assert "duplicate Service default/web; first defined in t.yaml: document 0" in found[0].message


def test_second_mesh_config_is_an_error() -> None:
    problem = one_problem(
        "apiVersion: zerotunnel.io/v1alpha1\nkind: MeshConfig\n---\n"
        "apiVersion: zerotunnel.io/v1alpha1\nkind: MeshConfig\n"
    )
    assert problem.document == 1
    assert "only one is accepted" in problem.message


def test_errors_inside_a_list_have_the_items_path() -> None:
    problem = one_problem(
        """
        apiVersion: v1
        kind: List
        items:
        - {apiVersion: v1, kind: Namespace, metadata: {name: a}}
        - {apiVersion: v1, kind: Namespace, metadata: {name: b, labels: {x: 1}}}
        """
    )
    assert (problem.document, problem.path) == (0, "items[1].metadata.labels.x")


def test_duplicate_keys_are_rejected_with_the_line() -> None:
    problem = one_problem(
        """
        apiVersion: v1
        kind: Namespace
        metadata:
          name: a
          name: b
        """
    )
    assert problem.document == 0
    assert "duplicate key 'name' (first at line 4, column 3)" in problem.message
    assert "line 5" in problem.message


def test_json_files_are_loaded_and_duplicate_json_keys_rejected() -> None:
    config = load([("a.json", '{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}')])
    assert config.namespaces[0].meta.name == "a"
    with pytest.raises(ConfigError, match="duplicate key 'name'"):
        load(
            [("a.json", '{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a", "name": "b"}}')]
        )


def test_a_yaml_syntax_error_keeps_the_documents_before_it_checked() -> None:
    found = problems("apiVersion: v1\nkind: Namespace\nmetadata: {name: a, bad: 1}\n---\nx: [\n")
    assert [(p.document, p.path) for p in found] == [(0, "metadata.bad"), (1, "")]
    assert found[1].message.startswith("invalid YAML: line 6")


def test_format_path() -> None:
    assert format_path(("spec", "rules", 0, "from", 1, "source", "principals")) == (
        "spec.rules[0].from[1].source.principals"
    )
    assert (
        format_path(("metadata", "labels", "app.kubernetes.io/name"))
        == 'metadata.labels["app.kubernetes.io/name"]'
    )
    assert format_path(()) == ""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", timedelta(hours=24)),
        ("90d", timedelta(days=90)),
        ("1h30m", timedelta(minutes=90)),
        ("1.5s", timedelta(seconds=1.5)),
        ("250ms", timedelta(milliseconds=250)),
        ("", None),
        ("5", None),
        ("1 h", None),
        ("h", None),
        ("-1h", None),
    ],
)
def test_parse_duration(text: str, expected: timedelta | None) -> None:
    assert parse_duration(text) == expected


def test_accepted_kinds_lists_every_kind() -> None:
    assert len(accepted_kinds()) == len(KINDS) + 1
    assert "gateway.networking.k8s.io/v1 Gateway" in accepted_kinds()


# ------------------------------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_arbitrary_text_never_raises_anything_but_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        load([("junk.yaml", text)])


YAMLISH = st.lists(
    st.sampled_from(
        [
            "apiVersion: v1\n",
            "kind: Pod\n",
            "kind: List\n",
            "items:\n",
            "- ",
            "metadata: {name: a}\n",
            "spec:\n",
            "  containers: [{name: c}]\n",
            "---\n",
            "[",
            "]",
            "{",
            "}",
            ": ",
            "&a ",
            "*a ",
            "!!int ",
            "!!binary ",
            "!!timestamp ",
            "? ",
            "<<: ",
            "'",
            '"',
            "\t",
            "  ",
            "yes",
            "0x1F",
            "1:30",
            "~",
            "\n",
            "kind: AuthorizationPolicy\napiVersion: security.istio.io/v1\n",
            "spec: {rules: [{}]}\n",
        ]
    ),
    max_size=40,
).map("".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(YAMLISH)
def test_yaml_like_junk_never_raises_anything_but_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        load([("junk.yaml", text)])


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10) | st.floats(allow_nan=False),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(KINDS), JSONISH, JSONISH)
def test_arbitrary_specs_of_known_kinds_never_raise_anything_but_config_error(
    kind: _Kind, spec: object, metadata: object
) -> None:
    doc = {"apiVersion": kind.api_versions[0], "kind": kind.kind, "metadata": metadata, "spec": spec}
    with contextlib.suppress(ConfigError):
        load([("x.json", json.dumps(doc))])


KUBECTL_GET_OUTPUT = """
apiVersion: v1
kind: List
metadata:
  resourceVersion: ""
items:
- apiVersion: v1
  kind: Pod
  metadata:
    annotations:
      kubectl.kubernetes.io/last-applied-configuration: |
        {"apiVersion":"v1","kind":"Pod"}
    creationTimestamp: "2024-06-01T10:00:00Z"
    generateName: httpbin-7f8b9d-
    labels:
      app: httpbin
      pod-template-hash: 7f8b9d
      security.istio.io/tlsMode: istio
    name: httpbin-7f8b9d-x2x4k
    namespace: demo
    ownerReferences:
    - apiVersion: apps/v1
      blockOwnerDeletion: true
      controller: true
      kind: ReplicaSet
      name: httpbin-7f8b9d
      uid: 0b5c7a4e-1111-2222-3333-444455556666
    resourceVersion: "123456"
    uid: 9a8b7c6d-1111-2222-3333-444455556666
    managedFields:
    - apiVersion: v1
      fieldsType: FieldsV1
      fieldsV1: {"f:metadata": {"f:labels": {".": {}, "f:app": {}}}}
      manager: kube-controller-manager
      operation: Update
      time: "2024-06-01T10:00:00Z"
  spec:
    containers:
    - image: docker.io/kennethreitz/httpbin
      imagePullPolicy: IfNotPresent
      name: httpbin
      ports:
      - containerPort: 80
        protocol: TCP
      resources:
        limits: {cpu: "1", memory: 256Mi}
        requests: {cpu: 100m, memory: 64Mi}
      livenessProbe:
        failureThreshold: 3
        httpGet: {path: /status/200, port: 80, scheme: HTTP}
        periodSeconds: 10
        successThreshold: 1
        timeoutSeconds: 1
      readinessProbe:
        exec: {command: [cat, /tmp/ready]}
      startupProbe:
        grpc: {port: 9090}
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        seccompProfile: {type: RuntimeDefault}
      terminationMessagePath: /dev/termination-log
      terminationMessagePolicy: File
      volumeMounts:
      - mountPath: /var/run/secrets/kubernetes.io/serviceaccount
        name: kube-api-access-abcde
        readOnly: true
    dnsPolicy: ClusterFirst
    enableServiceLinks: true
    nodeName: kind-worker
    preemptionPolicy: PreemptLowerPriority
    priority: 0
    restartPolicy: Always
    schedulerName: default-scheduler
    securityContext: {fsGroup: 2000, runAsNonRoot: true}
    serviceAccount: httpbin
    serviceAccountName: httpbin
    terminationGracePeriodSeconds: 30
    tolerations:
    - effect: NoExecute
      key: node.kubernetes.io/not-ready
      operator: Exists
      tolerationSeconds: 300
    volumes:
    - name: kube-api-access-abcde
      projected:
        defaultMode: 420
        sources:
        - serviceAccountToken: {expirationSeconds: 3607, path: token}
  status:
    conditions:
    - lastProbeTime: null
      lastTransitionTime: "2024-06-01T10:00:05Z"
      status: "True"
      type: Ready
    containerStatuses:
    - containerID: containerd://abc
      image: docker.io/kennethreitz/httpbin:latest
      imageID: docker.io/kennethreitz/httpbin@sha256:599fe5e5
      lastState: {}
      name: httpbin
      ready: true
      restartCount: 0
      started: true
      state:
        running: {startedAt: "2024-06-01T10:00:03Z"}
    hostIP: 172.18.0.3
    hostIPs: [{ip: 172.18.0.3}]
    phase: Running
    podIP: 10.244.1.7
    podIPs: [{ip: 10.244.1.7}]
    qosClass: Burstable
    startTime: "2024-06-01T10:00:00Z"
- apiVersion: v1
  kind: Service
  metadata:
    creationTimestamp: "2024-06-01T09:59:00Z"
    labels: {app: httpbin, service: httpbin}
    name: httpbin
    namespace: demo
    resourceVersion: "120000"
    uid: 11111111-2222-3333-4444-555555555555
  spec:
    clusterIP: 10.96.12.34
    clusterIPs: [10.96.12.34]
    internalTrafficPolicy: Cluster
    ipFamilies: [IPv4]
    ipFamilyPolicy: SingleStack
    ports:
    - name: http
      port: 8000
      protocol: TCP
      targetPort: 80
    selector: {app: httpbin}
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {}
- apiVersion: v1
  kind: Namespace
  metadata:
    labels: {istio.io/dataplane-mode: ambient, kubernetes.io/metadata.name: demo}
    name: demo
  spec:
    finalizers: [kubernetes]
  status:
    phase: Active
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata:
    annotations: {}
    generation: 1
    name: httpbin
    namespace: demo
  spec:
    selector: {matchLabels: {app: httpbin}}
    rules: [{from: [{source: {namespaces: [demo]}}]}]
  status:
    conditions:
    - lastTransitionTime: "2024-06-01T10:00:00Z"
      message: ok
      reason: Accepted
      status: "True"
      type: Accepted
    observedGeneration: "1"
"""


def test_kubectl_get_output_loads_unchanged() -> None:
    config = load1(KUBECTL_GET_OUTPUT)
    pod = config.pod("demo", "httpbin-7f8b9d-x2x4k")
    assert pod is not None
    assert pod.pod_ip == "10.244.1.7"
    assert pod.node_name == "kind-worker"
    assert config.identity_of(pod) == "spiffe://cluster.local/ns/demo/sa/httpbin"
    assert pod.meta.creation_timestamp == datetime(2024, 6, 1, 10, tzinfo=UTC)
    service = config.service("demo", "httpbin")
    assert service is not None
    assert service.ports == (m.ServicePort("http", 8000, 80, "TCP", None),)
    assert config.pod_is_ambient(pod)
    assert config.authorization_policies[0].rules[0].from_[0].namespaces == ("demo",)
