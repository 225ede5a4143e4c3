// The Client and its runOnce: Begin, the operation under a heartbeated lease,
// then Complete or Abort, always.
import { randomBytes } from "crypto";
import { setTimeout as sleep } from "timers/promises";
import * as grpc from "@grpc/grpc-js";
import {
  FingerprintMismatchError, IdemdError, IdemdErrorOptions, InProgressError, InvalidArgumentError, LeaseLostError,
  OutcomeUnknownFailure, RetryableFailure, UnavailableError,
} from "./errors";
import { Final, OutcomeUnknown, Retryable } from "./outcomes";
import { Stub, duration, durationMs, idempotencyService, isTransient, reasonOf, timestamp } from "./rpc";
import type { Attempt, ClientOptions, Done, Operation, PreviousAttempt, RunOptions, StoredResponse } from "./types";
import {
  CLIENT_OPTIONS, DEFAULTS, RUN_OPTIONS, Resolved, checkFingerprint, checkFunction, checkKey, checkNamespace, checkOptions,
  checkToken, parseAddress, resolve, storable,
} from "./validate";

/**
 * How many times one runOnce begins again after Complete found its lease
 * taken over before it gives up with LeaseLostError: each loss means another
 * attempt owns the key, and chasing it forever would never return.
 */
const LEASE_LOSSES = 2;

/** ±50 %, so that callers retrying together do not move in lockstep. */
const jitter = (ms: number) => ms * (0.5 + Math.random());

/** How an acquired attempt ends: Complete with a response, or Abort with what the record says and what the caller gets. */
type Ending =
  | { response: unknown; reconciled: boolean; source: string }
  | { abort: string; outcomeUnknown: boolean; error: unknown };

/** What an attempt's operation (or reconcile hook) produced, checked storable, before Complete. */
type Ran = { response: StoredResponse; reconciled: boolean };

/**
 * A client of idemd for one namespace. `runOnce` runs an operation at most
 * once per key and resolves to its response, or to the stored response of the
 * attempt that ran it. Make one per process and namespace (it holds one gRPC
 * channel) and `close()` it at shutdown.
 */
export class Client {
  readonly namespace: string;
  private readonly stub: Stub;
  private readonly token?: string;
  private readonly defaults: Resolved;

  /**
   * `address` is `host:port`, `http://host:port` (plain text) or
   * `https://host:port` (TLS with the system's roots); `namespace` is 1-64
   * characters of [a-z0-9._-]. Both, and the options, are checked here:
   * `InvalidArgumentError`. The connection is made at the first call.
   */
  constructor(address: string, namespace: string, options: ClientOptions = {}) {
    const given = checkOptions("Client options", options, CLIENT_OPTIONS) as ClientOptions;
    const { target, tls } = parseAddress(address);
    this.namespace = checkNamespace(namespace);
    this.defaults = resolve(DEFAULTS, given);
    this.token = checkToken(given.token);
    const credentials = given.credentials ?? (tls ? grpc.credentials.createSsl() : grpc.credentials.createInsecure());
    const Idempotency = idempotencyService();
    this.stub = new Idempotency(target, credentials, { ...given.channelOptions, interceptors: given.interceptors });
  }

  /** Closes the channel. Calls in flight fail with CANCELLED. */
  close(): void {
    this.stub.close();
  }

  /**
   * Runs `operation` at most once per `key` (in this client's namespace) and
   * resolves to its response, or the stored response of the attempt that ran
   * it. `fingerprint` identifies the request (`fingerprint({...})`, at most
   * 64 bytes): a key reused with another one is `FingerprintMismatchError`.
   *
   * Begin first: a completed key is replayed without running anything; a key
   * another attempt holds is waited on (`waitMs` per Begin, then backoff until
   * `inProgressBudgetMs`); an acquired key runs the operation while its lease
   * is heartbeated every third of `leaseTtlMs`, then the lease always ends:
   * - a returned response or a thrown `Final`: Complete (stored, replayed to every retry);
   * - `Retryable`: Abort, then `RetryableFailure`;
   * - `OutcomeUnknown`: Abort as outcome-unknown, then `OutcomeUnknownFailure`;
   * - anything else thrown: Abort as outcome-unknown (the helper cannot tell
   *   whether the provider was called before it), then the same value is
   *   rethrown: the key is never left locked until the lease expires;
   * - a response that cannot be stored (a body neither string nor bytes, …):
   *   Abort as outcome-unknown, then a TypeError saying why.
   * If Complete answers LEASE_LOST (the lease expired, or an operator
   * released it), Begin runs again: it replays the winner's result, or, handed
   * the same record again (same downstream key), the response this call
   * already has is stored under the new attempt: the operation never runs
   * twice in one call. At most twice more, then `LeaseLostError`.
   */
  async runOnce(key: string, fingerprint: Uint8Array, operation: Operation, options: RunOptions = {}): Promise<Done> {
    const given = checkOptions("runOnce options", options, RUN_OPTIONS) as RunOptions;
    checkKey(key);
    const fp = checkFingerprint(fingerprint, key);
    checkFunction("operation", operation, key);
    if (given.reconcile !== undefined) checkFunction("reconcile", given.reconcile, key);
    const s = resolve(this.defaults, given, key);
    // What this call's operation (or hook) produced once it has run, and
    // under which downstream key: kept across a lost lease.
    let known: { ran: Ran; downstreamKey: string } | undefined;
    for (let losses = 0; ; losses++) {
      const begun = await this.acquire(key, fp, s);
      if ("replayed" in begun) return this.finish(s, begun);
      const lease = begun.lease;
      let ran: Ran;
      if (known === undefined) {
        ran = await this.runAttempt(key, lease, operation, given, s);
      } else if (lease.downstream_key === known.downstreamKey) {
        // The same record again after LEASE_LOST: this call already knows
        // what happened under this downstream key.
        ran = known.ran;
      } else {
        // The record was invalidated (or expired) and replaced meanwhile:
        // this call's operation did not run for it.
        await this.abort(key, lease.lease_token, "the record was replaced after this call lost its lease", false, s);
        throw new LeaseLostError(
          `idemd: the lease on key ${JSON.stringify(key)} in namespace ${JSON.stringify(this.namespace)} was lost after ` +
            `the operation ran, and the key now names a new record; its result was not stored`,
          { key, namespace: this.namespace, attempt: lease.attempt },
        );
      }
      const stored = await this.store(key, lease, ran, s);
      if ("response" in stored) return this.finish(s, stored);
      if (losses >= LEASE_LOSSES) {
        throw new LeaseLostError(
          `idemd: the lease on key ${JSON.stringify(key)} in namespace ${JSON.stringify(this.namespace)} was lost ` +
            `${losses + 1} times before the operation's outcome could be stored`,
          this.details(key, stored.lost, lease.attempt),
        );
      }
      known = { ran, downstreamKey: lease.downstream_key };
    }
  }

  /** The caller's error for a stored final failure, when `finalError` makes one. */
  private finish(s: Resolved, done: Done): Done {
    const error = s.finalError?.(done.response);
    if (error !== undefined && error !== null) throw error;
    return done;
  }

  /** The fields of an IdemdError caused by `cause`, with idemd's code and reason when it is idemd's gRPC error. */
  private details(key: string, cause: unknown, attempt?: number): IdemdErrorOptions {
    const options: IdemdErrorOptions = { cause, key, namespace: this.namespace, attempt };
    const code = (cause as grpc.ServiceError | undefined)?.code;
    if (typeof code === "number") Object.assign(options, { code, reason: reasonOf(cause) });
    return options;
  }

  /** The error for a failed Begin: nothing ran. */
  private beginFailure(key: string, error: unknown, s: Resolved): IdemdError {
    const options = this.details(key, error);
    const where = `key ${JSON.stringify(key)} in namespace ${JSON.stringify(this.namespace)}`;
    const details = (error as grpc.ServiceError | undefined)?.details;
    const what = `${grpc.status[options.code!] ?? String(error)}${details ? ` (${details})` : ""}`;
    if (options.reason === "FINGERPRINT_MISMATCH") {
      return new FingerprintMismatchError(`idemd: ${where} was first used with a different request (fingerprint mismatch); nothing ran`, options);
    }
    if (options.code === grpc.status.INVALID_ARGUMENT) {
      return new InvalidArgumentError(`idemd: idemd refused Begin of ${where}: ${what}; nothing ran`, options);
    }
    if (isTransient(error)) {
      return new UnavailableError(`idemd: Begin of ${where} failed with ${what} after ${s.rpcRetries} retries; nothing ran`, options);
    }
    return new IdemdError(`idemd: Begin of ${where} failed with ${what}; nothing ran`, options);
  }

  /**
   * Begin until the key is acquired or found completed, waiting on another
   * attempt up to the in-progress budget. One nonce serves every Begin of the
   * round, so a Begin whose reply was lost and is sent again gets the same
   * lease back.
   */
  private async acquire(key: string, fingerprint: Uint8Array, s: Resolved): Promise<{ lease: any } | Done> {
    const nonce = randomBytes(16).toString("hex");
    const giveUp = Date.now() + s.inProgressBudgetMs;
    for (;;) {
      const wait = Math.max(0, Math.min(s.waitMs, giveUp - Date.now()));
      const request = {
        namespace: this.namespace,
        key,
        fingerprint,
        lease_ttl: duration(s.leaseTtlMs),
        wait_timeout: duration(wait),
        attempt_nonce: nonce,
        ...(s.retentionMs === undefined ? {} : { retention: duration(s.retentionMs) }),
      };
      let answer: any;
      try {
        answer = await this.call("Begin", request, s.rpcTimeoutMs + wait, s);
      } catch (error) {
        throw this.beginFailure(key, error, s);
      }
      if (answer.outcome === "acquired") return { lease: answer.acquired };
      if (answer.outcome === "completed") return replay(answer.completed);
      const left = giveUp - Date.now();
      if (left <= 0) {
        throw new InProgressError(
          `idemd: another attempt (${answer.in_progress?.attempt}) still holds key ${JSON.stringify(key)} in namespace ` +
            `${JSON.stringify(this.namespace)} after waiting ${s.inProgressBudgetMs} ms; nothing ran here`,
          { key, namespace: this.namespace },
        );
      }
      await sleep(Math.min(jitter(durationMs(answer.in_progress?.retry_after) || 200), left));
    }
  }

  /**
   * Runs one acquired attempt (reconcile hook, operation) under heartbeats.
   * Returns the response to store, the lease still held; any other ending
   * aborts the lease and throws.
   */
  private async runAttempt(key: string, lease: any, operation: Operation, options: RunOptions, s: Resolved): Promise<Ran> {
    const attempt: Attempt = { downstreamKey: lease.downstream_key, attempt: lease.attempt };
    if (lease.previous) attempt.previous = previousOf(lease.previous);
    const token: string = lease.lease_token;
    const stopHeartbeats = this.heartbeats(key, token, s);
    let ending: Ending;
    try {
      ending = await this.decide(key, attempt, operation, options);
    } finally {
      await stopHeartbeats();
    }
    if ("abort" in ending) {
      await this.abort(key, token, ending.abort, ending.outcomeUnknown, s);
      throw ending.error;
    }
    let response: StoredResponse;
    try {
      response = storable(ending.response, ending.source);
    } catch (problem) {
      // The provider may have been called: the record says so, and the
      // caller learns why nothing was stored.
      await this.abort(key, token, "the response cannot be stored", true, s);
      throw new TypeError(`${(problem as Error).message}; attempt ${attempt.attempt} of key ${JSON.stringify(key)} was aborted as outcome-unknown`);
    }
    return { response, reconciled: "reconciled" in ending && ending.reconciled };
  }

  /**
   * Completes the lease with the response. `lost` is Complete's LEASE_LOST
   * error when the lease expired or was released; any other failure aborts
   * the lease as outcome-unknown and throws.
   */
  private async store(key: string, lease: any, ran: Ran, s: Resolved): Promise<Done | { lost: unknown }> {
    const { response } = ran;
    const token: string = lease.lease_token;
    const request = {
      namespace: this.namespace,
      key,
      lease_token: token,
      response: response.body,
      response_code: response.code,
      content_type: response.contentType,
    };
    try {
      await this.call("Complete", request, s.rpcTimeoutMs, s);
    } catch (error) {
      if (reasonOf(error) === "LEASE_LOST") return { lost: error };
      // It happened (or the provider holds it) but is not stored: end the
      // lease as outcome-unknown so that the next attempt reconciles.
      await this.abort(key, token, "the outcome could not be stored", true, s);
      throw new OutcomeUnknownFailure(
        `idemd: the operation on key ${JSON.stringify(key)} (attempt ${lease.attempt}) ran but idemd did not store its ` +
          `outcome (${grpc.status[(error as grpc.ServiceError).code] ?? error}); aborted as outcome-unknown`,
        this.details(key, error, lease.attempt),
      );
    }
    return { response, replayed: false, attempt: lease.attempt, reconciled: ran.reconciled };
  }

  /** Runs the reconcile hook (when due) and the operation, and says how the attempt ends. Never throws. */
  private async decide(key: string, attempt: Attempt, operation: Operation, options: RunOptions): Promise<Ending> {
    const fields = { key, namespace: this.namespace, attempt: attempt.attempt };
    const describe = `the operation on key ${JSON.stringify(key)} (attempt ${attempt.attempt})`;
    // Whether attempt - 1 may have done it and nobody has checked.
    let unresolved = attempt.previous?.outcomeUnknown ?? false;
    if (unresolved && options.reconcile) {
      try {
        const found = await options.reconcile(attempt);
        if (found !== undefined && found !== null) return { response: found, reconciled: true, source: "the reconcile hook's response" };
      } catch (error) {
        if (error instanceof Final) return { response: error.response, reconciled: true, source: "the reconcile hook's Final" };
        return {
          abort: "reconcile failed",
          outcomeUnknown: true,
          error: new OutcomeUnknownFailure(
            `idemd: the reconcile hook for ${describe} threw, so whether an earlier attempt took effect is still unknown; ` +
              `aborted as outcome-unknown: ${messageOf(error)}`,
            { ...fields, cause: error },
          ),
        };
      }
      unresolved = false;
    }
    try {
      return { response: await operation(attempt), reconciled: false, source: "the operation's response" };
    } catch (error) {
      if (error instanceof Final) return { response: error.response, reconciled: false, source: "the operation's Final" };
      if (error instanceof OutcomeUnknown) {
        return {
          abort: "outcome unknown",
          outcomeUnknown: true,
          error: new OutcomeUnknownFailure(
            `idemd: ${describe} may or may not have taken effect; aborted as outcome-unknown: ${messageOf(error)}`,
            { ...fields, cause: error },
          ),
        };
      }
      if (error instanceof Retryable && unresolved) {
        // Nothing happened here, but an unreconciled earlier attempt may
        // still have: keep the record saying so, or the attempt after this
        // one would skip its reconcile hook.
        return {
          abort: "retryable failure; the previous outcome is unknown",
          outcomeUnknown: true,
          error: new OutcomeUnknownFailure(
            `idemd: ${describe} threw Retryable after an attempt whose outcome is unknown and was not reconciled; ` +
              `aborted as outcome-unknown: ${messageOf(error)}`,
            { ...fields, cause: error },
          ),
        };
      }
      if (error instanceof Retryable) {
        return {
          abort: "retryable failure",
          outcomeUnknown: false,
          error: new RetryableFailure(`idemd: ${describe} failed and was aborted; a retry runs it again: ${messageOf(error)}`, {
            ...fields,
            cause: error,
          }),
        };
      }
      // Anything else (a bug, a serialization error, a provider error the
      // operation did not classify) may have come after the provider was
      // called: for a payment "it may have charged" is the safe answer. The
      // caller gets what was thrown, as it was thrown.
      return { abort: `the operation threw ${nameOf(error)}`, outcomeUnknown: true, error };
    }
  }

  /**
   * Renews the lease every third of its TTL, one Heartbeat at a time, until
   * the returned function is called; that function also cancels a Heartbeat in
   * flight and resolves once none is left, so nothing outlives the attempt. A
   * failed Heartbeat is not retried (the next one is the retry); a lost lease
   * (LEASE_LOST, NOT_FOUND) stops them, and Complete reports it.
   */
  private heartbeats(key: string, token: string, s: Resolved): () => Promise<void> {
    const every = s.leaseTtlMs / 3;
    const request = { namespace: this.namespace, key, lease_token: token, lease_ttl: duration(s.leaseTtlMs) };
    let stopped = false;
    let timer: NodeJS.Timeout | undefined;
    let inFlight: { promise: Promise<unknown>; cancel: () => void } | undefined;
    const beat = () => {
      const call = this.once("Heartbeat", request, Math.min(s.rpcTimeoutMs, every));
      inFlight = call;
      call.promise.then(
        () => {
          if (!stopped) timer = setTimeout(beat, every);
        },
        (error: grpc.ServiceError) => {
          const lost = error.code === grpc.status.FAILED_PRECONDITION || error.code === grpc.status.NOT_FOUND;
          if (!stopped && !lost) timer = setTimeout(beat, every);
        },
      );
    };
    timer = setTimeout(beat, every);
    return async () => {
      stopped = true;
      clearTimeout(timer);
      if (inFlight) {
        inFlight.cancel();
        await inFlight.promise.catch(() => undefined);
      }
    };
  }

  /**
   * Ends the lease. Its failure is not reported: LEASE_LOST means the lease
   * already ended, and if idemd is unreachable the lease expires by itself,
   * which idemd records as outcome-unknown anyway.
   */
  private async abort(key: string, token: string, reason: string, outcomeUnknown: boolean, s: Resolved): Promise<void> {
    const request = { namespace: this.namespace, key, lease_token: token, reason, outcome_unknown: outcomeUnknown };
    await this.call("Abort", request, s.rpcTimeoutMs, s).catch(() => undefined);
  }

  /** One RPC with its own deadline; `cancel` ends it early (CANCELLED). */
  private once(method: string, request: object, timeoutMs: number): { promise: Promise<any>; cancel: () => void } {
    const metadata = new grpc.Metadata();
    if (this.token) metadata.set("authorization", `Bearer ${this.token}`);
    let call: grpc.ClientUnaryCall | undefined;
    const promise = new Promise<any>((resolve, reject) => {
      call = this.stub[method](request, metadata, { deadline: new Date(Date.now() + timeoutMs) }, (error, response) =>
        error ? reject(error) : resolve(response),
      );
    });
    return { promise, cancel: () => call?.cancel() };
  }

  /**
   * One RPC, retried on UNAVAILABLE and DEADLINE_EXCEEDED up to `rpcRetries`
   * times with jittered backoff. A request is retried as is: Begin with the
   * same attempt nonce gets the same lease back, and Complete and Abort are
   * idempotent for the same lease token.
   */
  private async call(method: string, request: object, timeoutMs: number, s: Resolved): Promise<any> {
    let backoff = 50;
    for (let tries = 0; ; tries++) {
      try {
        return await this.once(method, request, timeoutMs).promise;
      } catch (error) {
        if (!isTransient(error) || tries >= s.rpcRetries) throw error;
        await sleep(jitter(backoff));
        backoff = Math.min(backoff * 2, 2_000);
      }
    }
  }
}

function replay(completed: any): Done {
  return {
    response: { body: Buffer.from(completed.response), code: completed.response_code, contentType: completed.content_type },
    replayed: true,
    attempt: completed.attempt,
    reconciled: false,
  };
}

function previousOf(previous: any): PreviousAttempt {
  const endedAt = timestamp(previous.ended_at);
  return {
    attempt: previous.attempt,
    abortedBy: previous.aborted_by,
    abortReason: previous.abort_reason,
    outcomeUnknown: previous.outcome_unknown,
    ...(endedAt ? { endedAt } : {}),
  };
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** What was thrown, for the abort reason idemd keeps: a class name, never the text, which may carry payment details. */
function nameOf(error: unknown): string {
  const name = error instanceof Error ? String(error.name) : `a ${typeof error}`;
  return name.slice(0, 200).replace(/\0/g, " ");
}
