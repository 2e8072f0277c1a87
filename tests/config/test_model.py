"""zerotunnel.config.model: the frozen objects and the Config accessors."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from zerotunnel.config import model as m


def meta(name: str, namespace: str = "demo", **labels: str) -> m.ObjectMeta:
    return m.ObjectMeta(name=name, namespace=namespace, labels=m.FrozenMap(labels))


def pod(
    name: str, namespace: str = "demo", sa: str = "default", host_network: bool = False, **labels: str
) -> m.Pod:
    return m.Pod(meta(name, namespace, **labels), sa, None, (m.Container("c"),), host_network=host_network)


def test_frozen_map_is_a_read_only_hashable_mapping() -> None:
    a = m.FrozenMap({"x": "1", "y": "2"})
    b = m.FrozenMap({"y": "2", "x": "1"})
    assert a == b == {"x": "1", "y": "2"}
    assert hash(a) == hash(b)
    assert len(a) == 2
    assert list(a) == ["x", "y"]
    assert a != m.FrozenMap({"x": "1"})
    with pytest.raises(TypeError):
        a["z"] = "3"  # type: ignore[index]
    assert repr(m.FrozenMap({"a": "b"})) == "FrozenMap({'a': 'b'})"


def test_model_types_are_frozen_slotted_dataclasses() -> None:
    for name in dir(m):
        cls = getattr(m, name)
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            params = cls.__dataclass_params__  # type: ignore[attr-defined]
            assert params.frozen, name
            assert hasattr(cls, "__slots__"), name


def test_workload_selector_matches_subset_of_labels() -> None:
    selector = m.WorkloadSelector(m.FrozenMap({"app": "web"}))
    assert selector.matches({"app": "web", "version": "v1"})
    assert not selector.matches({"app": "db"})
    assert not selector.matches({})
    assert m.WorkloadSelector(m.FrozenMap()).matches({})


def test_config_accessors() -> None:
    config = m.Config(
        namespaces=(
            m.Namespace(meta("demo", "", **{m.AMBIENT_LABEL: "ambient"})),
            m.Namespace(meta("off", "")),
        ),
        pods=(pod("a", sa="web"), pod("b", "off"), pod("h", host_network=True)),
        services=(m.Service(meta("svc"), None, ()),),
        secrets=(m.Secret(meta("s"), "Opaque", m.FrozenMap()),),
        nodes=(m.Node(meta("n", "")),),
    )
    assert config.namespace("demo") is config.namespaces[0]
    assert config.namespace("nope") is None
    assert [p.meta.name for p in config.pods_in("demo")] == ["a", "h"]
    assert config.pod("off", "b") is config.pods[1]
    assert config.service("demo", "svc") is config.services[0]
    assert config.secret("demo", "s") is config.secrets[0]
    assert config.node("n") is config.nodes[0]
    assert config.is_ambient("demo")
    assert not config.is_ambient("off")
    assert not config.is_ambient("missing")
    assert config.pod_is_ambient(config.pods[0])
    assert not config.pod_is_ambient(config.pods[1])
    assert not config.pod_is_ambient(config.pods[2])  # host network: nothing to capture
    assert config.identity_of(config.pods[0]) == "spiffe://cluster.local/ns/demo/sa/web"


def test_mesh_defaults_are_istios() -> None:
    mesh = m.MeshConfig()
    assert mesh.trust_domain == "cluster.local"
    assert mesh.root_namespace == "istio-system"
    assert mesh.workload_cert_ttl == timedelta(hours=24)
    assert mesh.max_workload_cert_ttl == timedelta(days=90)
    assert mesh.path_normalization == "BASE"


def test_k8s_gateway_waypoint_helpers() -> None:
    gw = m.K8sGateway(meta("w", **{m.WAYPOINT_FOR_LABEL: "workload"}), "istio-waypoint", ())
    assert gw.is_waypoint
    assert gw.waypoint_for == "workload"
    assert m.K8sGateway(meta("g"), "istio", ()).waypoint_for == "service"
