/**
 * TypeScript client for idemd: run an operation at most once per idempotency
 * key, with the protocol's hard parts done once (Begin first, heartbeats,
 * Complete or Abort, waiting on a concurrent duplicate, retrying Begin with
 * the same attempt nonce, LEASE_LOST handled by beginning again).
 *
 * - `client.ts`: `Client` and `runOnce`;
 * - `outcomes.ts`: what the operation throws (`Final`, `Retryable`, `OutcomeUnknown`);
 * - `errors.ts`: what runOnce throws (`IdemdError` and a subclass per outcome);
 * - `keys.ts`: `entityKey` and `fingerprint`, the same in every client language;
 * - `types.ts`: responses, attempts, results and options;
 * - `validate.ts`: idemd's field rules, checked before any call;
 * - `rpc.ts`: the contract (loaded from the package's proto/), ErrorInfo reasons.
 */
export { Client } from "./client";
export {
  FingerprintMismatchError, IdemdError, InProgressError, InvalidArgumentError, LeaseLostError, OutcomeUnknownFailure,
  RetryableFailure, UnavailableError,
} from "./errors";
export type { IdemdErrorOptions } from "./errors";
export { entityKey, fingerprint } from "./keys";
export { Final, OutcomeUnknown, Retryable } from "./outcomes";
export { protoDir, protoOptions, reasonOf } from "./rpc";
export type {
  Attempt, ClientOptions, Done, FinalError, Operation, PreviousAttempt, Reconcile, Response, RunOptions, Settings,
  StoredResponse,
} from "./types";
