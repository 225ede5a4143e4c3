"""Python client for idemd: run an operation exactly once per idempotency key.

``Client.run_once(key, fingerprint, operation)`` (threaded) and ``idemd_client.aio.Client.run_once`` (asyncio,
``async def`` operations) run ``operation`` at most once per key and return its response, or the stored
response of the attempt that ran it:

- Begin → completed: the stored response is returned (``Done.replayed``); nothing runs;
- acquired: ``operation(attempt)`` runs with ``attempt.downstream_key`` (pass it to the payment provider as
  its idempotency key) while the lease is heartbeated; its ``Response``, or a raised ``Final`` (a
  deterministic failure such as a declined card), is stored with Complete and replayed to every retry; a
  raised ``Retryable`` (nothing happened) aborts the attempt, so a retry runs it again; a raised
  ``OutcomeUnknown`` (a timeout after the request left: it may have happened) aborts it as outcome-unknown,
  and the next attempt sees that in ``attempt.previous``. Anything else the operation raises (a bug, a
  cancellation), or a result that is not a ``Response``, counts as outcome-unknown too: the helper cannot
  tell whether the provider was called. The lease always ends with Complete or Abort, never left to expire;
- in_progress: Begin waits server-side, then again with backoff and jitter until the budget runs out.

RPCs are retried only on UNAVAILABLE and DEADLINE_EXCEEDED, a bounded number of times, Begin with the same
attempt nonce. When Complete answers LEASE_LOST, Begin runs again: it replays the winner's result or runs a new
attempt (at most twice more, then ``LeaseLost``).

Errors are ``IdemdError`` subclasses, one per outcome (see ``idemd_client.errors``). The generated gRPC code is
``idemd.v1`` (``idempotency_pb2``, ``admin_pb2`` and their ``_grpc`` stubs).
"""
from ._sync import Client
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
