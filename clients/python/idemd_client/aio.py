"""The asyncio client: ``idemd_client.aio.Client`` on ``grpc.aio``, for FastAPI-style services.

The same helper as the threaded ``idemd_client.Client`` (the same protocol code drives both), with ``async def``
operations and reconcile hooks, heartbeats as a task, and cancellation respected: a cancelled ``run_once``
raises ``CancelledError`` after ending its lease (an operation cancelled while it ran is aborted as
outcome-unknown; a Complete or Abort under way is finished first, so the lease never waits for the reaper).
Every other name of ``idemd_client`` is importable from here too.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
from typing import Any, Awaitable, Callable, Optional, Sequence, TypeVar, Union

import grpc
import grpc.aio

from idemd.v1 import idempotency_pb2_grpc as pb_grpc

from ._protocol import (
    FinalError, Protocol, Rpc, Run, Seconds, Settings, Sleep, Steps, bearer, check_run_options, heartbeat_over,
    parse_address,
)
from ._types import Attempt, Done, Final, OutcomeUnknown, PreviousAttempt, Response, Retryable
from .errors import (
    FingerprintMismatch, IdemdError, InProgress, InvalidArgument, LeaseLost, OutcomeUnknownFailure,
    RetryableFailure, Unavailable, reason,
)
from .keys import entity_key, fingerprint

__all__ = [
    "Attempt", "Client", "Done", "Final", "FingerprintMismatch", "IdemdError", "InProgress", "InvalidArgument",
    "LeaseLost", "OutcomeUnknown", "OutcomeUnknownFailure", "PreviousAttempt", "Response", "Retryable",
    "RetryableFailure", "Unavailable", "entity_key", "fingerprint", "reason",
]

T = TypeVar("T")
Operation = Callable[[Attempt], Union[Awaitable[Response], Response]]
Reconcile = Callable[[Attempt], Union[Awaitable[Optional[Response]], Optional[Response]]]


class _Cancel:
    """Whether the caller's task was cancelled while a step that must finish (Complete, Abort) ran."""

    requested = False


async def _to_the_end(awaitable: Awaitable[T], cancel: _Cancel) -> T:
    """Awaits ``awaitable`` to its end even if the caller's task is cancelled meanwhile; the cancellation is
    remembered in ``cancel`` and raised once run_once is done with the lease."""
    task = asyncio.ensure_future(awaitable)
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():  # the step itself was cancelled (the loop is closing), not just the caller
                raise
            cancel.requested = True


class Client(Protocol):
    """A connection to idemd for one namespace, for asyncio code.

    Takes what the threaded ``idemd_client.Client`` takes (``address`` as ``host:port``,
    ``http://host:port`` or ``https://host:port``; the namespace, address and settings are checked here and
    raise ``InvalidArgument``; ``interceptors`` are ``grpc.aio`` client interceptors for the channel it opens), or
    a ``grpc.aio.Channel`` you keep owning. The channel is opened at the first
    call, on the event loop that makes it, so a client may be built at import time; use it from that loop only.
    ``async with Client(...) as client`` (or ``await client.close()``) closes it.
    """

    def __init__(
        self,
        address: Optional[str],
        namespace: str,
        *,
        lease_ttl: Seconds = 30.0,
        wait: Seconds = 5.0,
        in_progress_budget: Seconds = 60.0,
        retention: Optional[Seconds] = None,
        rpc_retries: int = 5,
        rpc_timeout: Seconds = 5.0,
        final_error: Optional[FinalError] = None,
        token: Optional[str] = None,
        credentials: Optional[grpc.ChannelCredentials] = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        channel: Optional[grpc.aio.Channel] = None,
    ):
        super().__init__(namespace, Settings.of(
            lease_ttl=lease_ttl, wait=wait, in_progress_budget=in_progress_budget, retention=retention,
            rpc_retries=rpc_retries, rpc_timeout=rpc_timeout, final_error=final_error,
        ))
        self._metadata = bearer(token)
        self._interceptors = list(interceptors)
        if self._interceptors and channel is not None:
            raise InvalidArgument("interceptors are for the channel the client opens; add them to your own channel")
        self._target, self._credentials, self._owned = None, credentials, channel is None
        if channel is None:
            self._target, tls = parse_address(address)
            if tls and credentials is None:
                self._credentials = grpc.ssl_channel_credentials()
        self._channel: Optional[grpc.aio.Channel] = channel
        self._stub: Optional[pb_grpc.IdempotencyStub] = None

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel (opened now if it is not yet), e.g. for ``idemd.v1.admin_pb2_grpc.AdminStub``."""
        if self._channel is None:
            target = str(self._target)
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(target, self._credentials, interceptors=self._interceptors)
            else:
                self._channel = grpc.aio.insecure_channel(target, interceptors=self._interceptors)
        return self._channel

    @property
    def stub(self) -> pb_grpc.IdempotencyStub:
        """The generated stub, for calls run_once does not cover (``await client.stub.Lookup(...)``)."""
        if self._stub is None:
            self._stub = pb_grpc.IdempotencyStub(self.channel)
        return self._stub

    async def close(self) -> None:
        """Closes the channel this client opened (not one given to it)."""
        if self._owned and self._channel is not None:
            await self._channel.close(None)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def run_once(
        self,
        key: str,
        fp: bytes,
        operation: Operation,
        *,
        reconcile: Optional[Reconcile] = None,
        final_error: Optional[FinalError] = None,
        lease_ttl: Optional[Seconds] = None,
        retention: Optional[Seconds] = None,
        wait: Optional[Seconds] = None,
        in_progress_budget: Optional[Seconds] = None,
    ) -> Done:
        """``idemd_client.Client.run_once`` for asyncio: ``operation`` and ``reconcile`` are ``async def``
        (a plain function works too, but blocks the loop while it runs). Everything else is the same, plus
        cancellation: see the module docstring."""
        options = dict(final_error=final_error, lease_ttl=lease_ttl, retention=retention, wait=wait,
                       in_progress_budget=in_progress_budget)
        return await self._drive(self.steps(key, fp, operation, reconcile, options))

    def once(
        self,
        key: Callable[..., str],
        fingerprint_of: Callable[..., bytes],
        reconcile: Optional[Callable[..., Any]] = None,
        **options: Any,
    ) -> Callable[[Callable[..., Awaitable[Response]]], Callable[..., Awaitable[Done]]]:
        """Decorator for an ``async def`` operation; see ``idemd_client.Client.once``. The decorated function is
        a coroutine function returning the ``Done``."""
        check_run_options(self.settings, options)

        def decorate(function: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Done]]:
            @functools.wraps(function)
            async def wrapper(*args: Any, **kwargs: Any) -> Done:
                hook = None if reconcile is None else (lambda attempt: reconcile(attempt, *args, **kwargs))
                return await self.run_once(
                    key(*args, **kwargs), fingerprint_of(*args, **kwargs),
                    lambda attempt: function(attempt, *args, **kwargs), reconcile=hook, **options,
                )

            return wrapper

        return decorate

    async def _drive(self, steps: Steps) -> Done:
        cancel = _Cancel()
        sent: Any = None
        error: Optional[BaseException] = None
        while True:
            try:
                effect = steps.send(sent) if error is None else steps.throw(error)
            except StopIteration as stop:
                if cancel.requested:
                    raise asyncio.CancelledError()
                return stop.value
            except BaseException as failure:
                if cancel.requested and not isinstance(failure, asyncio.CancelledError):
                    raise asyncio.CancelledError() from failure
                raise
            try:
                sent, error = await self._do(effect, cancel), None
            except BaseException as raised:
                sent, error = None, raised

    async def _do(self, effect: Any, cancel: _Cancel) -> Any:
        if isinstance(effect, Rpc):
            call = getattr(self.stub, effect.method)(effect.request, timeout=effect.timeout, metadata=self._metadata)
            return await (_to_the_end(call, cancel) if effect.finish else call)
        if isinstance(effect, Sleep):
            pause = asyncio.sleep(effect.seconds)
            return await (_to_the_end(pause, cancel) if effect.finish else pause)
        return await self._run(effect, cancel)

    async def _run(self, effect: Run, cancel: _Cancel) -> Any:
        beats = asyncio.ensure_future(self._heartbeats(effect))
        try:
            result = effect.function(effect.attempt)
            if inspect.isawaitable(result):
                result = await result
            return result
        finally:
            # No heartbeat outlives the attempt.
            beats.cancel()
            await _to_the_end(asyncio.wait({beats}), cancel)
            if not beats.cancelled():
                beats.exception()  # retrieved, so that asyncio does not log it as lost

    async def _heartbeats(self, effect: Run) -> None:
        # One call per beat: a failed beat is retried by the next one, and two more fit in the lease.
        while True:
            await asyncio.sleep(effect.every)
            try:
                await self.stub.Heartbeat(
                    effect.heartbeat, timeout=min(self.settings.rpc_timeout, effect.every), metadata=self._metadata
                )
            except grpc.RpcError as error:
                if heartbeat_over(error):
                    return
