"""The ``run_once`` protocol, written once for the threaded and the asyncio client.

``Protocol.steps`` is a generator that decides everything (which RPC, what to retry, how long to wait, how an
attempt ends, which error to raise) and does no I/O: it yields effects (``Rpc``, ``Sleep``, ``Run``) and is
sent their results, or thrown their exceptions, by a driver: ``Client._drive`` in ``_sync`` (blocking calls,
a heartbeat thread) and in ``aio`` (awaits, a heartbeat task). So both clients behave the same by
construction, and the tests of either prove the logic of both.
"""
from __future__ import annotations

import inspect
import itertools
import math
import random
import secrets
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta, timezone
from typing import Any, Callable, Generator, Optional, Tuple, Union

import grpc
from google.protobuf import duration_pb2

from idemd.v1 import idempotency_pb2 as pb

from ._types import Attempt, Done, Final, OutcomeUnknown, PreviousAttempt, Response, Retryable, cause_of
from .errors import (
    FingerprintMismatch, IdemdError, InProgress, InvalidArgument, LeaseLost, OutcomeUnknownFailure,
    RetryableFailure, Unavailable, code, reason,
)

#: Seconds, as a number or a ``timedelta``.
Seconds = Union[float, int, timedelta]
FinalError = Callable[[Response], Optional[BaseException]]

# How many times one run_once begins again after Complete answered LEASE_LOST before it raises LeaseLost:
# each loss means another attempt owns the key, and chasing it forever would never return.
LEASE_LOSSES = 2
_RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_NAMESPACE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")


# Effects the generator yields; a driver carries them out.


@dataclass(frozen=True)
class Rpc:
    """Call ``method`` of the Idempotency stub; its response is sent back, its ``grpc.RpcError`` thrown in."""

    method: str
    request: Any
    timeout: float
    #: Complete and Abort: the lease must end, so a cancelled caller does not interrupt them.
    finish: bool = False


@dataclass(frozen=True)
class Sleep:
    seconds: float
    finish: bool = False


@dataclass(frozen=True)
class Run:
    """Call ``function(attempt)`` (the operation or the reconcile hook) while the lease is heartbeated."""

    function: Callable[[Attempt], Any]
    attempt: Attempt
    heartbeat: pb.HeartbeatRequest
    #: Seconds between heartbeats: a third of the lease.
    every: float


Effect = Union[Rpc, Sleep, Run]
Steps = Generator[Effect, Any, Done]


def bearer(token: Optional[str]) -> Tuple[Tuple[str, str], ...]:
    """The call metadata for an idemd running with a tokens file."""
    if token is None:
        return ()
    if not isinstance(token, str) or not token or not all("!" <= c <= "~" for c in token):
        raise InvalidArgument("token must be a non-empty string of printable ASCII")
    return (("authorization", f"Bearer {token}"),)


def heartbeat_over(error: BaseException) -> bool:
    """A heartbeat answered this way will never succeed again (the lease is lost; Complete will say so)."""
    return code(error) in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)


# Validation: the field rules of idemd's API, checked before any call so that a bad value fails where it is
# written, as InvalidArgument.


def _seconds(name: str, value: Seconds) -> float:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidArgument(f"{name} must be seconds (a number or a timedelta), got {value!r}")
    return float(value)


def check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not 1 <= len(namespace) <= 64 or not set(namespace) <= _NAMESPACE_CHARS:
        raise InvalidArgument(f"namespace {namespace!r}: must be 1-64 characters of [a-z0-9._-]")
    return namespace


def check_key(key: str) -> str:
    if not isinstance(key, str):
        raise InvalidArgument(f"key must be a str, not {type(key).__name__}")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError as error:
        raise InvalidArgument(f"key {key!r}: not valid UTF-8") from error
    if not 1 <= size <= 255:
        raise InvalidArgument(f"key {key!r}: {size} bytes, must be 1-255 bytes of UTF-8")
    if any(c <= "\x1f" or "\x7f" <= c <= "\x9f" for c in key):
        raise InvalidArgument(f"key {key!r}: contains a control character")
    return key


def check_fingerprint(value: bytes) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"fingerprint must be bytes (see fingerprint(...)), not {type(value).__name__}")
    value = bytes(value)
    if len(value) > 64:
        raise InvalidArgument(f"fingerprint: {len(value)} bytes, at most 64 (use fingerprint(...), a SHA-256)")
    return value


def parse_address(address: Optional[str]) -> Tuple[str, bool]:
    """``host:port``, ``http://host:port`` (plain text) or ``https://host:port`` (TLS) → (target, tls)."""
    if not isinstance(address, str):
        raise InvalidArgument(f"address must be a str such as 'idemd:50051', not {type(address).__name__}")
    text, tls = address.strip(), False
    if text.startswith("http://"):
        text = text[len("http://"):]
    elif text.startswith("https://"):
        text, tls = text[len("https://"):], True
    if text.endswith("/"):
        text = text[:-1]
    host, colon, port = text.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if (
        not colon or not bare or not port.isdigit() or not 1 <= int(port) <= 65535
        or any(c in bare for c in "/@[] \t") or (":" in bare and bare == host)
    ):
        raise InvalidArgument(f"address {address!r}: want host:port, http://host:port or https://host:port")
    return f"{host}:{port}", tls


@dataclass(frozen=True)
class Settings:
    """The knobs of one run_once: the client's, with the call's own on top."""

    lease_ttl: float = 30.0
    wait: float = 5.0
    in_progress_budget: float = 60.0
    #: None: the server's default.
    retention: Optional[float] = None
    rpc_retries: int = 5
    rpc_timeout: float = 5.0
    final_error: Optional[FinalError] = field(default=None, compare=False)

    @classmethod
    def of(cls, base: Optional["Settings"] = None, **given: Any) -> "Settings":
        """``base`` (or the defaults) with every knob in ``given`` that is not None, validated."""
        values = {}
        for name, value in given.items():
            if value is None:
                continue
            if name in ("lease_ttl", "wait", "in_progress_budget", "retention", "rpc_timeout"):
                value = _seconds(name, value)
            values[name] = value
        s = replace(base or cls(), **values)
        problems = [
            (not 1 <= s.lease_ttl <= 3600, f"lease_ttl {s.lease_ttl}: must be 1 s to 1 h"),
            (not 0 <= s.wait <= 60, f"wait {s.wait}: must be 0 to 60 s"),
            (s.in_progress_budget < 0, f"in_progress_budget {s.in_progress_budget}: must not be negative"),
            (s.retention is not None and s.retention <= 0, f"retention {s.retention}: must be positive"),
            (isinstance(s.rpc_retries, bool) or not isinstance(s.rpc_retries, int) or s.rpc_retries < 0,
             f"rpc_retries {s.rpc_retries!r}: must be an int, not negative"),
            (s.rpc_timeout <= 0, f"rpc_timeout {s.rpc_timeout}: must be positive"),
            (s.final_error is not None and not callable(s.final_error), "final_error must be callable"),
        ]
        for wrong, message in problems:
            if wrong:
                raise InvalidArgument(message)
        return s


RUN_OPTIONS = ("final_error", "lease_ttl", "retention", "wait", "in_progress_budget")


def check_run_options(base: Settings, options: dict) -> None:
    """Fails at once (at decoration time) on what run_once would refuse at every call."""
    unknown = sorted(set(options) - set(RUN_OPTIONS))
    if unknown:
        raise TypeError(f"unknown run_once options {unknown}; known: {list(RUN_OPTIONS)}")
    Settings.of(base, **options)


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int(round((seconds - whole) * 1e9)))


def _jitter(seconds: float) -> float:
    """±50 %, so that callers retrying together do not move in lockstep."""
    return seconds * random.uniform(0.5, 1.5)


def _note(error: BaseException, text: str) -> None:
    # PEP 678 notes (Python 3.11+) show in the traceback without changing the exception.
    if hasattr(error, "add_note"):
        error.add_note(text)


class Protocol:
    """What both clients share: the namespace, the default settings, and the steps of run_once."""

    def __init__(self, namespace: str, settings: Settings):
        self.namespace = check_namespace(namespace)
        self.settings = settings

    def steps(
        self,
        key: str,
        fp: bytes,
        operation: Callable[[Attempt], Any],
        reconcile: Optional[Callable[[Attempt], Any]],
        options: dict,
    ) -> Steps:
        s = Settings.of(self.settings, **options)
        key, fp = check_key(key), check_fingerprint(fp)
        if not callable(operation):
            raise TypeError(f"operation must be callable, got {operation!r}")
        if reconcile is not None and not callable(reconcile):
            raise TypeError(f"reconcile must be callable or None, got {reconcile!r}")
        # What this call's operation (or hook) produced once it has run, and under which downstream key: kept
        # across a lost lease, so that the operation never runs twice in one call.
        known: Optional[tuple] = None
        losses = -1
        while True:
            losses += 1
            lease, done = yield from self._acquire(s, key, fp)
            if lease is not None:
                if known is None:
                    response, reconciled = yield from self._attempt(s, key, lease, operation, reconcile)
                elif lease.downstream_key == known[2]:
                    # The same record again after LEASE_LOST: this call already knows what happened under this
                    # downstream key.
                    response, reconciled, _ = known
                else:
                    # The record was invalidated (or expired) and replaced meanwhile: this call's operation did
                    # not run for it.
                    yield from self._abort(s, key, lease, "the record was replaced after this call lost its lease",
                                           False)
                    raise LeaseLost(
                        f"the lease on key {key!r} in namespace {self.namespace!r} was lost after the operation "
                        f"ran, and the key now names a new record; its result was not stored",
                        key=key, attempt=lease.attempt,
                    )
                done, lost = yield from self._store(s, key, lease, response, reconciled)
                if lost is not None:
                    if losses < LEASE_LOSSES:
                        known = (response, reconciled, lease.downstream_key)
                        continue
                    raise LeaseLost(
                        f"the lease on key {key!r} in namespace {self.namespace!r} was lost {losses + 1} times "
                        f"before the operation's outcome was stored",
                        key=key, attempt=lease.attempt, code=code(lost), reason=reason(lost),
                    ) from lost
            if s.final_error is not None:
                error = s.final_error(done.response)
                if error is not None:
                    if not isinstance(error, BaseException):
                        raise TypeError(f"final_error returned {type(error).__name__}, not an exception or None")
                    raise error
            return done

    def _call(self, s: Settings, method: str, request: Any, timeout: float, finish: bool = False):
        """One RPC, retried on UNAVAILABLE and DEADLINE_EXCEEDED with jittered backoff. Requests are retried as
        they are: Begin with the same attempt nonce gets the same lease back, and Complete, Abort and Heartbeat
        are idempotent for one lease token."""
        backoff = 0.05
        for tries in itertools.count():
            try:
                return (yield Rpc(method, request, timeout, finish))
            except grpc.RpcError as error:
                if code(error) not in _RETRIED or tries >= s.rpc_retries:
                    raise
            yield Sleep(_jitter(backoff), finish)
            backoff = min(backoff * 2, 2.0)

    def _failure(self, s: Settings, error: grpc.RpcError, key: str, rpc: str) -> IdemdError:
        """The IdemdError for an error idemd answered to ``rpc``."""
        status, why = code(error), reason(error)
        details = error.details() if callable(getattr(error, "details", None)) else None
        text = f"{rpc} of key {key!r} in namespace {self.namespace!r} failed: {status.name if status else '?'}"
        text += f" {details}" if details else ""
        kind = IdemdError
        if why == "FINGERPRINT_MISMATCH":
            kind = FingerprintMismatch
            text = (f"key {key!r} in namespace {self.namespace!r} was first used with a different request "
                    f"(fingerprint mismatch); nothing ran")
        elif why == "LEASE_LOST":
            kind = LeaseLost
        elif status == grpc.StatusCode.INVALID_ARGUMENT:
            kind = InvalidArgument
        elif status in _RETRIED:
            kind, text = Unavailable, f"{text} (after {s.rpc_retries} retries)"
        return kind(text, key=key, code=status, reason=why)

    def _acquire(self, s: Settings, key: str, fp: bytes):
        """Begin until the key is acquired (a lease) or found completed (a replay), waiting on another attempt
        up to the in-progress budget. One nonce serves every Begin of the round, so a Begin whose reply was lost
        and is sent again gets the same lease back."""
        nonce = secrets.token_hex(16)
        give_up = time.monotonic() + s.in_progress_budget
        while True:
            wait = max(0.0, min(s.wait, give_up - time.monotonic()))
            request = pb.BeginRequest(
                namespace=self.namespace, key=key, fingerprint=fp, lease_ttl=_duration(s.lease_ttl),
                wait_timeout=_duration(wait), attempt_nonce=nonce,
            )
            if s.retention is not None:
                request.retention.CopyFrom(_duration(s.retention))
            try:
                response = yield from self._call(s, "Begin", request, s.rpc_timeout + wait)
            except grpc.RpcError as error:
                raise self._failure(s, error, key, "Begin") from error
            outcome = response.WhichOneof("outcome")
            if outcome == "acquired":
                return response.acquired, None
            if outcome == "completed":
                completed = response.completed
                stored = Response(completed.response, completed.response_code, completed.content_type)
                return None, Done(stored, replayed=True, attempt=completed.attempt)
            if outcome != "in_progress":
                raise IdemdError(f"Begin of key {key!r} answered without an outcome", key=key)
            left = give_up - time.monotonic()
            if left <= 0:
                raise InProgress(
                    f"another attempt ({response.in_progress.attempt}) still holds key {key!r} in namespace "
                    f"{self.namespace!r} after waiting {s.in_progress_budget:g} s; nothing ran here",
                    key=key,
                )
            hint = response.in_progress.retry_after
            yield Sleep(min(_jitter(hint.seconds + hint.nanos / 1e9 or 0.2), left))

    def _abort(self, s: Settings, key: str, lease: pb.Acquired, why: str, unknown: bool):
        request = pb.AbortRequest(
            namespace=self.namespace, key=key, lease_token=lease.lease_token, reason=why, outcome_unknown=unknown,
        )
        try:
            yield from self._call(s, "Abort", request, s.rpc_timeout, finish=True)
        except grpc.RpcError:
            pass  # LEASE_LOST or unreachable: the lease ends by itself, and an expired lease is outcome-unknown

    def _attempt(self, s: Settings, key: str, lease: pb.Acquired, operation, reconcile):
        """Runs the reconcile hook (when due) and the operation in one acquired attempt, under heartbeats. Returns
        (response, reconciled) to store, the lease still held; any other ending aborts the lease and raises."""
        previous = _previous(lease) if lease.HasField("previous") else None
        attempt = Attempt(lease.downstream_key, lease.attempt, previous)
        where = f"key {key!r} in namespace {self.namespace!r} (attempt {lease.attempt})"
        heartbeat = pb.HeartbeatRequest(
            namespace=self.namespace, key=key, lease_token=lease.lease_token, lease_ttl=_duration(s.lease_ttl),
        )
        every = s.lease_ttl / 3
        # Whether attempt - 1 may have done it and nobody has checked.
        unresolved = previous is not None and previous.outcome_unknown
        response, reconciled = None, False
        if unresolved and reconcile is not None:
            try:
                found = yield Run(reconcile, attempt, heartbeat, every)
            except Final as final:
                found = final.response
            except GeneratorExit:
                raise
            except Exception as error:
                # The question stays open: the next attempt asks again.
                yield from self._abort(s, key, lease, "reconcile failed", True)
                raise OutcomeUnknownFailure(
                    f"the reconcile hook for {where} failed; aborted, still outcome-unknown: {error!r}",
                    key=key, attempt=lease.attempt,
                ) from error
            except BaseException:
                yield from self._abort(s, key, lease, "the reconcile hook was interrupted", True)
                raise
            if found is not None and not isinstance(found, Response):
                yield from self._abort(s, key, lease, "the reconcile hook returned no Response", True)
                raise TypeError(f"the reconcile hook for {where} returned {type(found).__name__}, not a Response "
                                f"or None{_async_hint(found)}; aborted, still outcome-unknown")
            if found is not None:
                response, reconciled = found, True
            else:
                unresolved = False
        if response is None:
            try:
                result = yield Run(operation, attempt, heartbeat, every)
            except Final as final:
                result = final.response
            except Retryable as error:
                if unresolved:
                    # Nothing happened here, but an unreconciled earlier attempt may still have: keep the record
                    # saying so, or the attempt after this one would skip its reconcile hook.
                    yield from self._abort(s, key, lease, "retryable failure; the previous outcome is unknown", True)
                    raise OutcomeUnknownFailure(
                        f"the operation for {where} raised Retryable after an attempt whose outcome is unknown and "
                        f"was not reconciled; aborted as outcome-unknown: {error}", key=key, attempt=lease.attempt
                    ) from cause_of(error)
                yield from self._abort(s, key, lease, "retryable failure", False)
                raise RetryableFailure(
                    f"the operation for {where} failed and was aborted; a retry runs it again: {error}",
                    key=key, attempt=lease.attempt,
                ) from cause_of(error)
            except OutcomeUnknown as error:
                yield from self._abort(s, key, lease, "outcome unknown", True)
                raise OutcomeUnknownFailure(
                    f"the operation for {where} may or may not have taken effect; aborted as outcome-unknown: "
                    f"{error}", key=key, attempt=lease.attempt
                ) from cause_of(error)
            except GeneratorExit:
                raise
            except BaseException as error:
                # The helper cannot tell whether an unexpected exception (a bug, a cancellation) came before or
                # after the provider was called, and for a payment "it may have charged" is the safe answer: the
                # next attempt reconciles, or the provider deduplicates on the downstream key. The reason names
                # the class only: an exception's text may carry payment details.
                yield from self._abort(s, key, lease, f"the operation raised {type(error).__name__}", True)
                _note(error, f"idemd: {where} was aborted as outcome-unknown")
                raise
            if not isinstance(result, Response):
                yield from self._abort(s, key, lease, "the operation returned no Response", True)
                raise TypeError(
                    f"the operation for {where} returned {type(result).__name__}, not an idemd_client.Response"
                    f"{_async_hint(result)}: its outcome was not stored (aborted as outcome-unknown, so the next "
                    "attempt reconciles)"
                )
            response = result
        return response, reconciled

    def _store(self, s: Settings, key: str, lease: pb.Acquired, response: Response, reconciled: bool):
        """Completes the lease with the response. Returns (Done, None), or (None, the LEASE_LOST error) when the
        lease expired or was released; any other failure aborts the lease as outcome-unknown and raises."""
        where = f"key {key!r} in namespace {self.namespace!r} (attempt {lease.attempt})"
        request = pb.CompleteRequest(
            namespace=self.namespace, key=key, lease_token=lease.lease_token, response=response.body,
            response_code=response.code, content_type=response.content_type,
        )
        try:
            yield from self._call(s, "Complete", request, s.rpc_timeout, finish=True)
        except grpc.RpcError as error:
            if reason(error) == "LEASE_LOST":
                return None, error
            # It happened (or the provider holds it) but is not stored: the next attempt must reconcile.
            yield from self._abort(s, key, lease, "the outcome could not be stored", True)
            failure = self._failure(s, error, key, "Complete")
            raise OutcomeUnknownFailure(
                f"the operation for {where} ran but its outcome was not stored; aborted as outcome-unknown: "
                f"{failure}", code=failure.code, reason=failure.reason, key=key, attempt=lease.attempt
            ) from error
        return Done(response, replayed=False, attempt=lease.attempt, reconciled=reconciled), None


def _async_hint(result: Any) -> str:
    """For a coroutine handed to the threaded client: closed (it will never run) and explained."""
    if not inspect.iscoroutine(result):
        return ""
    result.close()
    return " (async def operations and hooks need idemd_client.aio.Client)"


def _previous(lease: pb.Acquired) -> PreviousAttempt:
    previous = lease.previous
    ended_at = previous.ended_at.ToDatetime(tzinfo=timezone.utc) if previous.HasField("ended_at") else None
    return PreviousAttempt(
        attempt=previous.attempt,
        aborted_by=pb.AbortedBy.Name(previous.aborted_by),
        abort_reason=previous.abort_reason,
        outcome_unknown=previous.outcome_unknown,
        ended_at=ended_at,
    )
