"""The CA's authorization rule (spec/istio-ambient.md §3.2, security.md rule 7), without gRPC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from zerotunnel.config import Config, load
from zerotunnel.control.ca_service import (
    CaDenied,
    CaService,
    authorize,
    node_identity,
    node_name_of,
    requested_ttl,
)
from zerotunnel.identity.ca import CertificateAuthority
from zerotunnel.identity.csr import generate_key, make_csr
from zerotunnel.identity.spiffe import SpiffeId

NOW = datetime.now(UTC)
TD = "cluster.local"
YAML = """
apiVersion: zerotunnel.io/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec: {trustDomain: cluster.local}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop}
spec: {serviceAccountName: web, nodeName: node-a, containers: [{name: app, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop}
spec: {serviceAccountName: web, nodeName: node-b, containers: [{name: app, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop}
spec: {serviceAccountName: db, nodeName: node-b, containers: [{name: app, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: shop}
spec: {serviceAccountName: batch, containers: [{name: app, image: x}]}
"""


@pytest.fixture(scope="module")
def config() -> Config:
    return load([("mesh.yaml", YAML)])


def _id(ns: str, sa: str, td: str = TD) -> SpiffeId:
    return SpiffeId.istio(td, ns, sa)


def _denied(config: Config, caller: SpiffeId | None, wanted: object) -> str:
    meta = {} if wanted is None else {"ImpersonatedIdentity": wanted}
    with pytest.raises(CaDenied) as err:
        authorize(config, caller, meta)
    return err.value.code


def test_node_identity_shape() -> None:
    ident = node_identity(TD, "node-a")
    assert str(ident) == "spiffe://cluster.local/zerotunnel/node/node-a"
    assert node_name_of(ident) == "node-a"
    # no pod identity can be mistaken for a node identity
    assert node_name_of(_id("istio-system", "ztunnel")) is None
    assert node_name_of(SpiffeId.parse("spiffe://cluster.local/zerotunnel/node/a/b")) is None
    assert node_name_of(SpiffeId.parse("spiffe://cluster.local/zerotunnel/node")) is None


def test_a_node_may_impersonate_pods_scheduled_on_it(config: Config) -> None:
    node_a, node_b = node_identity(TD, "node-a"), node_identity(TD, "node-b")
    assert authorize(config, node_a, {"ImpersonatedIdentity": str(_id("shop", "web"))}).identity == _id(
        "shop", "web"
    )
    # web runs on both nodes; db only on node-b
    assert authorize(config, node_b, {"ImpersonatedIdentity": str(_id("shop", "web"))}).node == "node-b"
    assert authorize(config, node_b, {"ImpersonatedIdentity": str(_id("shop", "db"))}).identity == _id(
        "shop", "db"
    )
    assert _denied(config, node_a, str(_id("shop", "db"))) == "permission-denied"


def test_made_up_unscheduled_and_foreign_identities_are_denied(config: Config) -> None:
    node_a = node_identity(TD, "node-a")
    assert _denied(config, node_a, str(_id("shop", "admin"))) == "permission-denied"
    assert _denied(config, node_a, str(_id("shop", "batch"))) == "permission-denied"  # no nodeName
    assert _denied(config, node_a, str(_id("shop", "web", "other.td"))) == "permission-denied"
    # a node may not obtain another node's identity
    assert _denied(config, node_a, str(node_identity(TD, "node-b"))) == "permission-denied"
    assert _denied(config, node_identity(TD, "node-z"), str(_id("shop", "web"))) == "permission-denied"


def test_callers_that_are_not_nodes(config: Config) -> None:
    assert _denied(config, None, str(_id("shop", "web"))) == "unauthenticated"
    assert _denied(config, None, None) == "unauthenticated"
    assert _denied(config, node_identity("other.td", "node-a"), None) == "unauthenticated"
    # a workload may not renew itself nor impersonate, even its own identity
    assert _denied(config, _id("shop", "web"), None) == "permission-denied"
    assert _denied(config, _id("shop", "web"), str(_id("shop", "web"))) == "permission-denied"


def test_bad_metadata(config: Config) -> None:
    node_a = node_identity(TD, "node-a")
    assert _denied(config, node_a, "shop/web") == "invalid-argument"
    assert _denied(config, node_a, "spiffe://cluster.local/ns/shop/sa/web/") == "invalid-argument"
    assert _denied(config, node_a, 42) == "invalid-argument"
    # no impersonation: the node renews its own identity
    assert authorize(config, node_a, {}).identity == node_a
    assert authorize(config, node_a, {"ImpersonatedIdentity": ""}).identity == node_a


def test_ttl_rules(config: Config) -> None:
    assert requested_ttl(config, 0) == timedelta(hours=24)
    assert requested_ttl(config, -5) == timedelta(hours=24)
    assert requested_ttl(config, 3600) == timedelta(hours=1)
    assert requested_ttl(config, 90 * 86400) == timedelta(days=90)
    with pytest.raises(CaDenied) as err:
        requested_ttl(config, 90 * 86400 + 1)
    assert err.value.code == "invalid-argument" and "max allowed TTL" in err.value.message


@settings(max_examples=60, deadline=None)
@given(
    node=st.sampled_from(["node-a", "node-b", "node-c"]),
    ns=st.sampled_from(["shop", "istio-system", "default"]),
    sa=st.sampled_from(["web", "db", "batch", "ztunnel", "admin"]),
)
def test_grant_implies_a_pod_with_that_identity_on_that_node(node: str, ns: str, sa: str) -> None:
    config = load([("mesh.yaml", YAML)])
    wanted = _id(ns, sa)
    try:
        grant = authorize(config, node_identity(TD, node), {"ImpersonatedIdentity": str(wanted)})
    except CaDenied as exc:
        assert exc.code == "permission-denied"
        assert not any(p.node_name == node and config.identity_of(p) == str(wanted) for p in config.pods)
        return
    assert grant.identity == wanted and grant.node == node
    assert any(p.node_name == node and config.identity_of(p) == str(wanted) for p in config.pods)


def test_service_signs_the_authorized_identity_and_counts(config: Config) -> None:
    ca = CertificateAuthority.create_root(TD, NOW)
    service = CaService(lambda: ca, lambda: config)
    node_a = node_identity(TD, "node-a")
    web = _id("shop", "web")
    chain = service.create_certificate(
        node_a, make_csr(web, generate_key()), 0, {"ImpersonatedIdentity": str(web)}, now=NOW
    )
    leaf = x509.load_pem_x509_certificate(chain.leaf_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(web)]
    with pytest.raises(CaDenied):
        service.create_certificate(
            node_a, make_csr(web, generate_key()), 0, {"ImpersonatedIdentity": str(_id("shop", "db"))},
            now=NOW,
        )
    with pytest.raises(CaDenied) as err:  # a CSR that names someone else
        service.create_certificate(
            node_a, make_csr(_id("shop", "db"), generate_key()), 0, {"ImpersonatedIdentity": str(web)},
            now=NOW,
        )
    assert err.value.code == "invalid-argument"
    with pytest.raises(CaDenied) as err:
        service.create_certificate(node_a, b"garbage", 0, {"ImpersonatedIdentity": str(web)}, now=NOW)
    assert err.value.code == "invalid-argument"
    stats = service.stats()
    assert stats.issued == 1 and stats.per_node == {"node-a": 1}
    assert stats.refused == {"permission-denied": 1, "invalid-argument": 2}
