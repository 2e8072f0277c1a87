"""The generated Istio CA API module: message shapes per spec/istio-ambient.md §3.2, and a real gRPC call."""

from __future__ import annotations

import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, struct_pb2  # type: ignore[import-untyped]

from zerotunnel.proto import ca_pb2, ca_pb2_grpc

SRC = Path(__file__).resolve().parents[2] / "src"


def test_request_round_trips_with_upstream_field_numbers() -> None:
    metadata = struct_pb2.Struct()
    metadata.update({"ImpersonatedIdentity": "spiffe://cluster.local/ns/a/sa/b"})
    request = ca_pb2.IstioCertificateRequest(
        csr="-----BEGIN CERTIFICATE REQUEST-----\n", validity_duration=86400, metadata=metadata
    )
    parsed = ca_pb2.IstioCertificateRequest.FromString(request.SerializeToString())
    assert parsed == request
    assert parsed.metadata["ImpersonatedIdentity"] == "spiffe://cluster.local/ns/a/sa/b"
    fields = {f.name: f.number for f in ca_pb2.IstioCertificateRequest.DESCRIPTOR.fields}
    assert fields == {"csr": 1, "validity_duration": 3, "metadata": 4}
    assert ca_pb2.IstioCertificateRequest.DESCRIPTOR.fields_by_name["metadata"].message_type.full_name == (
        "google.protobuf.Struct"
    )


def test_response_round_trips() -> None:
    response = ca_pb2.IstioCertificateResponse(cert_chain=["leaf\n", "intermediate\n", "root1\nroot2\n"])
    parsed = ca_pb2.IstioCertificateResponse.FromString(response.SerializeToString())
    assert list(parsed.cert_chain) == ["leaf\n", "intermediate\n", "root1\nroot2\n"]
    assert {f.name: f.number for f in ca_pb2.IstioCertificateResponse.DESCRIPTOR.fields} == {"cert_chain": 1}


def test_wire_bytes_match_hand_encoding() -> None:
    # field 1 (csr), wire type 2; field 3 (validity_duration), varint: what istiod and ztunnel exchange.
    encoded = ca_pb2.IstioCertificateRequest(csr="x", validity_duration=5).SerializeToString()
    assert encoded == b"\x0a\x01x\x18\x05"


def test_service_full_name() -> None:
    service = ca_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"]
    assert service.full_name == "istio.v1.auth.IstioCertificateService"
    assert [m.name for m in service.methods] == ["CreateCertificate"]


class _EchoCA(ca_pb2_grpc.IstioCertificateServiceServicer):
    def CreateCertificate(
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.ServicerContext
    ) -> ca_pb2.IstioCertificateResponse:
        identity = request.metadata["ImpersonatedIdentity"]
        return ca_pb2.IstioCertificateResponse(
            cert_chain=[request.csr, f"{identity}:{request.validity_duration}"]
        )


def test_create_certificate_over_a_real_channel_uses_istios_method_path() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(_EchoCA(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            # The raw path, as ztunnel's client sends it, reaches our servicer.
            call = channel.unary_unary(
                "/istio.v1.auth.IstioCertificateService/CreateCertificate",
                request_serializer=ca_pb2.IstioCertificateRequest.SerializeToString,
                response_deserializer=ca_pb2.IstioCertificateResponse.FromString,
            )
            metadata = struct_pb2.Struct()
            metadata.update({"ImpersonatedIdentity": "spiffe://td/ns/n/sa/s"})
            reply = call(
                ca_pb2.IstioCertificateRequest(csr="CSR", validity_duration=60, metadata=metadata), timeout=10
            )
            assert list(reply.cert_chain) == ["CSR", "spiffe://td/ns/n/sa/s:60"]
            stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
            stub_reply = stub.CreateCertificate(
                ca_pb2.IstioCertificateRequest(csr="A", metadata=metadata), timeout=10
            )
            assert list(stub_reply.cert_chain) == ["A", "spiffe://td/ns/n/sa/s:0"]
    finally:
        server.stop(None)


def test_generated_module_matches_the_proto_source(tmp_path: Path) -> None:
    """A .proto edited without running scripts/gen-proto.sh is caught here."""
    out = tmp_path / "ca.pb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{SRC}",
            f"-I{_grpc_tools_include()}",
            f"--descriptor_set_out={out}",
            "zerotunnel/proto/ca.proto",
        ],
        check=True,
    )
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for message in compiled.message_type:
        for field in message.field:
            field.ClearField("json_name")  # protoc's Python generator drops it; a descriptor set keeps it
    assert compiled == descriptor_pb2.FileDescriptorProto.FromString(ca_pb2.DESCRIPTOR.serialized_pb)


def _grpc_tools_include() -> str:
    import grpc_tools  # type: ignore[import-untyped]

    return str(Path(grpc_tools.__file__).parent / "_proto")
