"""What the local cluster runs, decided from the config alone (no root needed)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from zerotunnel.cluster.desired import (
    DEFAULT_NODE,
    IDLE_COMMAND,
    addresses_document,
    container_argv,
    container_env,
    desired_state,
    gateway_of,
    ingress_addresses,
    loopback_ips,
    needs_host_access,
    pod_specs,
    service_endpoints,
    with_mesh_options,
)
from zerotunnel.cluster.topology import plan_network
from zerotunnel.config import Config, load
from zerotunnel.config.model import Container, EnvVar

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  serviceAccountName: web-sa
  nodeName: n1
  containers:
    - name: c
      command: ["demo", "--port", "8080"]
      ports: [{name: http, containerPort: 8080}, {containerPort: 53, protocol: UDP}]
---
apiVersion: v1
kind: Pod
metadata: {name: free, namespace: shop, labels: {app: web}}
spec:
  containers:
    - name: c
      args: ["echo", "hi"]
      ports: [{name: http, containerPort: 9090}]
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy, labels: {istio.io/dataplane-mode: none}}
spec:
  containers: [{name: c}]
---
apiVersion: v1
kind: Pod
metadata: {name: hostnet, namespace: shop}
spec:
  hostNetwork: true
  containers: [{name: c, command: ["true"]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {name: raw, port: 81, targetPort: 7000}]
"""


def _config(text: str = MESH) -> Config:
    return load([("mesh.yaml", text)])


def test_nodes_pods_and_mesh_membership() -> None:
    d = desired_state(_config())
    assert d.nodes == ("n1", "n2")
    by = {p.uid: p for p in d.pods}
    assert set(by) == {"shop/web", "shop/free", "legacy/old"}
    assert by["shop/web"].node == "n1" and by["shop/web"].ambient
    assert by["shop/web"].identity == "spiffe://cluster.local/ns/shop/sa/web-sa"
    assert by["shop/web"].ports == (8080,)  # UDP ports are not probed
    assert not by["legacy/old"].ambient
    # unscheduled pods go to the least loaded node: n2 is empty, then n1 and n2 tie -> n1
    assert by["shop/free"].node == "n2"
    assert by["legacy/old"].node == "n1"
    assert d.skipped == ("shop/hostnet: hostNetwork pods are not run by the local cluster",)
    assert d.pod("shop/web") is by["shop/web"] and d.pod("nope/x") is None


def test_without_proxies_no_pod_is_ambient() -> None:
    assert not any(p.ambient for p in desired_state(_config(), mesh=False).pods)


def test_placement_is_kept_across_reloads() -> None:
    first = desired_state(_config())
    extra = MESH + """
---
apiVersion: v1
kind: Pod
metadata: {name: aaa, namespace: legacy}
spec:
  containers: [{name: c}]
"""
    again = desired_state(_config(extra), previous=first)
    before = {p.uid: p.node for p in first.pods}
    after = {p.uid: p.node for p in again.pods}
    assert all(after[u] == n for u, n in before.items())


def test_one_default_node_when_none_is_named() -> None:
    cfg = _config("""
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: default}
spec:
  containers: [{name: c, command: ["true"]}]
""")
    d = desired_state(cfg)
    assert d.nodes == (DEFAULT_NODE,) and d.pods[0].node == DEFAULT_NODE


def test_container_argv_follows_kubernetes() -> None:
    assert container_argv(Container("c", command=("a",), args=("b", "c"))) == ("a", "b", "c")
    assert container_argv(Container("c", args=("echo", "x"))) == ("echo", "x")
    assert container_argv(Container("c")) == IDLE_COMMAND


def test_container_env() -> None:
    pod = desired_state(_config()).pod("shop/web")
    assert pod is not None
    env = container_env({"PATH": "/bin", "SECRET_TOKEN": "x", "LANG": "C.UTF-8"}, pod, "10.0.0.2",
                        (EnvVar("A", "1"), EnvVar("FROM_REF", None), EnvVar("HOSTNAME", "custom")))
    assert env["PATH"] == "/bin" and env["LANG"] == "C.UTF-8" and "SECRET_TOKEN" not in env
    assert env["POD_IP"] == "10.0.0.2" and env["POD_NAMESPACE"] == "shop" and env["NODE_NAME"] == "n1"
    assert env["A"] == "1" and "FROM_REF" not in env
    assert env["HOSTNAME"] == "custom"  # the container's env wins over the defaults


def test_addresses_and_service_endpoints() -> None:
    cfg = _config()
    d = desired_state(cfg)
    plan = plan_network("t", d.nodes, pod_specs(d, cfg), d.services)
    doc = addresses_document(plan)
    assert set(doc["pod_ips"]) == {"shop/web", "shop/free", "legacy/old"}
    assert doc["service_vips"] == {"shop/web": str(plan.service("shop", "web").vip)}
    eps = service_endpoints(cfg, plan)[("shop", "web")]
    vip = str(plan.service("shop", "web").vip)
    web_ip, free_ip = str(plan.pod("shop", "web").ip), str(plan.pod("shop", "free").ip)
    http = next(e for e in eps if e[1] == 80)
    assert http[0] == vip and sorted(http[2]) == sorted([(web_ip, 8080), (free_ip, 9090)])
    raw = next(e for e in eps if e[1] == 81)
    assert sorted(raw[2]) == sorted([(web_ip, 7000), (free_ip, 7000)])


def test_loopback_ips_are_distinct_and_not_the_host() -> None:
    ips = loopback_ips(desired_state(_config()))
    assert len(set(ips.values())) == 3 and "127.0.0.1" not in ips.values()
    assert all(ip.startswith("127.0.0.") for ip in ips.values())


def test_waypoint_and_gateway_commands_get_the_cluster_options() -> None:
    add = ("-f", "/s/config", "--ca-dir", "/s/ca", "--addresses", "/s/a.json")
    argv = ("zerotunnel", "waypoint", "--gateway", "ns/wp")
    assert with_mesh_options(argv, "/s/config", "/s/ca", "/s/a.json") == (*argv, *add)
    full = ("/venv/bin/zerotunnel", "gateway", "-f", "mine", "--ca-dir", "x", "--addresses", "y")
    assert with_mesh_options(full, "/s/config", "/s/ca", "/s/a.json") == full
    for other in (("zerotunnel", "demo-app"), ("sleep", "waypoint"), ("zerotunnel",)):
        assert with_mesh_options(other, "c", "d", "e") == other


def test_waypoint_pods_are_recognised() -> None:
    cfg = _config(MESH + """
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: shop, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Pod
metadata:
  name: wp
  namespace: shop
  labels: {gateway.networking.k8s.io/gateway-name: wp, istio.io/dataplane-mode: none}
spec:
  containers: [{name: c, command: ["zerotunnel", "waypoint", "--gateway", "shop/wp"]}]
""")
    d = desired_state(cfg)
    wp = d.pod("shop/wp")
    assert wp is not None and wp.waypoint_of == "shop/wp" and not wp.ambient
    web = d.pod("shop/web")
    assert web is not None and web.waypoint_of is None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d", "e"]),
                          st.sampled_from([None, "n1", "n2", "n3"])),
                min_size=1, max_size=8, unique_by=lambda t: t[0]),
       st.lists(st.sampled_from(["n1", "n2", "n3"]), max_size=3, unique=True))
def test_placement_invariants(pods: list[tuple[str, str | None]], nodes: list[str]) -> None:
    docs = [f"apiVersion: v1\nkind: Node\nmetadata: {{name: {n}}}\n" for n in nodes]
    for name, node in pods:
        spec = f"  nodeName: {node}\n" if node else ""
        meta = "metadata: {name: " + name + ", namespace: default}\n"
        docs.append("apiVersion: v1\nkind: Pod\n" + meta + "spec:\n" + spec + "  containers: [{name: c}]\n")
    cfg = _config("---\n".join(docs))
    d = desired_state(cfg)
    named = set(nodes) | {node for _, node in pods if node}
    assert set(d.nodes) == (named or {DEFAULT_NODE})
    placed = {p.name: p.node for p in d.pods}
    assert set(placed) == {name for name, _ in pods}
    for name, node in pods:
        assert placed[name] == (node or placed[name]) and placed[name] in d.nodes
    # a reload keeps every placement
    again = desired_state(cfg, previous=d)
    assert {p.name: p.node for p in again.pods} == placed


GATEWAY = """
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Pod
metadata: {name: ingress, namespace: istio-system, labels: {istio: ingressgateway}}
spec:
  containers: [{name: gw, command: ["zerotunnel", "gateway", "--gateway", "istio-system/public"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: every, namespace: istio-system, labels: {istio: ingressgateway}}
spec:
  containers: [{name: gw, command: ["/usr/bin/zerotunnel", "gateway"]}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: public, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
    - port: {number: 443, name: https, protocol: HTTPS}
      hosts: ["shop/www.example.com"]
      tls: {mode: SIMPLE, credentialName: cert}
    - port: {number: 80, name: http, protocol: HTTP}
      hosts: ["www.example.com"]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: other, namespace: istio-system}
spec:
  selector: {istio: elsewhere}
  servers:
    - port: {number: 8443, name: https, protocol: HTTPS}
      hosts: ["*"]
      tls: {mode: SIMPLE, credentialName: c}
"""


def test_gateway_pods_get_host_access_and_an_address() -> None:
    config = load([("mesh.yaml", MESH), ("gw.yaml", GATEWAY)])
    d = desired_state(config)
    by_uid = {p.uid: p for p in d.pods}
    assert by_uid["istio-system/ingress"].gateway_of == "istio-system/public"
    assert by_uid["istio-system/every"].gateway_of == "*"
    assert by_uid["shop/web"].gateway_of is None
    assert needs_host_access(d)
    assert not needs_host_access(desired_state(load([("mesh.yaml", MESH)])))
    plan = plan_network("c", d.nodes, pod_specs(d, config), d.services, host_access=True)
    found = {a.pod: a for a in ingress_addresses(config, d, plan)}
    ingress = found["ingress"]
    assert ingress.ip == str(plan.pod("istio-system", "ingress").ip)
    assert (ingress.gateway, ingress.ports) == ("istio-system/public", (80, 443))
    assert ingress.hosts == ("www.example.com",)
    # serving every Gateway still binds only those whose selector matches the pod's labels
    assert (found["every"].gateway, found["every"].ports) == ("istio-system/public", (80, 443))
    assert ingress.to_json()["ports"] == [80, 443]
    assert gateway_of((Container(name="c", command=("zerotunnel", "gateway", "--gateway=a/b")),)) == "a/b"
    assert gateway_of((Container(name="c", command=("zerotunnel", "waypoint")),)) is None
