"""The ingress step of the main job: cases, certificates, gateway choice and rendering (unit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from zerotunnel.cluster.ingress import IngressResult, describe_certificate, parse_case, pick_gateway, render
from zerotunnel.errors import InputError

CLIENTS = Path(__file__).resolve().parents[2] / "examples" / "seed" / "gateway" / "clients"


def test_parse_case_needs_the_certificate_and_key() -> None:
    stem = str(CLIENTS / "partner-a")
    assert parse_case(f"{stem}=https://app-a.example.com/data") == (stem, "https://app-a.example.com/data")
    for bad in (f"{stem}", f"{stem}=app-a.example.com/data", "=https://x/", f"{CLIENTS / 'nobody'}=https://x/"):
        with pytest.raises(InputError):
            parse_case(bad)


def test_describe_certificate_names_the_external_ca() -> None:
    assert describe_certificate(CLIENTS / "partner-b.crt") == (
        "CN=partner-b-client,O=partner-b, issued by CN=partner-b root CA,O=partner-b")


def test_pick_gateway_by_host() -> None:
    a = {"namespace": "istio-system", "pod": "a", "ip": "10.0.0.2", "hosts": ["a.example.com"]}
    wild = {"namespace": "istio-system", "pod": "w", "ip": "10.0.0.3", "hosts": ["*.example.org"]}
    status = {"gateways": [a, wild]}
    assert pick_gateway(status, "a.example.com") is a
    assert pick_gateway(status, "x.example.org") is wild
    assert pick_gateway(status, "unknown.test") is a  # none serves it: the first, whose 404 then shows
    with pytest.raises(InputError, match="no ingress gateway"):
        pick_gateway({"gateways": []}, "a.example.com")


def test_render() -> None:
    gw = "istio-system/gw 10.0.0.2:443"
    ok = IngressResult("partner-a", "https://h/data", "curl --cert c.crt https://h/data",
                       "CN=c, issued by CN=ca", gw, "ALLOW", "allowed by: ns/p", "gateway -> waypoint",
                       "200", "By=spiffe://td/x;Hash=00")
    refused = IngressResult("stranger", "https://h/data", "curl https://h/data", "CN=s, issued by CN=s",
                            gw, "DENY", "client certificate refused: unknown",
                            "refused at the gateway", "no response (curl exit 56)", "-")
    text = render([ok, refused]).splitlines()
    assert text[0] == "$ curl --cert c.crt https://h/data"
    assert "  decision         ALLOW" in text and "  XFCC at app      By=spiffe://td/x;Hash=00" in text
    assert "  reason           client certificate refused: unknown" in text
    assert sum(1 for line in text if line.startswith("  XFCC")) == 1
