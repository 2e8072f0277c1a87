# mypy: ignore-errors
# ruff: noqa
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class EnrolRequest(_message.Message):
    __slots__ = ("token", "csr", "validity_duration")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    VALIDITY_DURATION_FIELD_NUMBER: _ClassVar[int]
    token: str
    csr: str
    validity_duration: int
    def __init__(self, token: _Optional[str] = ..., csr: _Optional[str] = ..., validity_duration: _Optional[int] = ...) -> None: ...

class EnrolResponse(_message.Message):
    __slots__ = ("cert_chain", "node_name", "spiffe_id")
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    cert_chain: _containers.RepeatedScalarFieldContainer[str]
    node_name: str
    spiffe_id: str
    def __init__(self, cert_chain: _Optional[_Iterable[str]] = ..., node_name: _Optional[str] = ..., spiffe_id: _Optional[str] = ...) -> None: ...
