"""The README's main job, `scripts/demo.sh`, run as a user would, from a clean state (e2e).

It must bring the seed scenario up, print the traffic matrix (identities, decision, reason, HTTP
result), explain the L7 policy with `analyze`, and leave nothing behind after its `zerotunnel down`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from zerotunnel.cluster import netns, network, runner
from zerotunnel.cluster.state import STATE_ENV, ClusterDir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_main_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STATE_ENV, raising=False)
    runner.down("zerotunnel")  # a clean state: no cluster of that name, no leftovers
    env = {k: v for k, v in os.environ.items() if k != STATE_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    proc = subprocess.run([str(ROOT / "scripts" / "demo.sh")], capture_output=True, text=True, env=env,
                          timeout=280, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert re.search(r"cluster zerotunnel ready", out) and re.search(r"ready in \d+\.\d s", out)
    blocks = out.split("$ zerotunnel exec ")[1:]
    assert len(blocks) == 3, out
    allow, deny, other = blocks
    assert allow.startswith("-n namespace-b app-b -- curl -s http://app-a.namespace-a/data")
    assert other.startswith("-n namespace-b app-b -- curl -s http://app-a.namespace-a/other")
    assert "client identity  spiffe://cluster.local/ns/namespace-b/sa/service-account-b" in allow
    assert "server identity  spiffe://cluster.local/ns/namespace-a/sa/service-account-a" in allow
    assert "decision         ALLOW" in allow and "HTTP result      200" in allow
    assert "client identity  spiffe://cluster.local/ns/namespace-c/sa/service-account-c" in deny
    assert "decision         DENY" in deny
    if "istio.io/use-waypoint" in (ROOT / "examples" / "seed" / "mesh.yaml").read_text():
        # through the seed's waypoint: the L7 rule decides, and a denial is its 403
        assert "reason           allowed by: namespace-a/app-a-allow-get-data" in allow
        assert "by waypoint namespace-a/waypoint" in deny and "HTTP result      403" in deny
        assert "decision         DENY" in other and "HTTP result      403" in other
    else:
        assert "reason           allowed by: namespace-a/app-a-allow-app-b-only" in allow
        assert ("reason           connection closed due to policy rejection: explicitly denied by: "
                "namespace-a/app-a-deny-app-c") in deny
        assert "HTTP result      no response" in deny
        assert "decision         ALLOW" in other  # a node proxy cannot see the path
    assert "ZT002" in out and "namespace-a/app-a-allow-app-b-only" in out  # analyze on the L7 policy
    assert "cluster zerotunnel removed" in out
    assert network.find_leftovers("zerotunnel").empty
    assert not [n for n in netns.list_netns() if n.startswith("zt-zerotunnel-")]
    assert not ClusterDir.for_cluster("zerotunnel").exists()
