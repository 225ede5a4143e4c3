from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATE_UNSPECIFIED: _ClassVar[State]
    STATE_IN_PROGRESS: _ClassVar[State]
    STATE_COMPLETED: _ClassVar[State]
    STATE_ABORTED: _ClassVar[State]

class AbortedBy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ABORTED_BY_UNSPECIFIED: _ClassVar[AbortedBy]
    ABORTED_BY_CALLER: _ClassVar[AbortedBy]
    ABORTED_BY_REAPER: _ClassVar[AbortedBy]
    ABORTED_BY_OPERATOR: _ClassVar[AbortedBy]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_ACQUIRED: _ClassVar[EventKind]
    EVENT_KIND_COMPLETED: _ClassVar[EventKind]
    EVENT_KIND_ABORTED: _ClassVar[EventKind]
    EVENT_KIND_REAPED: _ClassVar[EventKind]
    EVENT_KIND_RELEASED: _ClassVar[EventKind]
    EVENT_KIND_RESOLVED: _ClassVar[EventKind]
    EVENT_KIND_INVALIDATED: _ClassVar[EventKind]
STATE_UNSPECIFIED: State
STATE_IN_PROGRESS: State
STATE_COMPLETED: State
STATE_ABORTED: State
ABORTED_BY_UNSPECIFIED: AbortedBy
ABORTED_BY_CALLER: AbortedBy
ABORTED_BY_REAPER: AbortedBy
ABORTED_BY_OPERATOR: AbortedBy
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_ACQUIRED: EventKind
EVENT_KIND_COMPLETED: EventKind
EVENT_KIND_ABORTED: EventKind
EVENT_KIND_REAPED: EventKind
EVENT_KIND_RELEASED: EventKind
EVENT_KIND_RESOLVED: EventKind
EVENT_KIND_INVALIDATED: EventKind

class BeginRequest(_message.Message):
    __slots__ = ("namespace", "key", "fingerprint", "lease_ttl", "retention", "wait_timeout", "attempt_nonce")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FIELD_NUMBER: _ClassVar[int]
    WAIT_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_NONCE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: str
    fingerprint: bytes
    lease_ttl: _duration_pb2.Duration
    retention: _duration_pb2.Duration
    wait_timeout: _duration_pb2.Duration
    attempt_nonce: str
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[str] = ..., fingerprint: _Optional[bytes] = ..., lease_ttl: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., retention: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., wait_timeout: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., attempt_nonce: _Optional[str] = ...) -> None: ...

class BeginResponse(_message.Message):
    __slots__ = ("acquired", "completed", "in_progress")
    ACQUIRED_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    acquired: Acquired
    completed: Completed
    in_progress: InProgress
    def __init__(self, acquired: _Optional[_Union[Acquired, _Mapping]] = ..., completed: _Optional[_Union[Completed, _Mapping]] = ..., in_progress: _Optional[_Union[InProgress, _Mapping]] = ...) -> None: ...

class Acquired(_message.Message):
    __slots__ = ("lease_token", "attempt", "lease_expires_at", "downstream_key", "previous")
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_KEY_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    lease_token: str
    attempt: int
    lease_expires_at: _timestamp_pb2.Timestamp
    downstream_key: str
    previous: PreviousAttempt
    def __init__(self, lease_token: _Optional[str] = ..., attempt: _Optional[int] = ..., lease_expires_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., downstream_key: _Optional[str] = ..., previous: _Optional[_Union[PreviousAttempt, _Mapping]] = ...) -> None: ...

class PreviousAttempt(_message.Message):
    __slots__ = ("attempt", "aborted_by", "abort_reason", "outcome_unknown", "ended_at")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ABORTED_BY_FIELD_NUMBER: _ClassVar[int]
    ABORT_REASON_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    aborted_by: AbortedBy
    abort_reason: str
    outcome_unknown: bool
    ended_at: _timestamp_pb2.Timestamp
    def __init__(self, attempt: _Optional[int] = ..., aborted_by: _Optional[_Union[AbortedBy, str]] = ..., abort_reason: _Optional[str] = ..., outcome_unknown: bool = ..., ended_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Completed(_message.Message):
    __slots__ = ("response", "response_code", "content_type", "completed_at", "expires_at", "attempt")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_CODE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    response: bytes
    response_code: int
    content_type: str
    completed_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    attempt: int
    def __init__(self, response: _Optional[bytes] = ..., response_code: _Optional[int] = ..., content_type: _Optional[str] = ..., completed_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., attempt: _Optional[int] = ...) -> None: ...

class InProgress(_message.Message):
    __slots__ = ("attempt", "lease_expires_at", "retry_after")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    lease_expires_at: _timestamp_pb2.Timestamp
    retry_after: _duration_pb2.Duration
    def __init__(self, attempt: _Optional[int] = ..., lease_expires_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., retry_after: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CompleteRequest(_message.Message):
    __slots__ = ("namespace", "key", "lease_token", "response", "response_code", "content_type")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_CODE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: str
    lease_token: str
    response: bytes
    response_code: int
    content_type: str
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[str] = ..., lease_token: _Optional[str] = ..., response: _Optional[bytes] = ..., response_code: _Optional[int] = ..., content_type: _Optional[str] = ...) -> None: ...

class CompleteResponse(_message.Message):
    __slots__ = ("completed_at", "expires_at")
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    completed_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, completed_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("namespace", "key", "lease_token", "reason", "outcome_unknown")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: str
    lease_token: str
    reason: str
    outcome_unknown: bool
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[str] = ..., lease_token: _Optional[str] = ..., reason: _Optional[str] = ..., outcome_unknown: bool = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("namespace", "key", "lease_token", "lease_ttl")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: str
    lease_token: str
    lease_ttl: _duration_pb2.Duration
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[str] = ..., lease_token: _Optional[str] = ..., lease_ttl: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("lease_expires_at",)
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    lease_expires_at: _timestamp_pb2.Timestamp
    def __init__(self, lease_expires_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("namespace", "key")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: str
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: Record
    def __init__(self, record: _Optional[_Union[Record, _Mapping]] = ...) -> None: ...

class Record(_message.Message):
    __slots__ = ("namespace", "key", "state", "attempt", "fingerprint", "downstream_key", "created_at", "updated_at", "lease_expires_at", "completed_at", "expires_at", "response", "response_code", "content_type", "abort_reason", "aborted_by", "outcome_unknown")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_CODE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    ABORT_REASON_FIELD_NUMBER: _ClassVar[int]
    ABORTED_BY_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    key: str
    state: State
    attempt: int
    fingerprint: bytes
    downstream_key: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    lease_expires_at: _timestamp_pb2.Timestamp
    completed_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    response: bytes
    response_code: int
    content_type: str
    abort_reason: str
    aborted_by: AbortedBy
    outcome_unknown: bool
    def __init__(self, namespace: _Optional[str] = ..., key: _Optional[str] = ..., state: _Optional[_Union[State, str]] = ..., attempt: _Optional[int] = ..., fingerprint: _Optional[bytes] = ..., downstream_key: _Optional[str] = ..., created_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., lease_expires_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., completed_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., response: _Optional[bytes] = ..., response_code: _Optional[int] = ..., content_type: _Optional[str] = ..., abort_reason: _Optional[str] = ..., aborted_by: _Optional[_Union[AbortedBy, str]] = ..., outcome_unknown: bool = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("at", "kind", "attempt", "principal", "reason", "response_code", "outcome_unknown")
    AT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_CODE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    at: _timestamp_pb2.Timestamp
    kind: EventKind
    attempt: int
    principal: str
    reason: str
    response_code: int
    outcome_unknown: bool
    def __init__(self, at: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., kind: _Optional[_Union[EventKind, str]] = ..., attempt: _Optional[int] = ..., principal: _Optional[str] = ..., reason: _Optional[str] = ..., response_code: _Optional[int] = ..., outcome_unknown: bool = ...) -> None: ...
