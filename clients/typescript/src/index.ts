/**
 * TypeScript client for idemd.
 *
 * `client.runOnce(key, fingerprint, operation)` runs `operation` at most once
 * per key and resolves to its response, or the stored response of the attempt
 * that ran it:
 * - Begin → completed: the stored response, nothing runs;
 * - acquired: `operation(attempt)` runs with `attempt.downstreamKey` (give it
 *   to the payment provider as its idempotency key) while the lease is
 *   heartbeated; its `Response` or a thrown `Final` (a deterministic failure
 *   such as a declined card) is stored with Complete and replayed to every
 *   retry; a thrown `Retryable` (nothing happened) aborts the lease so a retry
 *   runs it again; a thrown `OutcomeUnknown` (a timeout after the request
 *   left: it may have happened) aborts it with `outcome_unknown`, and the next
 *   attempt sees that in `attempt.previous`;
 * - in_progress: Begin waits server-side, then retries with backoff and
 *   jitter until the budget runs out.
 * RPCs are retried only on UNAVAILABLE and DEADLINE_EXCEEDED, a bounded number
 * of times, with the same attempt nonce.
 *
 * A provider that deduplicates on `downstreamKey` makes a retry after an
 * unknown outcome safe by itself. For one that does not, pass
 * `runOnce(key, fp, operation, { reconcile })`: the hook asks the provider
 * what it holds for the `downstreamKey` before the operation runs again.
 */
import { createHash, randomBytes } from "crypto";
import * as path from "path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import * as protobuf from "protobufjs";

const PROTO_DIR = path.join(__dirname, "..", "proto");

export interface Attempt {
  downstreamKey: string;
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

export interface Response {
  body: Buffer;
  code: number;
  contentType: string;
}

export interface Done {
  response: Response;
  replayed: boolean;
  attempt: number;
  /** True when the reconcile hook found an earlier attempt's result at the provider (now stored); nothing ran. */
  reconciled: boolean;
}

/**
 * Asks a provider that does not deduplicate on `downstreamKey` what it holds
 * for `attempt.downstreamKey`: its result (or a thrown `Final`), or
 * undefined/null when it holds nothing.
 */
export type Reconcile = (attempt: Attempt) => Promise<Response | undefined | null>;

export interface RunOptions {
  /**
   * Called before the operation when the previous attempt's outcome is
   * unknown (`attempt.previous.outcomeUnknown`). A result is stored with
   * Complete and returned with `reconciled: true`, and the operation does not
   * run; none runs the operation; a throw aborts the attempt with
   * `outcome_unknown` still set and rejects with `OutcomeUnknownFailure`.
   */
  reconcile?: Reconcile;
}

/** Throw from the operation for a deterministic failure: stored and replayed. */
export class Final extends Error {
  constructor(public readonly response: Response) {
    super(`final failure ${response.code}`);
  }
}

/** Throw from the operation when nothing happened (503, connection refused): the lease is aborted. */
export class Retryable extends Error {}

/**
 * Throw from the operation when it may or may not have happened (a timeout
 * after the request left): the lease is aborted with `outcome_unknown`, so the
 * next attempt's `previous` says so and its reconcile hook runs first.
 */
export class OutcomeUnknown extends Error {
  override name = "OutcomeUnknown";
}

/** The operation failed transiently and was aborted; retry later. */
export class RetryableFailure extends Error {}
/**
 * Aborted with its outcome unknown: the provider may have done it. Thrown for
 * `OutcomeUnknown`, for a reconcile hook that threw, and for a `Retryable`
 * that followed an outcome-unknown attempt nobody reconciled (the record keeps
 * saying outcome-unknown; this error always says what the record says).
 * Retrying is safe when the provider deduplicates on `downstreamKey` or a
 * reconcile hook looks it up first. `cause` is what was thrown.
 */
export class OutcomeUnknownFailure extends Error {
  override name = "OutcomeUnknownFailure";
}
/** Another attempt still holds the key after the in-progress budget. */
export class InProgressError extends Error {}
/** The key was first used with a different request. */
export class FingerprintMismatchError extends Error {}
/** The operation ran but its lease was lost before Complete; retry. */
export class LeaseLostError extends Error {}

export interface Options {
  leaseTtlMs?: number;
  waitMs?: number;
  inProgressBudgetMs?: number;
  rpcRetries?: number;
  rpcTimeoutMs?: number;
  token?: string;
}

const URL_NAMESPACE = Buffer.from("6ba7b8119dad11d180b400c04fd430c8", "hex");

function uuidV5(namespace: Buffer, name: string): Buffer {
  const hash = createHash("sha1").update(namespace).update(name, "utf8").digest().subarray(0, 16);
  hash[6] = (hash[6] & 0x0f) | 0x50;
  hash[8] = (hash[8] & 0x3f) | 0x80;
  return hash;
}

function formatUuid(bytes: Buffer): string {
  const hex = bytes.toString("hex");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

const KEY_NAMESPACE = uuidV5(URL_NAMESPACE, "urn:idemd:key");

/** A deterministic key for an operation on an entity (UUIDv5), the same in every client language. */
export function entityKey(entity: string, operation: string): string {
  return formatUuid(uuidV5(KEY_NAMESPACE, `${operation}\n${entity}`));
}

/** SHA-256 over the fields sorted by name, each name and value prefixed by its u32 big-endian length. */
export function fingerprint(fields: Record<string, Buffer | string>): Buffer {
  const hash = createHash("sha256");
  for (const name of Object.keys(fields).sort()) {
    const value = Buffer.from(fields[name]);
    const encodedName = Buffer.from(name, "utf8");
    const length = Buffer.alloc(4);
    length.writeUInt32BE(encodedName.length);
    hash.update(length).update(encodedName);
    length.writeUInt32BE(value.length);
    hash.update(length).update(value);
  }
  return hash.digest();
}

const rpcTypes = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: { nested: { Any: { fields: { type_url: { type: "string", id: 1 }, value: { type: "bytes", id: 2 } } } } },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: "int32", id: 1 },
                message: { type: "string", id: 2 },
                details: { rule: "repeated", type: "google.protobuf.Any", id: 3 },
              },
            },
            ErrorInfo: { fields: { reason: { type: "string", id: 1 }, domain: { type: "string", id: 2 } } },
          },
        },
      },
    },
  },
});

/** The `google.rpc.ErrorInfo` reason idemd attached to an error, if any. */
export function reasonOf(error: unknown): string | undefined {
  const metadata = (error as grpc.ServiceError | undefined)?.metadata;
  const raw = metadata?.get("grpc-status-details-bin")?.[0];
  if (!raw) return undefined;
  const status = rpcTypes.lookupType("google.rpc.Status").decode(Buffer.from(raw as Buffer)) as unknown as {
    details: { type_url: string; value: Uint8Array }[];
  };
  for (const detail of status.details) {
    if (detail.type_url.endsWith("google.rpc.ErrorInfo")) {
      return (rpcTypes.lookupType("google.rpc.ErrorInfo").decode(detail.value) as unknown as { reason: string }).reason;
    }
  }
  return undefined;
}

function duration(ms: number) {
  return { seconds: String(Math.floor(ms / 1000)), nanos: Math.round((ms % 1000) * 1e6) };
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const jitter = (ms: number) => ms * (0.5 + Math.random());

type Stub = grpc.Client & Record<string, (request: object, metadata: grpc.Metadata, options: grpc.CallOptions, callback: (error: grpc.ServiceError | null, response: any) => void) => void>;

export class Client {
  private readonly stub: Stub;
  private readonly options: Required<Omit<Options, "token">> & { token?: string };

  constructor(target: string, private readonly namespace: string, options: Options = {}, credentials = grpc.credentials.createInsecure()) {
    const definition = protoLoader.loadSync("idemd/v1/idempotency.proto", {
      includeDirs: [PROTO_DIR],
      keepCase: true,
      longs: String,
      enums: String,
      defaults: true,
      oneofs: true,
    });
    const loaded = grpc.loadPackageDefinition(definition) as any;
    this.stub = new loaded.idemd.v1.Idempotency(target, credentials) as Stub;
    this.options = {
      leaseTtlMs: 30_000,
      waitMs: 5_000,
      inProgressBudgetMs: 60_000,
      rpcRetries: 5,
      rpcTimeoutMs: 5_000,
      ...options,
    };
  }

  close(): void {
    this.stub.close();
  }

  private call(method: string, request: object, timeoutMs: number): Promise<any> {
    const metadata = new grpc.Metadata();
    if (this.options.token) metadata.set("authorization", `Bearer ${this.options.token}`);
    const once = () =>
      new Promise<any>((resolve, reject) => {
        this.stub[method](request, metadata, { deadline: new Date(Date.now() + timeoutMs) }, (error, response) =>
          error ? reject(error) : resolve(response),
        );
      });
    const attempt = async (tries: number, backoff: number): Promise<any> => {
      try {
        return await once();
      } catch (error) {
        const code = (error as grpc.ServiceError).code;
        const retryable = code === grpc.status.UNAVAILABLE || code === grpc.status.DEADLINE_EXCEEDED;
        if (!retryable || tries >= this.options.rpcRetries) throw error;
        await sleep(jitter(backoff));
        return attempt(tries + 1, Math.min(backoff * 2, 2_000));
      }
    };
    return attempt(0, 50);
  }

  private begin(key: string, fp: Buffer, nonce: string, waitMs: number): Promise<any> {
    return this.call(
      "Begin",
      {
        namespace: this.namespace,
        key,
        fingerprint: fp,
        lease_ttl: duration(this.options.leaseTtlMs),
        wait_timeout: duration(waitMs),
        attempt_nonce: nonce,
      },
      this.options.rpcTimeoutMs + waitMs,
    );
  }

  private async abort(key: string, token: string, reason: string, outcomeUnknown: boolean): Promise<void> {
    await this.call(
      "Abort",
      { namespace: this.namespace, key, lease_token: token, reason, outcome_unknown: outcomeUnknown },
      this.options.rpcTimeoutMs,
    ).catch(() => undefined); // LEASE_LOST or unreachable: the lease ends by itself, as outcome-unknown
  }

  /** The provider's result for an earlier attempt, or null; a throw is an OutcomeUnknownFailure (aborted). */
  private async reconcile(hook: Reconcile, attempt: Attempt, key: string, token: string): Promise<Response | null> {
    try {
      return (await hook(attempt)) ?? null;
    } catch (error) {
      if (error instanceof Final) return error.response;
      await this.abort(key, token, "reconcile failed", true);
      throw new OutcomeUnknownFailure(String(error), { cause: error });
    }
  }

  /** Runs the operation; a failure other than Final is aborted and thrown as the caller's error kind. */
  private async operate(
    operation: (attempt: Attempt) => Promise<Response>,
    attempt: Attempt,
    unresolved: boolean,
    key: string,
    token: string,
  ): Promise<Response> {
    try {
      return await operation(attempt);
    } catch (error) {
      if (error instanceof Final) return error.response;
      if (error instanceof Retryable && unresolved) {
        // Nothing happened here, but an unreconciled earlier attempt may
        // still have: keep the record saying so, or the attempt after this
        // one would skip its reconcile hook.
        await this.abort(key, token, "retryable failure; the previous outcome is unknown", true);
        throw new OutcomeUnknownFailure(error.message, { cause: error });
      }
      if (error instanceof Retryable) {
        await this.abort(key, token, "retryable failure", false);
        throw new RetryableFailure(error.message);
      }
      if (error instanceof OutcomeUnknown) {
        await this.abort(key, token, "outcome unknown", true);
        throw new OutcomeUnknownFailure(error.message, { cause: error });
      }
      throw error;
    }
  }

  async runOnce(
    key: string,
    fp: Buffer,
    operation: (attempt: Attempt) => Promise<Response>,
    options: RunOptions = {},
  ): Promise<Done> {
    const nonce = randomBytes(16).toString("hex");
    const giveUp = Date.now() + this.options.inProgressBudgetMs;
    let lease: any;
    for (;;) {
      let outcome: any;
      try {
        outcome = await this.begin(key, fp, nonce, Math.max(0, Math.min(this.options.waitMs, giveUp - Date.now())));
      } catch (error) {
        if (reasonOf(error) === "FINGERPRINT_MISMATCH") throw new FingerprintMismatchError(key);
        throw error;
      }
      if (outcome.outcome === "completed") return replay(outcome.completed);
      if (outcome.outcome === "acquired") {
        lease = outcome.acquired;
        break;
      }
      if (Date.now() >= giveUp) throw new InProgressError(key);
      const hint = outcome.in_progress.retry_after;
      await sleep(jitter(Number(hint?.seconds ?? 0) * 1000 + (hint?.nanos ?? 0) / 1e6 || 200));
    }

    const attempt: Attempt = { downstreamKey: lease.downstream_key, attempt: lease.attempt };
    if (lease.previous) attempt.previous = previousOf(lease.previous);
    // Whether attempt - 1 may have done it and nobody has checked.
    const unresolved = attempt.previous?.outcomeUnknown ?? false;
    const every = this.options.leaseTtlMs / 3;
    const heartbeat = setInterval(() => {
      this.call(
        "Heartbeat",
        { namespace: this.namespace, key, lease_token: lease.lease_token, lease_ttl: duration(this.options.leaseTtlMs) },
        Math.min(this.options.rpcTimeoutMs, every),
      ).catch(() => undefined); // a lost lease shows at Complete
    }, every);
    let response: Response;
    let reconciled: boolean;
    try {
      const hook = unresolved ? options.reconcile : undefined;
      const found = hook ? await this.reconcile(hook, attempt, key, lease.lease_token) : null;
      reconciled = found !== null;
      // A hook that found nothing settled the earlier attempt's outcome.
      response = found ?? (await this.operate(operation, attempt, unresolved && !hook, key, lease.lease_token));
    } finally {
      clearInterval(heartbeat);
    }
    try {
      await this.call(
        "Complete",
        {
          namespace: this.namespace,
          key,
          lease_token: lease.lease_token,
          response: response.body,
          response_code: response.code,
          content_type: response.contentType,
        },
        this.options.rpcTimeoutMs,
      );
    } catch (error) {
      if (reasonOf(error) !== "LEASE_LOST") throw error;
      const again = await this.begin(key, fp, nonce, this.options.waitMs);
      if (again.outcome === "completed") return replay(again.completed);
      throw new LeaseLostError(key);
    }
    return { response, replayed: false, attempt: lease.attempt, reconciled };
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
  const endedAt = previous.ended_at
    ? new Date(Number(previous.ended_at.seconds) * 1000 + Math.floor((previous.ended_at.nanos ?? 0) / 1e6))
    : undefined;
  return {
    attempt: previous.attempt,
    abortedBy: previous.aborted_by,
    abortReason: previous.abort_reason,
    outcomeUnknown: previous.outcome_unknown,
    ...(endedAt ? { endedAt } : {}),
  };
}
