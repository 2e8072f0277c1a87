"""MeshForwarder's routes other than HBONE: an endpoint outside the mesh (plain TCP, §2.4 step 5)
and a service without endpoints (503 with the routing reason)."""

from __future__ import annotations

import json
import random

from tests.waypoint.conftest import SEED, VIP
from zerotunnel.config import load
from zerotunnel.demoapp import start_demo_app
from zerotunnel.mesh.build import Addresses, build_mesh
from zerotunnel.mesh.model import Workload
from zerotunnel.node.hbone_client import HbonePool
from zerotunnel.waypoint.forward import MeshForwarder
from zerotunnel.waypoint.http import HttpRequest
from zerotunnel.waypoint.telemetry import RequestRecord

SOURCE = Workload(
    uid="istio-system/gw",
    name="gw",
    namespace="istio-system",
    service_account="gw",
    identity="spiffe://cluster.local/ns/istio-system/sa/gw",
    ip=None,
    node=None,
)


def _record() -> RequestRecord:
    return RequestRecord(method="GET", path="/x", authority="app-a", protocol="HTTP/1.1")


async def test_out_of_mesh_endpoint_gets_plain_tcp_and_keepalive() -> None:
    text = SEED.read_text().replace(
        "  name: namespace-a\n  labels:\n    istio.io/dataplane-mode: ambient\n", "  name: namespace-a\n"
    )
    config = load([("mesh.yaml", text)])
    app_ip = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}.2"
    state = build_mesh(
        config, Addresses(pod_ips={"namespace-a/app-a": app_ip}, service_vips={"namespace-a/app-a": VIP})
    )
    lines: list[str] = []
    app = await start_demo_app(app_ip, 8080, "app-a", log=lines.append)
    forwarder = MeshForwarder(HbonePool(lambda _i: None, mark=False))  # type: ignore[arg-type,return-value]
    try:
        for path in ("/one", "/two"):
            record = _record()
            response = await forwarder.forward(
                state, SOURCE, (VIP, 80), HttpRequest("GET", path, [("host", "a")]), path, [], record
            )
            assert response.status == 200
            assert json.loads(response.body)["path"] == path
            assert record.upstream_host == f"{app_ip}:8080"
        assert len(lines) == 2
        assert [len(v) for v in forwarder._idle.values()] == [1]  # one kept-alive connection served both
    finally:
        forwarder.close_idle()
        await app.close()


async def test_no_endpoint_is_503_with_reason() -> None:
    text = SEED.read_text().replace(
        "    app: app-a\nspec:\n  serviceAccountName", "    app: other\nspec:\n  serviceAccountName"
    )
    config = load([("mesh.yaml", text)])
    state = build_mesh(config, Addresses(service_vips={"namespace-a/app-a": VIP}))
    forwarder = MeshForwarder(HbonePool(lambda _i: None, mark=False))  # type: ignore[arg-type,return-value]
    record = _record()
    response = await forwarder.forward(state, SOURCE, (VIP, 80), HttpRequest("GET", "/", []), "/", [], record)
    assert response.status == 503
    assert b"no healthy upstream for app-a.namespace-a.svc.cluster.local:80" in response.body
    assert record.response_flags == "UH"
