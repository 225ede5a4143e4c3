"""The threaded client: blocking calls on a ``grpc`` channel, heartbeats in a thread."""
from __future__ import annotations

import functools
import threading
import time
from typing import Any, Callable, Optional, Sequence

import grpc

from idemd.v1 import idempotency_pb2_grpc as pb_grpc

from ._protocol import FinalError, Protocol, Rpc, Run, Seconds, Settings, Sleep, Steps, bearer, heartbeat_over
from ._protocol import check_run_options, parse_address
from ._types import Attempt, Done, Response


class Client(Protocol):
    """A connection to idemd for one namespace, for threaded code (Flask, Django, workers).

    ``address`` is ``host:port`` or ``http://host:port`` (plain text), or ``https://host:port`` (TLS with the
    system's roots, or ``credentials``); or pass a ``channel`` you built and keep owning (``close()`` leaves it
    open). ``interceptors`` (``grpc.UnaryUnaryClientInterceptor``) wrap every call. The namespace (1-64
    characters of ``[a-z0-9._-]``), the address and every setting are checked here: a bad one raises
    ``InvalidArgument``. The settings are defaults for every call; ``run_once`` and ``once`` take
    ``lease_ttl``, ``retention``, ``wait``, ``in_progress_budget`` and ``final_error`` for one call. Seconds
    are numbers or ``timedelta``. Thread-safe: make one per process and namespace.
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
        interceptors: Sequence[Any] = (),
        channel: Optional[grpc.Channel] = None,
    ):
        super().__init__(namespace, Settings.of(
            lease_ttl=lease_ttl, wait=wait, in_progress_budget=in_progress_budget, retention=retention,
            rpc_retries=rpc_retries, rpc_timeout=rpc_timeout, final_error=final_error,
        ))
        self._metadata = bearer(token)
        self._own: Optional[grpc.Channel] = None
        if channel is None:
            target, tls = parse_address(address)
            if tls and credentials is None:
                credentials = grpc.ssl_channel_credentials()
            channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
            self._own = channel
        if interceptors:
            channel = grpc.intercept_channel(channel, *interceptors)
        self._channel = channel
        self._stub = pb_grpc.IdempotencyStub(channel)

    @property
    def stub(self) -> pb_grpc.IdempotencyStub:
        """The generated stub, for calls run_once does not cover (Lookup)."""
        return self._stub

    @property
    def channel(self) -> grpc.Channel:
        """The channel, e.g. for ``idemd.v1.admin_pb2_grpc.AdminStub``."""
        return self._channel

    def close(self) -> None:
        """Closes the channel this client opened (not one given to it)."""
        if self._own is not None:
            self._own.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def run_once(
        self,
        key: str,
        fp: bytes,
        operation: Callable[[Attempt], Response],
        *,
        reconcile: Optional[Callable[[Attempt], Optional[Response]]] = None,
        final_error: Optional[FinalError] = None,
        lease_ttl: Optional[Seconds] = None,
        retention: Optional[Seconds] = None,
        wait: Optional[Seconds] = None,
        in_progress_budget: Optional[Seconds] = None,
    ) -> Done:
        """Runs ``operation(attempt)`` at most once per ``key`` (in this client's namespace) and returns its
        response, or the stored response of the attempt that ran it. ``fp`` identifies the request
        (``fingerprint(...)``, at most 64 bytes): the key reused with another one raises ``FingerprintMismatch``.

        The operation runs on the calling thread, while a thread heartbeats the lease every third of
        ``lease_ttl``. It returns a ``Response`` or raises ``Final`` (both stored with Complete and replayed),
        ``Retryable`` (aborted: ``RetryableFailure``) or ``OutcomeUnknown`` (aborted as outcome-unknown:
        ``OutcomeUnknownFailure``). Anything else it raises, and a result that is not a ``Response``, aborts the
        attempt as outcome-unknown (the helper cannot tell whether the provider was called) and is re-raised as
        it is (a ``TypeError`` for the wrong result). The lease always ends here, never left to expire.

        ``reconcile`` runs first when the previous attempt's outcome is unknown, for a provider that does not
        deduplicate on ``attempt.downstream_key``: a ``Response`` (or ``Final``) it returns is stored without
        running the operation (``Done.reconciled``), None runs the operation, an exception aborts the attempt
        still outcome-unknown (``OutcomeUnknownFailure``).

        ``final_error(response)`` turns a stored final failure back into your own exception, for this run and
        every replay alike: return the exception to raise, or None for a success.
        """
        options = dict(final_error=final_error, lease_ttl=lease_ttl, retention=retention, wait=wait,
                       in_progress_budget=in_progress_budget)
        return self._drive(self.steps(key, fp, operation, reconcile, options))

    def once(
        self,
        key: Callable[..., str],
        fingerprint_of: Callable[..., bytes],
        reconcile: Optional[Callable[..., Optional[Response]]] = None,
        **options: Any,
    ) -> Callable[[Callable[..., Response]], Callable[..., Done]]:
        """Decorator: ``@client.once(key=lambda order: ..., fingerprint_of=lambda order: ...)``.

        The decorated function receives the ``Attempt`` first, then the arguments of the call, and returns a
        ``Response`` (or raises ``Final`` / ``Retryable`` / ``OutcomeUnknown``); calling it returns the
        ``Done``. ``reconcile`` is called the same way; ``options`` are run_once's (``final_error``,
        ``lease_ttl``, ``retention``, ``wait``, ``in_progress_budget``).
        """
        check_run_options(self.settings, options)

        def decorate(function: Callable[..., Response]) -> Callable[..., Done]:
            @functools.wraps(function)
            def wrapper(*args: Any, **kwargs: Any) -> Done:
                hook = None if reconcile is None else (lambda attempt: reconcile(attempt, *args, **kwargs))
                return self.run_once(
                    key(*args, **kwargs), fingerprint_of(*args, **kwargs),
                    lambda attempt: function(attempt, *args, **kwargs), reconcile=hook, **options,
                )

            return wrapper

        return decorate

    def _drive(self, steps: Steps) -> Done:
        sent: Any = None
        error: Optional[BaseException] = None
        while True:
            try:
                effect = steps.send(sent) if error is None else steps.throw(error)
            except StopIteration as stop:
                return stop.value
            try:
                sent, error = self._do(effect), None
            except BaseException as raised:
                sent, error = None, raised

    def _do(self, effect: Any) -> Any:
        if isinstance(effect, Rpc):
            method = getattr(self._stub, effect.method)
            return method(effect.request, timeout=effect.timeout, metadata=self._metadata)
        if isinstance(effect, Sleep):
            time.sleep(effect.seconds)
            return None
        return self._run(effect)

    def _run(self, effect: Run) -> Any:
        stop = threading.Event()
        beats = threading.Thread(target=self._heartbeats, args=(stop, effect), name="idemd-heartbeat", daemon=True)
        beats.start()
        try:
            return effect.function(effect.attempt)
        finally:
            # No heartbeat outlives the attempt.
            stop.set()
            beats.join()

    def _heartbeats(self, stop: threading.Event, effect: Run) -> None:
        # One call per beat: a failed beat is retried by the next one, and two more fit in the lease.
        while not stop.wait(effect.every):
            try:
                self._stub.Heartbeat(
                    effect.heartbeat, timeout=min(self.settings.rpc_timeout, effect.every), metadata=self._metadata
                )
            except grpc.RpcError as error:
                if heartbeat_over(error):
                    return
