from __future__ import annotations

from pathlib import Path

import pytest

from zerotunnel.config import Config, load
from zerotunnel.mesh.build import Addresses, build_mesh
from zerotunnel.mesh.model import MeshState

SEED_ADDRESSES = Addresses(
    pod_ips={
        "namespace-a/app-a": "10.244.1.2",
        "namespace-b/app-b": "10.244.2.2",
        "namespace-c/app-c": "10.244.2.3",
        "namespace-a/waypoint-0": "10.244.1.3",
    },
    service_vips={"namespace-a/app-a": "10.96.0.10"},
)
SEED = Path(__file__).resolve().parents[2] / "examples" / "seed" / "mesh.yaml"

WAYPOINT_EXTRA = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: namespace-a, labels: {istio.io/waypoint-for: all}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-0
  namespace: namespace-a
  labels: {gateway.networking.k8s.io/gateway-name: waypoint}
spec:
  serviceAccountName: waypoint
  nodeName: node-1
  containers: [{name: waypoint, command: [zerotunnel, waypoint]}]
"""


@pytest.fixture
def seed_config() -> Config:
    return load([(str(SEED), SEED.read_text())])


@pytest.fixture
def seed_with_waypoint_config() -> Config:
    ns_labels = "  name: namespace-a\n  labels:\n"
    text = SEED.read_text().replace(ns_labels, ns_labels + "    istio.io/use-waypoint: waypoint\n")
    return load([(str(SEED), text), ("waypoint.yaml", WAYPOINT_EXTRA)])


@pytest.fixture
def seed_state(seed_config: Config) -> MeshState:
    return build_mesh(seed_config, SEED_ADDRESSES)


@pytest.fixture
def seed_with_waypoint_state(seed_with_waypoint_config: Config) -> MeshState:
    return build_mesh(seed_with_waypoint_config, SEED_ADDRESSES)
