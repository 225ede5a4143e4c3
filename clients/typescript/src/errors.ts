// What runOnce throws: one base class, IdemdError, with a subclass per
// outcome, each keeping its cause, the key, and idemd's gRPC code and
// ErrorInfo reason when idemd answered the error.
import type { status } from "@grpc/grpc-js";

export interface IdemdErrorOptions {
  cause?: unknown;
  key?: string;
  namespace?: string;
  attempt?: number;
  code?: status;
  reason?: string;
}

/**
 * The base of every error the client throws. Thrown as itself when idemd
 * answered an error no subclass stands for (UNAUTHENTICATED,
 * PERMISSION_DENIED, RESOURCE_EXHAUSTED, …): see `code`.
 */
export class IdemdError extends Error {
  /** The idempotency key of the call; undefined for an error of the client itself (its address, namespace, options). */
  declare readonly key?: string;
  /** The namespace of the call. */
  declare readonly namespace?: string;
  /** The attempt that ran, when one was acquired. */
  declare readonly attempt?: number;
  /** idemd's gRPC status code (`grpc.status`), when idemd answered the error. */
  declare readonly code?: status;
  /** idemd's `google.rpc.ErrorInfo` reason ("FINGERPRINT_MISMATCH", "LEASE_LOST", "INVALID_FIELD", …), when idemd gave one. */
  declare readonly reason?: string;

  constructor(message: string, options: IdemdErrorOptions = {}) {
    const { cause, ...fields } = options;
    super(message, "cause" in options ? { cause } : undefined);
    for (const [name, value] of Object.entries(fields)) {
      if (value !== undefined) Object.defineProperty(this, name, { value, enumerable: true });
    }
  }
}

/** The key was first used with a different request (fingerprint); nothing ran, the record is unchanged. */
export class FingerprintMismatchError extends IdemdError {}

/** Another attempt still held the key when the in-progress budget ran out; nothing ran here. Retry later. */
export class InProgressError extends IdemdError {}

/**
 * The operation ran, but its lease was taken over (or released by an
 * operator) before its outcome was stored, again and again. Calling again
 * replays the winner's result or runs a new attempt with the same downstream key.
 */
export class LeaseLostError extends IdemdError {}

/**
 * The operation threw `Retryable`: nothing happened, and the attempt was
 * aborted, so a retry runs it again. `cause` is what it threw.
 */
export class RetryableFailure extends IdemdError {}

/**
 * The side effect may have happened, and the attempt was aborted as
 * outcome-unknown, so the next attempt sees `attempt.previous.outcomeUnknown`
 * (and its reconcile hook runs first). Thrown for `OutcomeUnknown`, for a
 * reconcile hook that threw, for a `Retryable` that followed an
 * outcome-unknown attempt nobody reconciled (this error always says what the
 * record says), and when idemd refused to store the outcome. Retrying is safe
 * when the provider deduplicates on `downstreamKey` or a reconcile hook looks
 * it up first. `cause` is what was thrown or idemd's error.
 */
export class OutcomeUnknownFailure extends IdemdError {}

/**
 * A namespace, key, fingerprint, option or address idemd would refuse, found
 * when the client is built or called, before any RPC; or idemd's
 * INVALID_ARGUMENT (`code`, `reason` "INVALID_FIELD"). Nothing ran.
 */
export class InvalidArgumentError extends IdemdError {}

/** idemd stayed unreachable or too slow (UNAVAILABLE, DEADLINE_EXCEEDED) past the retries; nothing ran. */
export class UnavailableError extends IdemdError {}

/**
 * `name` on the prototype rather than on each instance: it shows in
 * `String(error)` and in the stack's first line, not as a field of its own.
 */
export function setName(errorClass: { prototype: Error }, name: string): void {
  Object.defineProperty(errorClass.prototype, "name", { value: name, writable: true, configurable: true });
}

setName(IdemdError, "IdemdError");
setName(FingerprintMismatchError, "FingerprintMismatchError");
setName(InProgressError, "InProgressError");
setName(LeaseLostError, "LeaseLostError");
setName(RetryableFailure, "RetryableFailure");
setName(OutcomeUnknownFailure, "OutcomeUnknownFailure");
setName(InvalidArgumentError, "InvalidArgumentError");
setName(UnavailableError, "UnavailableError");
