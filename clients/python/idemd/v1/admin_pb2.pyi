from google.protobuf import timestamp_pb2 as _timestamp_pb2
from idemd.v1 import idempotency_pb2 as _idempotency_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListRecordsRequest(_message.Message):
    __slots__ = ("namespace", "state", "outcome_unknown_only", "updated_before", "updated_after", "key_prefix", "page_size", "page_token")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_UNKNOWN_ONLY_FIELD_NUMBER: _ClassVar[int]
    UPDATED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AFTER_FIELD_NUMBER: _ClassVar[int]
    KEY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    state: _idempotency_pb2.State
    outcome_unknown_only: bool
    updated_before: _timestamp_pb2.Timestamp
    updated_after: _timestamp_pb2.Timestamp
    key_prefix: str
    page_size: int
    page_token: str
    def __init__(self, namespace: _Optional[str] = ..., state: _Optional[_Union[_idempotency_pb2.State, str]] = ..., outcome_unknown_only: bool = ..., updated_before: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., updated_after: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., key_prefix: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRecordsResponse(_message.Message):
    __slots__ = ("records", "next_page_token")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[_idempotency_pb2.Record]
    next_page_token: str
    def __init__(self, records: _Optional[_Iterable[_Union[_idempotency_pb2.Record, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetHistoryRequest(_message.Message):
    __slots__ = ("namespace", "key")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: str
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class GetHistoryResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_idempotency_pb2.Event]
    def __init__(self, events: _Optional[_Iterable[_Union[_idempotency_pb2.Event, _Mapping]]] = ...) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("namespace", "key", "attempt", "response", "response_code", "content_type", "reason")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_CODE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: str
    attempt: int
    response: bytes
    response_code: int
    content_type: str
    reason: str
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[str] = ..., attempt: _Optional[int] = ..., response: _Optional[bytes] = ..., response_code: _Optional[int] = ..., content_type: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ResolveResponse(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: _idempotency_pb2.Record
    def __init__(self, record: _Optional[_Union[_idempotency_pb2.Record, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("namespace", "key", "attempt", "reason", "outcome_unknown")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: str
    attempt: int
    reason: str
    outcome_unknown: bool
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[str] = ..., attempt: _Optional[int] = ..., reason: _Optional[str] = ..., outcome_unknown: bool = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: _idempotency_pb2.Record
    def __init__(self, record: _Optional[_Union[_idempotency_pb2.Record, _Mapping]] = ...) -> None: ...

class InvalidateRequest(_message.Message):
    __slots__ = ("namespace", "key", "reason")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: str
    reason: str
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class InvalidateResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
