"""Gateway configuration: Secret key lookup and error texts (istio-ambient.md §7.2), modes, host
matching and VirtualService routing."""

from __future__ import annotations

import pytest

from tests.gateway.conftest import ExternalPki, b64, gateway_yaml
from tests.waypoint.conftest import SEED
from zerotunnel.config import Config, load
from zerotunnel.gateway.config import (
    GatewayConfigError,
    fqdn,
    gateway_identity,
    host_matches,
    plan_server,
    route_request,
    selected_gateways,
    strip_port,
    tls_material,
)


def _config(extra: str) -> Config:
    return load([("mesh.yaml", SEED.read_text()), ("extra.yaml", extra)])


def _secret(name: str, data: dict[str, bytes]) -> str:
    lines = "\n".join(f"  {k}: {b64(v)}" for k, v in data.items())
    return (
        f"apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: istio-system}}\ndata:\n{lines}\n"
    )


NS = "apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n---\n"


def test_secret_keys(ext: ExternalPki) -> None:
    cert, key, ca = ext.server.cert_pem, ext.server.key_pem, ext.partner_a.cert_pem
    generic = _config(
        NS + _secret("s", {"cert": cert, "key": key, "cacert": ca, "tls.crt": b"x", "tls.key": b"y"})
    )
    m = tls_material(generic, "istio-system", "s", need_ca=True)
    assert (m.cert_pem, m.ca_pem) == (cert, ca)  # generic keys win (§7.2)
    separate = _config(
        NS + _secret("s", {"tls.crt": cert, "tls.key": key}) + "---\n" + _secret("s-cacert", {"ca.crt": ca})
    )
    assert tls_material(separate, "istio-system", "s", need_ca=True).ca_pem == ca
    missing = _config(NS + _secret("s", {"tls.crt": cert}))
    with pytest.raises(GatewayConfigError, match=r"didn't have expected keys .* found: tls.crt"):
        tls_material(missing, "istio-system", "s", need_ca=False)
    empty = _config(NS + _secret("s", {"cert": cert, "key": key, "cacert": b" "}))
    with pytest.raises(GatewayConfigError, match='found key "cacert", but it was empty'):
        tls_material(empty, "istio-system", "s", need_ca=True)
    no_ca = _config(NS + _secret("s", {"tls.crt": cert, "tls.key": key}))
    with pytest.raises(GatewayConfigError, match="no CA certificates"):
        tls_material(no_ca, "istio-system", "s", need_ca=True)
    with pytest.raises(GatewayConfigError, match="not found"):
        tls_material(no_ca, "istio-system", "nope", need_ca=False)


def test_unsupported_mode_and_sans_need_mutual(ext: ExternalPki) -> None:
    text = gateway_yaml(ext, 10443, 10444).replace("mode: OPTIONAL_MUTUAL", "mode: ISTIO_MUTUAL")
    config = _config(text)
    gw = selected_gateways(config, "istio-system/ingress")[0]
    assert plan_server(config, gw, gw.servers[0]).mode == "MUTUAL"
    with pytest.raises(GatewayConfigError, match="ISTIO_MUTUAL is not supported"):
        plan_server(config, gw, gw.servers[1])


@pytest.mark.parametrize(
    ("pattern", "host", "ok"),
    [
        ("app.example.com", "app.example.com", True),
        ("app.example.com", "APP.Example.com.", True),
        ("app.example.com", "app.example.com:443", True),
        ("*.example.com", "x.example.com", True),
        ("*.example.com", "example.com", False),
        ("*", "anything", True),
        ("ns/app.example.com", "app.example.com", True),
        ("app.example.com", "app.example.com.evil", False),
    ],
)
def test_host_matches(pattern: str, host: str, ok: bool) -> None:
    assert host_matches(pattern, host) is ok


def test_strip_port_and_fqdn() -> None:
    assert strip_port("a.b:80") == "a.b" and strip_port("[::1]:80") == "[::1]" and strip_port("a.b") == "a.b"
    assert fqdn("app-a", "ns") == "app-a.ns.svc.cluster.local"
    assert fqdn("app-a.other", "ns") == "app-a.other.svc.cluster.local"
    assert fqdn("app-a.other.svc.cluster.local", "ns") == "app-a.other.svc.cluster.local"


VS = """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: split, namespace: namespace-a}
spec:
  hosts: [api.example.com]
  gateways: [istio-system/ingress]
  http:
  - name: exact
    match: [{uri: {exact: /v1/login}}]
    route: [{destination: {host: login}}]
  - name: prefix
    match: [{uri: {prefix: /v1/}}]
    route: [{destination: {host: app-a, port: {number: 80}}}]
  - name: regex
    match: [{uri: {regex: "/v[0-9]+/admin"}}]
    route: [{destination: {host: admin}}]
"""


def test_route_request(ext: ExternalPki) -> None:
    text = (
        gateway_yaml(ext, 10443, 10444).replace("hosts: [app.example.com]", "hosts: ['*.example.com']") + VS
    )
    config = _config(text)
    route = route_request(config, "istio-system/ingress", ("*.example.com",), "api.example.com", "/v1/login")
    assert route is not None and (route.hostname, route.route) == (
        "login.namespace-a.svc.cluster.local",
        "exact",
    )
    route = route_request(config, "istio-system/ingress", ("*.example.com",), "API.example.com:443", "/v1/x")
    assert route is not None and (route.hostname, route.port, route.route) == (
        "app-a.namespace-a.svc.cluster.local",
        80,
        "prefix",
    )
    route = route_request(config, "istio-system/ingress", ("*.example.com",), "api.example.com", "/v2/admin")
    assert route is not None and route.route == "regex"
    assert (
        route_request(config, "istio-system/ingress", ("*.example.com",), "api.example.com", "/other") is None
    )
    assert route_request(config, "istio-system/other", ("*.example.com",), "api.example.com", "/v1/x") is None
    assert (
        route_request(config, "istio-system/ingress", ("app.example.com",), "api.example.com", "/v1/x")
        is None
    )


def test_gateway_identity(ext: ExternalPki) -> None:
    config = _config(gateway_yaml(ext, 10443, 10444))
    gw = selected_gateways(config, None)[0]
    assert gateway_identity(config, gw) == (
        "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
    )
