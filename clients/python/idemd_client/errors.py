"""The exceptions ``run_once`` raises: one base class, ``IdemdError``, with a subclass per outcome, and
``reason()``, idemd's ``ErrorInfo`` reason of a gRPC error.

Each keeps its cause (``__cause__``: the operation's own error, the reconcile hook's, or idemd's
``grpc.RpcError``) and says which key and attempt it is about.
"""
from __future__ import annotations

from typing import Optional

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "FingerprintMismatch", "IdemdError", "InProgress", "InvalidArgument", "LeaseLost", "OutcomeUnknownFailure",
    "RetryableFailure", "Unavailable", "reason",
]

_STATUS_DETAILS = "grpc-status-details-bin"


def reason(error: BaseException) -> Optional[str]:
    """The ``google.rpc.ErrorInfo`` reason idemd attached to a gRPC error (``"FINGERPRINT_MISMATCH"``,
    ``"LEASE_LOST"``, ...), or None. Works on the threaded and the asyncio client's errors alike."""
    trailing = getattr(error, "trailing_metadata", None)
    if not callable(trailing):
        return None
    for key, value in trailing() or ():
        if key != _STATUS_DETAILS:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return info.reason
    return None


def code(error: BaseException) -> Optional[grpc.StatusCode]:
    """The gRPC status code of a gRPC error, or None for any other exception."""
    method = getattr(error, "code", None) if isinstance(error, grpc.RpcError) else None
    return method() if callable(method) else None


class IdemdError(Exception):
    """The base of everything ``run_once`` raises about idemd or the attempt (not the caller's own errors,
    which it re-raises as they are). Raised as itself for an error idemd answered that no subclass stands for
    (UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED)."""

    def __init__(
        self,
        message: str,
        *,
        key: Optional[str] = None,
        attempt: Optional[int] = None,
        code: Optional[grpc.StatusCode] = None,
        reason: Optional[str] = None,
    ):
        super().__init__(message)
        #: The idempotency key of the call, when there was one.
        self.key = key
        #: The attempt that ran, when one was acquired.
        self.attempt = attempt
        #: idemd's gRPC status code, when idemd answered the error.
        self.code = code
        #: idemd's ``ErrorInfo`` reason, e.g. "FINGERPRINT_MISMATCH" or "LEASE_LOST".
        self.reason = reason


class InvalidArgument(IdemdError, ValueError):
    """A namespace, key, fingerprint, setting or address idemd would refuse, found when the client is built or
    called (before any call), or INVALID_ARGUMENT from idemd. Nothing ran: fix the code."""


class FingerprintMismatch(IdemdError):
    """The key was first used with a different request (another fingerprint). Nothing ran; the record is
    unchanged: answer 422."""


class InProgress(IdemdError):
    """Another attempt still held the key when the in-progress budget ran out. Nothing ran here: retry later
    (503 with Retry-After)."""


class LeaseLost(IdemdError):
    """The operation ran, but its lease kept being taken over (or released by an operator) before its outcome
    was stored. Call again: it replays the winner's result or runs a new attempt with the same downstream key."""


class RetryableFailure(IdemdError):
    """The operation raised ``Retryable``: nothing happened and the attempt was aborted, so a retry runs it
    again."""


class OutcomeUnknownFailure(IdemdError):
    """Aborted with its outcome unknown: the provider may have done it.

    Raised for ``OutcomeUnknown``, for a reconcile hook that failed, for an outcome idemd could not store, and
    for a ``Retryable`` that followed an outcome-unknown attempt nobody reconciled (the record keeps saying
    outcome-unknown; this error always says what the record says). Retrying is safe when the provider
    deduplicates on ``downstream_key`` or a reconcile hook looks it up first.
    """


class Unavailable(IdemdError):
    """idemd stayed unreachable or too slow (UNAVAILABLE or DEADLINE_EXCEEDED) through the retries. Nothing
    ran when it happened at Begin: retry later."""
