from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    ERROR_CODE_INVALID_ARGUMENT: _ClassVar[ErrorCode]
    ERROR_CODE_RESOURCE_EXHAUSTED: _ClassVar[ErrorCode]
    ERROR_CODE_FAILED_PRECONDITION: _ClassVar[ErrorCode]
    ERROR_CODE_INTERNAL: _ClassVar[ErrorCode]
    ERROR_CODE_UNAVAILABLE: _ClassVar[ErrorCode]
    ERROR_CODE_UNAUTHENTICATED: _ClassVar[ErrorCode]
ERROR_CODE_UNSPECIFIED: ErrorCode
ERROR_CODE_INVALID_ARGUMENT: ErrorCode
ERROR_CODE_RESOURCE_EXHAUSTED: ErrorCode
ERROR_CODE_FAILED_PRECONDITION: ErrorCode
ERROR_CODE_INTERNAL: ErrorCode
ERROR_CODE_UNAVAILABLE: ErrorCode
ERROR_CODE_UNAUTHENTICATED: ErrorCode

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeReply(_message.Message):
    __slots__ = ("format_version", "knowledge_schema_json", "input_schema_json", "teacher_id", "accepts_index", "max_request_samples", "max_message_bytes", "dataset_fingerprint_json", "model_identity_json")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    KNOWLEDGE_SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    TEACHER_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_INDEX_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATASET_FINGERPRINT_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_IDENTITY_JSON_FIELD_NUMBER: _ClassVar[int]
    format_version: str
    knowledge_schema_json: str
    input_schema_json: str
    teacher_id: str
    accepts_index: bool
    max_request_samples: int
    max_message_bytes: int
    dataset_fingerprint_json: str
    model_identity_json: str
    def __init__(self, format_version: _Optional[str] = ..., knowledge_schema_json: _Optional[str] = ..., input_schema_json: _Optional[str] = ..., teacher_id: _Optional[str] = ..., accepts_index: _Optional[bool] = ..., max_request_samples: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., dataset_fingerprint_json: _Optional[str] = ..., model_identity_json: _Optional[str] = ...) -> None: ...

class SampleIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DistillRequest(_message.Message):
    __slots__ = ("request_id", "inputs", "ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    inputs: bytes
    ids: SampleIds
    def __init__(self, request_id: _Optional[int] = ..., inputs: _Optional[bytes] = ..., ids: _Optional[_Union[SampleIds, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ...) -> None: ...

class DistillReply(_message.Message):
    __slots__ = ("request_id", "knowledge", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    KNOWLEDGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    knowledge: bytes
    error: Error
    def __init__(self, request_id: _Optional[int] = ..., knowledge: _Optional[bytes] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...
