"""What an operation is given (``Attempt``), returns (``Response``) or raises (``Final``, ``Retryable``,
``OutcomeUnknown``), and what ``run_once`` returns (``Done``): shared by the threaded and the asyncio client."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Optional, Union

# A response body: bytes as they are, text as UTF-8.
Body = Union[bytes, bytearray, memoryview, str]

_INT32 = (-(2**31), 2**31 - 1)


def _is_control(char: str) -> bool:
    return char <= "\x1f" or "\x7f" <= char <= "\x9f"


@dataclass(frozen=True)
class Response:
    """An outcome as idemd stores it and replays it, byte for byte, to every later run of the key.

    ``body`` is bytes, or a ``str`` stored as UTF-8; anything else (a dict, a provider's object) raises
    ``TypeError`` here, where it is written, rather than after the operation ran: serialise it first
    (``json.dumps(...)``). ``code`` is an application status (201 for a charge, 402 for a declined
    card); ``content_type`` at most 255 bytes without control characters.
    """

    body: bytes
    code: int = 200
    content_type: str = ""

    def __post_init__(self) -> None:
        body = self.body
        if isinstance(body, str):
            object.__setattr__(self, "body", body.encode("utf-8"))
        elif isinstance(body, (bytearray, memoryview)):
            object.__setattr__(self, "body", bytes(body))
        elif not isinstance(body, bytes):
            raise TypeError(
                f"Response body must be bytes or str, not {type(body).__name__}: serialise it first, "
                "e.g. json.dumps(value)"
            )
        if isinstance(self.code, bool) or not isinstance(self.code, int):
            raise TypeError(f"Response code must be an int, not {type(self.code).__name__}")
        if not _INT32[0] <= self.code <= _INT32[1]:
            raise ValueError(f"Response code {self.code} does not fit in 32 bits")
        if not isinstance(self.content_type, str):
            raise TypeError(f"Response content_type must be a str, not {type(self.content_type).__name__}")
        if len(self.content_type.encode("utf-8", "surrogatepass")) > 255 or any(
            _is_control(c) for c in self.content_type
        ):
            raise ValueError(
                f"Response content_type {self.content_type!r}: at most 255 bytes, no control characters"
            )

    @property
    def text(self) -> str:
        """The body decoded as UTF-8."""
        return self.body.decode("utf-8")


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
    """What the operation is told about the attempt it runs in."""

    #: "idk_" + 32 hex digits: pass it to the payment provider as its idempotency key. Every attempt of
    #: the key gets the same one, so a provider that deduplicates on it charges once.
    downstream_key: str
    #: 1, 2, ...: a fencing number to forward downstream.
    attempt: int
    #: How attempt - 1 ended; None on attempt 1.
    previous: Optional[PreviousAttempt] = None


@dataclass(frozen=True)
class Done:
    """The outcome ``run_once`` returns: the same response for every run of a key."""

    response: Response
    #: The operation did not run here: an earlier attempt's stored response was replayed.
    replayed: bool
    #: The attempt that produced the response.
    attempt: int
    #: The operation did not run here: the reconcile hook found an earlier attempt's result (now stored).
    reconciled: bool = False


class Final(Exception):
    """Raise from the operation for a deterministic failure (a declined card): stored and replayed.

    ``run_once`` returns it as a ``Done`` like a success, to this caller and every later one; its
    ``final_error`` option turns it back into the caller's own exception.
    """

    def __init__(self, response: Response):
        if not isinstance(response, Response):
            raise TypeError(f"Final takes a Response, not {type(response).__name__}")
        super().__init__(f"final failure (response code {response.code})")
        self.response = response


class Retryable(Exception):
    """Raise from the operation when nothing happened (a 503, a refused connection, the provider's
    "idempotency key in use"): the attempt is aborted and ``RetryableFailure`` raised, so a retry runs it
    again. ``Retryable(error)`` or ``raise Retryable(...) from error`` keeps ``error`` as the cause."""


class OutcomeUnknown(Exception):
    """Raise from the operation when it may or may not have happened (a timeout after the request left).

    The attempt is aborted with ``outcome_unknown``, so the next attempt's ``previous`` says so and its
    reconcile hook runs first; ``OutcomeUnknownFailure`` is raised. The cause is kept as for ``Retryable``.
    """


def cause_of(marker: BaseException) -> BaseException:
    """What a ``Retryable`` or ``OutcomeUnknown`` is about: the error it was raised from or given, else itself."""
    if marker.__cause__ is not None:
        return marker.__cause__
    if marker.args and isinstance(marker.args[0], BaseException):
        return marker.args[0]
    return marker
