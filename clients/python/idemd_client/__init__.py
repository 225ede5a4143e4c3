"""Python client for idemd.

``Client.run_once(key, fingerprint, operation)`` runs ``operation`` at most
once per key and returns its response, or the stored response of the attempt
that ran it:

- Begin → completed: the stored response is returned, nothing runs;
- acquired: ``operation(attempt)`` runs with ``attempt.downstream_key`` (pass it
  to the payment provider as its idempotency key) while a background thread
  heartbeats the lease; its ``Response`` (success) or a raised ``Final``
  (deterministic failure such as a declined card) is stored with Complete and
  replayed to every retry; a raised ``Retryable`` (nothing happened) aborts
  the lease, so the caller's retry runs the operation again; a raised
  ``OutcomeUnknown`` (a timeout after the request left: it may have happened)
  aborts it with ``outcome_unknown``, and the next attempt sees that in
  ``attempt.previous``;
- in_progress: Begin waits server-side, then retries with backoff and jitter
  until the budget runs out.

RPCs are retried only on UNAVAILABLE and DEADLINE_EXCEEDED, a bounded number
of times, with the same attempt nonce.

A provider that deduplicates on ``downstream_key`` makes a retry after an
unknown outcome safe by itself. For one that does not, pass
``run_once(..., reconcile=hook)``: the hook asks the provider what it holds for
the ``downstream_key`` before the operation runs again.
"""
from __future__ import annotations

import functools
import hashlib
import random
import secrets
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Mapping, Optional

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from idemd.v1 import idempotency_pb2 as pb
from idemd.v1 import idempotency_pb2_grpc as pb_grpc

__all__ = [
    "Attempt", "Client", "Done", "Final", "FingerprintMismatch", "InProgress", "LeaseLost", "OutcomeUnknown",
    "OutcomeUnknownFailure", "PreviousAttempt", "Response", "Retryable", "RetryableFailure", "entity_key",
    "fingerprint",
]

_KEY_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:idemd:key")


def entity_key(entity: str, operation: str) -> str:
    """A deterministic key for an operation on an entity (UUIDv5), the same in every client language."""
    return str(uuid.uuid5(_KEY_NAMESPACE, f"{operation}\n{entity}"))


def fingerprint(fields: Mapping[str, bytes]) -> bytes:
    """SHA-256 over the fields sorted by name, each name and value prefixed by its u32 big-endian length."""
    digest = hashlib.sha256()
    for name in sorted(fields):
        value = fields[name]
        encoded = name.encode()
        digest.update(struct.pack(">I", len(encoded)) + encoded)
        digest.update(struct.pack(">I", len(value)) + value)
    return digest.digest()


@dataclass(frozen=True)
class PreviousAttempt:
    """How the attempt before this one ended (idemd's ``Acquired.previous``)."""

    attempt: int
    #: "ABORTED_BY_CALLER", "ABORTED_BY_REAPER" (its lease expired) or "ABORTED_BY_OPERATOR".
    aborted_by: str
    #: "lease expired" for an expired lease, else the reason given.
    abort_reason: str
    #: The side effect may have happened: aborted as ``OutcomeUnknown``, released so, or its lease expired.
    outcome_unknown: bool
    #: When it ended (idemd's clock, UTC).
    ended_at: Optional[datetime]


@dataclass(frozen=True)
class Attempt:
    downstream_key: str
    attempt: int
    #: How attempt - 1 ended; None on attempt 1.
    previous: Optional[PreviousAttempt] = None


@dataclass(frozen=True)
class Response:
    body: bytes
    code: int = 200
    content_type: str = ""


@dataclass(frozen=True)
class Done:
    response: Response
    replayed: bool
    attempt: int
    #: True when the reconcile hook found an earlier attempt's result at the provider (now stored); nothing ran.
    reconciled: bool = False


class Final(Exception):
    """Raise from the operation for a deterministic failure: it is stored and replayed."""

    def __init__(self, response: Response):
        super().__init__(f"final failure {response.code}")
        self.response = response


class Retryable(Exception):
    """Raise from the operation when nothing happened (503, connection refused): the lease is aborted."""


class OutcomeUnknown(Exception):
    """Raise from the operation when it may or may not have happened (a timeout after the request left).

    The lease is aborted with ``outcome_unknown``, so the next attempt's ``previous`` says so and its
    reconcile hook runs first.
    """


class RetryableFailure(Exception):
    """The operation failed transiently and was aborted; retry later."""


class OutcomeUnknownFailure(Exception):
    """Aborted with its outcome unknown: the provider may have done it.

    Raised for ``OutcomeUnknown``, for a reconcile hook that failed, and for a ``Retryable`` that followed an
    outcome-unknown attempt nobody reconciled (the record keeps saying outcome-unknown; this error always says
    what the record says). Retrying is safe when the provider deduplicates on ``downstream_key`` or a reconcile
    hook looks it up first.
    """


class InProgress(Exception):
    """Another attempt still holds the key after the in-progress budget."""


class FingerprintMismatch(Exception):
    """The key was first used with a different request."""


class LeaseLost(Exception):
    """The operation ran but its lease was lost before Complete; retry (same downstream key)."""


def _reason(error: grpc.RpcError) -> Optional[str]:
    status = rpc_status.from_call(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return None


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int(round((seconds - whole) * 1e9)))


def _jitter(seconds: float) -> float:
    return seconds * random.uniform(0.5, 1.5)


class Client:
    def __init__(
        self,
        target: str,
        namespace: str,
        *,
        lease_ttl: float = 30.0,
        wait: float = 5.0,
        in_progress_budget: float = 60.0,
        rpc_retries: int = 5,
        rpc_timeout: float = 5.0,
        token: Optional[str] = None,
        channel: Optional[grpc.Channel] = None,
    ):
        self._channel = channel or grpc.insecure_channel(target)
        self._stub = pb_grpc.IdempotencyStub(self._channel)
        self.namespace = namespace
        self.lease_ttl, self.wait, self.in_progress_budget = lease_ttl, wait, in_progress_budget
        self.rpc_retries, self.rpc_timeout = rpc_retries, rpc_timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    @property
    def stub(self) -> pb_grpc.IdempotencyStub:
        """The generated stub, for calls run_once does not cover."""
        return self._stub

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request, timeout: float):
        backoff = 0.05
        for attempt in range(self.rpc_retries + 1):
            try:
                return method(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as error:
                retryable = error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                if not retryable or attempt == self.rpc_retries:
                    raise
                time.sleep(_jitter(backoff))
                backoff = min(backoff * 2, 2.0)

    def _begin(self, key: str, fp: bytes, nonce: str, wait: float):
        request = pb.BeginRequest(
            namespace=self.namespace, key=key, fingerprint=fp, lease_ttl=_duration(self.lease_ttl),
            wait_timeout=_duration(wait), attempt_nonce=nonce,
        )
        return self._call(self._stub.Begin, request, self.rpc_timeout + wait)

    def _heartbeat_until(self, stop: threading.Event, key: str, token: str) -> None:
        every = self.lease_ttl / 3
        while not stop.wait(every):
            request = pb.HeartbeatRequest(
                namespace=self.namespace, key=key, lease_token=token, lease_ttl=_duration(self.lease_ttl)
            )
            try:
                self._call(self._stub.Heartbeat, request, min(self.rpc_timeout, every))
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    return  # lost: Complete will say so

    def _abort(self, key: str, token: str, reason: str, outcome_unknown: bool) -> None:
        request = pb.AbortRequest(
            namespace=self.namespace, key=key, lease_token=token, reason=reason, outcome_unknown=outcome_unknown,
        )
        try:
            self._call(self._stub.Abort, request, self.rpc_timeout)
        except grpc.RpcError:
            pass  # LEASE_LOST or unreachable: the lease ends by itself, as outcome-unknown

    def run_once(
        self,
        key: str,
        fp: bytes,
        operation: Callable[[Attempt], Response],
        *,
        reconcile: Optional[Callable[[Attempt], Optional[Response]]] = None,
    ) -> Done:
        """Run ``operation`` at most once per key; see the module docstring.

        ``reconcile`` is for a provider that does not deduplicate on ``downstream_key``. When the attempt before
        this one ended with its outcome unknown (``attempt.previous.outcome_unknown``: aborted as
        ``OutcomeUnknown``, its lease expired, or an operator released it so), ``reconcile(attempt)`` runs first,
        under the lease, and asks the provider what it holds for ``attempt.downstream_key``:

        - it returns a ``Response`` (or raises ``Final``): the earlier attempt did it; the response is stored with
          Complete and returned with ``reconciled=True``; ``operation`` does not run;
        - it returns None: it did not; ``operation`` runs as usual;
        - it raises: the question stays open, so the attempt is aborted with ``outcome_unknown`` still set (the
          next attempt reconciles again) and ``OutcomeUnknownFailure`` is raised from the error.

        ``reconcile`` is not called on attempt 1 or after an attempt that ended with nothing done.
        """
        nonce = secrets.token_hex(16)
        give_up = time.monotonic() + self.in_progress_budget
        while True:
            try:
                outcome = self._begin(key, fp, nonce, max(0.0, min(self.wait, give_up - time.monotonic())))
            except grpc.RpcError as error:
                if _reason(error) == "FINGERPRINT_MISMATCH":
                    raise FingerprintMismatch(key) from error
                raise
            kind = outcome.WhichOneof("outcome")
            if kind == "completed":
                return _replay(outcome.completed)
            if kind == "acquired":
                lease = outcome.acquired
                break
            if time.monotonic() >= give_up:
                raise InProgress(key)
            hint = outcome.in_progress.retry_after
            time.sleep(_jitter(hint.seconds + hint.nanos / 1e9 or 0.2))

        previous = _previous(lease) if lease.HasField("previous") else None
        attempt = Attempt(lease.downstream_key, lease.attempt, previous)
        # Whether attempt - 1 may have done it and nobody has checked.
        unresolved = previous is not None and previous.outcome_unknown
        reconciled = False
        stop = threading.Event()
        heartbeats = threading.Thread(target=self._heartbeat_until, args=(stop, key, lease.lease_token), daemon=True)
        heartbeats.start()
        try:
            found = None
            if unresolved and reconcile is not None:
                try:
                    found = reconcile(attempt)
                except Final as final:
                    found = final.response
                except Exception as error:
                    self._abort(key, lease.lease_token, "reconcile failed", True)
                    raise OutcomeUnknownFailure(str(error)) from error
                unresolved = False
            if found is not None:
                response, reconciled = found, True
            else:
                try:
                    response = operation(attempt)
                except Final as final:
                    response = final.response
                except Retryable as error:
                    # Nothing happened here, but an unreconciled earlier attempt may still have: keep the record
                    # saying so, or the attempt after this one would skip its reconcile hook.
                    if unresolved:
                        self._abort(key, lease.lease_token, "retryable failure; the previous outcome is unknown", True)
                        raise OutcomeUnknownFailure(str(error)) from error
                    self._abort(key, lease.lease_token, "retryable failure", False)
                    raise RetryableFailure(str(error)) from error
                except OutcomeUnknown as error:
                    self._abort(key, lease.lease_token, "outcome unknown", True)
                    raise OutcomeUnknownFailure(str(error)) from error
        finally:
            stop.set()
        request = pb.CompleteRequest(
            namespace=self.namespace, key=key, lease_token=lease.lease_token, response=response.body,
            response_code=response.code, content_type=response.content_type,
        )
        try:
            self._call(self._stub.Complete, request, self.rpc_timeout)
        except grpc.RpcError as error:
            if _reason(error) != "LEASE_LOST":
                raise
            again = self._begin(key, fp, nonce, self.wait)
            if again.WhichOneof("outcome") == "completed":
                return _replay(again.completed)
            raise LeaseLost(key) from error
        return Done(response, replayed=False, attempt=lease.attempt, reconciled=reconciled)

    def once(
        self,
        key: Callable[..., str],
        fingerprint_of: Callable[..., bytes],
        reconcile: Optional[Callable[..., Optional[Response]]] = None,
    ):
        """Decorator: ``@client.once(key=lambda order: ..., fingerprint_of=lambda order: ...)``.

        The decorated function receives the ``Attempt`` as its first argument
        and returns a ``Response`` (or raises ``Final`` / ``Retryable`` /
        ``OutcomeUnknown``). ``reconcile``, if given, is called the same way
        (see ``run_once``).
        """

        def decorate(function):
            @functools.wraps(function)
            def wrapper(*args, **kwargs) -> Done:
                hook = None if reconcile is None else (lambda attempt: reconcile(attempt, *args, **kwargs))
                return self.run_once(
                    key(*args, **kwargs),
                    fingerprint_of(*args, **kwargs),
                    lambda attempt: function(attempt, *args, **kwargs),
                    reconcile=hook,
                )

            return wrapper

        return decorate


def _previous(lease) -> PreviousAttempt:
    previous = lease.previous
    ended_at = (
        previous.ended_at.ToDatetime(tzinfo=timezone.utc) if previous.HasField("ended_at") else None
    )
    return PreviousAttempt(
        attempt=previous.attempt,
        aborted_by=pb.AbortedBy.Name(previous.aborted_by),
        abort_reason=previous.abort_reason,
        outcome_unknown=previous.outcome_unknown,
        ended_at=ended_at,
    )


def _replay(completed) -> Done:
    return Done(
        Response(completed.response, completed.response_code, completed.content_type),
        replayed=True,
        attempt=completed.attempt,
    )
