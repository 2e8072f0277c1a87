"""The waypoint end to end on loopback: real TLS, real HBONE clients, the demo app behind a node proxy."""

from __future__ import annotations

import json

from tests.waypoint.conftest import TD, Mesh

from zerotunnel.identity.spiffe import SpiffeId


async def test_seed_policy_allows_get_data_from_app_b(mesh: Mesh) -> None:
    response = await mesh.request("GET", "/data")
    assert response.status == 200, response.body
    echo = json.loads(response.body)
    assert echo["path"] == "/data"
    assert echo["name"] == "app-a"
    # the destination node proxy saw the waypoint's identity, not app-b's (§6.1)
    assert [str(r.source_identity) for r in mesh.seen] == [f"spiffe://{TD}/ns/namespace-a/sa/waypoint"]
    assert mesh.waypoint.identity == SpiffeId.istio(TD, "namespace-a", "waypoint")


async def test_seed_policy_denies_post_and_app_c(mesh: Mesh) -> None:
    post = await mesh.request("POST", "/data", body=b"x")
    assert (post.status, post.body) == (403, b"RBAC: access denied")
    other = await mesh.request("GET", "/data", ns="namespace-c", sa="service-account-c")
    assert (other.status, other.body) == (403, b"RBAC: access denied")
    assert mesh.seen == []  # nothing denied ever reached the destination
    denied = [line for line in mesh.logs if line["response_code"] == 403]
    assert len(denied) == 2
    assert denied[0]["reason"] == "allow policies exist, but none allowed"
    assert denied[0]["response_code_details"] == "rbac_access_denied_matched_policy[none]"
    assert denied[1]["src_identity"].endswith("/ns/namespace-c/sa/service-account-c")
