"""zerotunnel.config.schema: strict validation, the custom scalar types, every upstream field accepted."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from zerotunnel.config import schema as s


def errors(model: type[s.Strict], data: object) -> list[tuple[tuple[object, ...], str]]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return [(tuple(e["loc"]), e["type"]) for e in info.value.errors()]


def test_strict_types_do_not_coerce() -> None:
    assert errors(s.ContainerPortSchema, {"containerPort": "80"}) == [(("containerPort",), "int_type")]
    assert errors(s.EnvVarSchema, {"name": 5}) == [(("name",), "string_type")]
    assert errors(s.PodSpecSchema, {"containers": [], "hostNetwork": "true"}) == [
        (("hostNetwork",), "bool_type")
    ]


@pytest.mark.parametrize(
    ("value", "ok"), [(80, True), ("http", True), (True, False), (1.5, False), ([], False)]
)
def test_int_or_string(value: object, ok: bool) -> None:
    data = {"port": 80, "targetPort": value}
    if ok:
        assert s.ServicePortSchema.model_validate(data).targetPort == value
    else:
        assert errors(s.ServicePortSchema, data) == [(("targetPort",), "int_or_string")]


def test_port_keys_accept_ints_and_digit_strings() -> None:
    spec = s.PeerAuthenticationSpec.model_validate({"portLevelMtls": {8080: {}, "9090": {"mode": "STRICT"}}})
    assert spec.portLevelMtls is not None
    assert set(spec.portLevelMtls) == {8080, 9090}
    assert errors(s.PeerAuthenticationSpec, {"portLevelMtls": {True: {}}}) == [
        (("portLevelMtls", True, "[key]"), "port_key")
    ]


def test_rule_from_alias() -> None:
    rule = s.RuleSchema.model_validate({"from": [{"source": {"principals": ["a"]}}]})
    assert rule.from_ is not None
    assert errors(s.RuleSchema, {"from_": []}) == [(("from_",), "extra_forbidden")]


def test_upstream_fields_we_ignore_are_accepted() -> None:
    s.PodDoc.model_validate(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "p",
                "uid": "u",
                "resourceVersion": "1",
                "generation": 2,
                "managedFields": [{}],
                "ownerReferences": [{"kind": "ReplicaSet"}],
                "finalizers": ["x"],
                "generateName": "p-",
            },
            "spec": {
                "containers": [
                    {
                        "name": "c",
                        "image": "i",
                        "imagePullPolicy": "Always",
                        "resources": {},
                        "livenessProbe": {},
                        "readinessProbe": {},
                        "startupProbe": {},
                        "securityContext": {},
                        "volumeMounts": [],
                        "envFrom": [],
                        "lifecycle": {},
                        "tty": True,
                        "stdin": False,
                    }
                ],
                "volumes": [],
                "securityContext": {},
                "tolerations": [],
                "affinity": {},
                "dnsPolicy": "None",
                "restartPolicy": "Never",
                "priorityClassName": "x",
                "topologySpreadConstraints": [],
            },
            "status": {
                "phase": "Running",
                "conditions": [],
                "hostIP": "1.2.3.4",
                "podIPs": [{"ip": "10.0.0.1"}],
            },
        }
    )
    s.ServiceDoc.model_validate(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "spec": {
                "type": "NodePort",
                "sessionAffinity": "ClientIP",
                "externalTrafficPolicy": "Local",
                "ipFamilies": ["IPv4"],
                "ipFamilyPolicy": "SingleStack",
                "clusterIPs": ["10.0.0.1"],
                "ports": [{"port": 80, "nodePort": 30080}],
            },
            "status": {"loadBalancer": {}},
        }
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [("BASE", "BASE"), ("DEFAULT", "BASE"), ({"normalization": "NONE"}, "NONE"), ({}, "BASE")],
)
def test_path_normalization_forms(given: object, expected: str) -> None:
    assert s.MeshConfigSpec.model_validate({"pathNormalization": given}).pathNormalization == expected


@pytest.mark.parametrize("given", ["base", 1, {"normalization": "X"}, {"mode": "BASE"}])
def test_bad_path_normalization(given: object) -> None:
    assert errors(s.MeshConfigSpec, {"pathNormalization": given}) == [
        (("pathNormalization",), "path_normalization")
    ]
