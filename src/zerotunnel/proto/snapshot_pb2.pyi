# mypy: ignore-errors
# ruff: noqa
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConfigDocument(_message.Message):
    __slots__ = ("name", "json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    json: str
    def __init__(self, name: _Optional[str] = ..., json: _Optional[str] = ...) -> None: ...

class NodeSnapshot(_message.Message):
    __slots__ = ("node", "documents", "trust_domain", "roots_pem", "config_version")
    NODE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    ROOTS_PEM_FIELD_NUMBER: _ClassVar[int]
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    node: str
    documents: _containers.RepeatedCompositeFieldContainer[ConfigDocument]
    trust_domain: str
    roots_pem: str
    config_version: int
    def __init__(self, node: _Optional[str] = ..., documents: _Optional[_Iterable[_Union[ConfigDocument, _Mapping]]] = ..., trust_domain: _Optional[str] = ..., roots_pem: _Optional[str] = ..., config_version: _Optional[int] = ...) -> None: ...
