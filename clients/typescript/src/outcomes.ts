// What an operation throws to say how it failed: Final (an answer, stored),
// Retryable (nothing happened) and OutcomeUnknown (it may have happened).
import { setName } from "./errors";
import type { Response, StoredResponse } from "./types";
import { storable } from "./validate";

/** `reason` as an Error's message and cause: a string is the message; an error (or any other value) is the cause. */
function messageAndCause(reason: unknown, options?: ErrorOptions): [string, ErrorOptions | undefined] {
  if (typeof reason === "string" || reason === undefined) return [reason ?? "", options];
  const message = reason instanceof Error ? reason.message : String(reason);
  return [message, { cause: reason, ...options }];
}

/**
 * Throw from the operation for a deterministic failure (a declined card): the
 * response is stored with Complete and replayed to every later run, exactly
 * like a success; runOnce resolves to it, unless a `finalError` option turns
 * it back into your error. The response is checked here: a body that is not a
 * string or bytes is a TypeError at this line.
 */
export class Final extends Error {
  readonly response: StoredResponse;

  constructor(response: Response, cause?: unknown) {
    const stored = storable(response, "new Final(response)");
    super(`final failure (response code ${stored.code})`, cause === undefined ? undefined : { cause });
    this.response = stored;
  }
}

/**
 * Throw from the operation when it failed and nothing happened (a 503, a
 * refused connection, the provider's "idempotency key in use"): the attempt is
 * aborted and runOnce rejects with `RetryableFailure`, so a retry runs it
 * again. `new Retryable(error)` or `new Retryable("message", { cause })`.
 */
export class Retryable extends Error {
  constructor(reason?: unknown, options?: ErrorOptions) {
    super(...messageAndCause(reason, options));
  }
}

/**
 * Throw from the operation when it may or may not have happened (the request
 * left and no answer came: a timeout, a dropped connection): the attempt is
 * aborted with `outcome_unknown`, runOnce rejects with
 * `OutcomeUnknownFailure`, and the next attempt sees
 * `attempt.previous.outcomeUnknown` (its reconcile hook runs first).
 */
export class OutcomeUnknown extends Error {
  constructor(reason?: unknown, options?: ErrorOptions) {
    super(...messageAndCause(reason, options));
  }
}

setName(Final, "Final");
setName(Retryable, "Retryable");
setName(OutcomeUnknown, "OutcomeUnknown");
