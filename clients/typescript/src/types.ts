// The shapes runOnce takes and gives: responses, attempts, results, hooks and
// the knobs of a client and of one call.
import type { ChannelCredentials, ChannelOptions, Interceptor } from "@grpc/grpc-js";

/**
 * What an operation (or `Final`, or a reconcile hook) gives idemd to store
 * and replay to every retry.
 */
export interface Response {
  /**
   * A string, stored as its UTF-8 bytes, or bytes (`Uint8Array`, `Buffer`).
   * Anything else is a `TypeError` (the attempt is aborted as outcome-unknown).
   */
  body: string | Uint8Array;
  /** An application status stored with it, e.g. 201 for a charge, 402 for a declined card: a 32-bit integer. */
  code: number;
  /** Stored and replayed with it: at most 255 bytes, no control characters. Default "". */
  contentType?: string;
}

/** A response as idemd stored it and replays it, the same for the run that stored it and every replay. */
export interface StoredResponse {
  body: Buffer;
  code: number;
  contentType: string;
}

/** What the operation is told about the attempt it runs in. */
export interface Attempt {
  /**
   * "idk_" + 32 hex digits: pass it to the payment provider as its
   * idempotency key. Every attempt of the key gets the same one, so a provider
   * that deduplicates on it charges once even when an earlier attempt crashed
   * after charging.
   */
  downstreamKey: string;
  /** 1, 2, …: a fencing number to forward downstream. */
  attempt: number;
  /** How attempt - 1 ended; undefined on attempt 1. */
  previous?: PreviousAttempt;
}

/** How the attempt before this one ended (idemd's `Acquired.previous`). */
export interface PreviousAttempt {
  attempt: number;
  /** "ABORTED_BY_CALLER", "ABORTED_BY_REAPER" (its lease expired) or "ABORTED_BY_OPERATOR". */
  abortedBy: string;
  /** "lease expired" for an expired lease, else the reason given. */
  abortReason: string;
  /** The side effect may have happened: aborted as `OutcomeUnknown`, released so, or its lease expired. */
  outcomeUnknown: boolean;
  /** When it ended (idemd's clock). */
  endedAt?: Date;
}

/** The result of a runOnce that has an outcome. */
export interface Done {
  response: StoredResponse;
  /** The operation did not run here: an earlier attempt's stored response was returned. */
  replayed: boolean;
  /** The attempt that produced the response. */
  attempt: number;
  /** The operation did not run here: the reconcile hook found an earlier attempt's result at the provider (now stored). */
  reconciled: boolean;
}

/**
 * The side effect to run at most once per key. It returns the response to
 * store, or throws: `Final` (a deterministic failure, stored like a success),
 * `Retryable` (nothing happened), `OutcomeUnknown` (it may have happened).
 * Anything else it throws counts as an unknown outcome (see `Client.runOnce`).
 */
export type Operation = (attempt: Attempt) => Response | Promise<Response>;

/**
 * Asks a provider that does not deduplicate on `downstreamKey` what it holds
 * for `attempt.downstreamKey`: its result (or a thrown `Final`), or
 * undefined/null when it holds nothing.
 */
export type Reconcile = (attempt: Attempt) => Response | null | undefined | Promise<Response | null | undefined>;

/**
 * Turns a stored outcome back into the caller's own error: returns the error
 * for a final failure (usually chosen by `response.code`), undefined or null
 * for a success.
 */
export type FinalError = (response: StoredResponse) => Error | null | undefined;

/** Knobs a client takes as defaults for every call and `runOnce` takes for one call. */
export interface Settings {
  /** Each attempt's lease, 1 s to 1 h (default 30 s): how long a crashed caller blocks the key; heartbeats renew it every third of it. */
  leaseTtlMs?: number;
  /** How long the outcome is kept and replayed (default: the server's, 24 h); within the server's range ([24 h, 30 d] by default). */
  retentionMs?: number;
  /** How long one Begin waits server-side for a concurrent attempt on the same key, 0 to 60 s (default 5 s). */
  waitMs?: number;
  /** How long runOnce keeps waiting in all while another attempt holds the key (default 60 s), then `InProgressError`. */
  inProgressBudgetMs?: number;
  /** Retries of one RPC on UNAVAILABLE and DEADLINE_EXCEEDED, with jittered backoff (default 5). */
  rpcRetries?: number;
  /** The deadline of one RPC (default 5 s; Begin adds its wait). */
  rpcTimeoutMs?: number;
  /**
   * Turns a stored final failure back into your error type, for the run that
   * stored it and every replay alike: runOnce throws the error it returns.
   */
  finalError?: FinalError;
}

/** The options of `new Client(address, namespace, options)`. */
export interface ClientOptions extends Settings {
  /** Sent as `authorization: Bearer <token>` on every call, for an idemd with a tokens file. */
  token?: string;
  /** TLS or mTLS (`grpc.credentials.createSsl(...)`). Default: TLS with the system's roots for `https://`, plain text otherwise. */
  credentials?: ChannelCredentials;
  /** Client interceptors of `@grpc/grpc-js`, run on every call. */
  interceptors?: Interceptor[];
  /** Channel options of `@grpc/grpc-js` (keepalive, message sizes, …). */
  channelOptions?: ChannelOptions;
}

/** The options of one `runOnce` call: the client's settings for this call, and its reconcile hook. */
export interface RunOptions extends Settings {
  /**
   * Runs before the operation when the previous attempt's outcome is unknown
   * (`attempt.previous.outcomeUnknown`). A response (or a thrown `Final`) is
   * stored and returned with `reconciled: true`, and the operation does not
   * run; undefined or null runs the operation; a throw aborts the attempt
   * with its outcome still unknown and rejects with `OutcomeUnknownFailure`.
   */
  reconcile?: Reconcile;
}
