"""The generated SPIFFE Workload API module (spec/users-spiffe-conventions.md §3.2).

py-spiffe must talk to our server unchanged, so the method paths and wire encoding are checked against
py-spiffe's own generated stub, over a real Unix-socket gRPC channel.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2  # type: ignore[import-untyped]
from spiffe._proto import workload_pb2 as spiffe_pb2
from spiffe._proto import workload_pb2_grpc as spiffe_pb2_grpc

from zerotunnel.proto import workload_pb2, workload_pb2_grpc

SRC = Path(__file__).resolve().parents[2] / "src"
METHODS = ["FetchX509SVID", "FetchX509Bundles", "FetchJWTSVID", "FetchJWTBundles", "ValidateJWTSVID"]


def _build_all() -> list[object]:
    svid = workload_pb2.X509SVID(
        spiffe_id="spiffe://td/ns/a/sa/b",
        x509_svid=b"\x30\x01",
        x509_svid_key=b"\x30\x02",
        bundle=b"\x30\x03",
        hint="internal",
    )
    claims = workload_pb2.ValidateJWTSVIDResponse(spiffe_id="spiffe://td/x")
    claims.claims.update({"sub": "spiffe://td/x", "aud": ["a", "b"]})
    return [
        workload_pb2.X509SVIDRequest(),
        workload_pb2.X509SVIDResponse(
            svids=[svid], crl=[b"crl"], federated_bundles={"spiffe://other": b"\x30"}
        ),
        workload_pb2.X509BundlesRequest(),
        workload_pb2.X509BundlesResponse(crl=[b"c"], bundles={"spiffe://td": b"\x30\x04"}),
        workload_pb2.JWTSVIDRequest(audience=["a"], spiffe_id="spiffe://td/x"),
        workload_pb2.JWTSVIDResponse(
            svids=[workload_pb2.JWTSVID(spiffe_id="spiffe://td/x", svid="h.p.s", hint="h")]
        ),
        workload_pb2.JWTBundlesRequest(),
        workload_pb2.JWTBundlesResponse(bundles={"spiffe://td": b'{"keys":[]}'}),
        workload_pb2.ValidateJWTSVIDRequest(audience="a", svid="h.p.s"),
        claims,
    ]


@pytest.mark.parametrize("message", _build_all(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips_and_py_spiffe_parses_it_identically(message: object) -> None:
    cls = type(message)
    data = message.SerializeToString()  # type: ignore[attr-defined]
    assert cls.FromString(data) == message  # type: ignore[attr-defined]
    theirs = getattr(spiffe_pb2, cls.__name__).FromString(data)
    assert theirs.SerializeToString(deterministic=True) == message.SerializeToString(  # type: ignore[attr-defined]
        deterministic=True
    )


def test_descriptors_match_py_spiffes_field_for_field() -> None:
    ours = workload_pb2.DESCRIPTOR.message_types_by_name
    theirs = spiffe_pb2.DESCRIPTOR.message_types_by_name
    assert set(ours) == set(theirs)
    for name, descriptor in ours.items():
        mine = {(f.name, f.number, f.type, f.is_repeated) for f in descriptor.fields}
        other = {(f.name, f.number, f.type, f.is_repeated) for f in theirs[name].fields}
        assert mine == other, name


def test_service_has_no_package_so_paths_are_py_spiffes() -> None:
    service = workload_pb2.DESCRIPTOR.services_by_name["SpiffeWorkloadAPI"]
    assert service.full_name == "SpiffeWorkloadAPI"
    assert sorted(m.name for m in service.methods) == sorted(METHODS)
    theirs = spiffe_pb2.DESCRIPTOR.services_by_name["SpiffeWorkloadAPI"]
    assert {(m.name, m.input_type.name, m.output_type.name, m.server_streaming) for m in service.methods} == {
        (m.name, m.input_type.name, m.output_type.name, m.server_streaming) for m in theirs.methods
    }


def test_private_pool_keeps_py_spiffe_importable_alongside() -> None:
    """Both modules register `X509SVIDRequest`; ours must not collide in the default pool, in either order."""
    ours, theirs = "import zerotunnel.proto.workload_pb2_grpc", "import spiffe._proto.workload_pb2_grpc"
    for program in (f"{ours}\n{theirs}", f"{theirs}\n{ours}"):
        subprocess.run([sys.executable, "-c", program], check=True)


class _Servicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """Answers every RPC with a fixed message, so a py-spiffe stub can prove each path and encoding."""

    def FetchX509SVID(self, request: object, context: grpc.ServicerContext) -> Iterator[object]:
        yield workload_pb2.X509SVIDResponse(
            svids=[workload_pb2.X509SVID(spiffe_id="spiffe://td/x", hint="h")]
        )

    def FetchX509Bundles(self, request: object, context: grpc.ServicerContext) -> Iterator[object]:
        yield workload_pb2.X509BundlesResponse(bundles={"spiffe://td": b"\x30"})

    def FetchJWTSVID(self, request: object, context: grpc.ServicerContext) -> object:
        audience = list(request.audience)  # type: ignore[attr-defined]
        return workload_pb2.JWTSVIDResponse(
            svids=[workload_pb2.JWTSVID(spiffe_id="spiffe://td/x", svid=audience[0])]
        )

    def FetchJWTBundles(self, request: object, context: grpc.ServicerContext) -> Iterator[object]:
        yield workload_pb2.JWTBundlesResponse(bundles={"spiffe://td": b"{}"})

    def ValidateJWTSVID(self, request: object, context: grpc.ServicerContext) -> object:
        response = workload_pb2.ValidateJWTSVIDResponse(spiffe_id="spiffe://td/x")
        response.claims.update({"aud": request.audience})  # type: ignore[attr-defined]
        return response


def test_py_spiffe_stub_calls_every_method_on_our_server(tmp_path: Path) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(_Servicer(), server)  # type: ignore[no-untyped-call]
    socket_path = tmp_path / "agent.sock"
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    try:
        with grpc.insecure_channel(f"unix://{socket_path}") as channel:
            stub = spiffe_pb2_grpc.SpiffeWorkloadAPIStub(channel)  # type: ignore[no-untyped-call]
            md = (("workload.spiffe.io", "true"),)
            x509 = next(iter(stub.FetchX509SVID(spiffe_pb2.X509SVIDRequest(), metadata=md, timeout=10)))
            assert (x509.svids[0].spiffe_id, x509.svids[0].hint) == ("spiffe://td/x", "h")
            bundles = next(
                iter(stub.FetchX509Bundles(spiffe_pb2.X509BundlesRequest(), metadata=md, timeout=10))
            )
            assert dict(bundles.bundles) == {"spiffe://td": b"\x30"}
            jwt = stub.FetchJWTSVID(spiffe_pb2.JWTSVIDRequest(audience=["aud1"]), metadata=md, timeout=10)
            assert jwt.svids[0].svid == "aud1"
            jwt_bundles = next(
                iter(stub.FetchJWTBundles(spiffe_pb2.JWTBundlesRequest(), metadata=md, timeout=10))
            )
            assert dict(jwt_bundles.bundles) == {"spiffe://td": b"{}"}
            validated = stub.ValidateJWTSVID(
                spiffe_pb2.ValidateJWTSVIDRequest(audience="a1", svid="t"), metadata=md, timeout=10
            )
            assert (validated.spiffe_id, validated.claims["aud"]) == ("spiffe://td/x", "a1")
    finally:
        server.stop(None)


def test_py_spiffe_stub_paths_are_the_ones_we_serve() -> None:
    """The exact strings py-spiffe's stub dials, read from the stub it constructs."""
    seen: list[str] = []

    class _Recorder:
        def __getattr__(self, kind: str) -> object:
            def record(path: str, **_: object) -> None:
                seen.append(path)

            return record

    spiffe_pb2_grpc.SpiffeWorkloadAPIStub(_Recorder())  # type: ignore[no-untyped-call]
    assert sorted(seen) == sorted(f"/SpiffeWorkloadAPI/{m}" for m in METHODS)


def test_generated_module_matches_the_proto_source(tmp_path: Path) -> None:
    import grpc_tools  # type: ignore[import-untyped]

    out = tmp_path / "workload.pb"
    include = Path(grpc_tools.__file__).parent / "_proto"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{SRC}",
            f"-I{include}",
            f"--descriptor_set_out={out}",
            "zerotunnel/proto/workload.proto",
        ],
        check=True,
    )
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    assert _without_json_names(compiled) == descriptor_pb2.FileDescriptorProto.FromString(
        workload_pb2.DESCRIPTOR.serialized_pb
    )


def _without_json_names(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """protoc's Python generator drops the derived `json_name`; a descriptor set keeps it."""
    for message in file.message_type:
        for field in message.field:
            field.ClearField("json_name")
        for nested in message.nested_type:
            for field in nested.field:
                field.ClearField("json_name")
    return file
