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
 *   retry; a thrown `Retryable` aborts the lease so a retry runs it again;
 * - in_progress: Begin waits server-side, then retries with backoff and
 *   jitter until the budget runs out.
 * RPCs are retried only on UNAVAILABLE and DEADLINE_EXCEEDED, a bounded number
 * of times, with the same attempt nonce.
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
}

/** Throw from the operation for a deterministic failure: stored and replayed. */
export class Final extends Error {
  constructor(public readonly response: Response) {
    super(`final failure ${response.code}`);
  }
}

/** Throw from the operation for a transient failure: the lease is aborted. */
export class Retryable extends Error {}

/** The operation failed transiently and was aborted; retry later. */
export class RetryableFailure extends Error {}
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

  async runOnce(key: string, fp: Buffer, operation: (attempt: Attempt) => Promise<Response>): Promise<Done> {
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

    const every = this.options.leaseTtlMs / 3;
    const heartbeat = setInterval(() => {
      this.call(
        "Heartbeat",
        { namespace: this.namespace, key, lease_token: lease.lease_token, lease_ttl: duration(this.options.leaseTtlMs) },
        Math.min(this.options.rpcTimeoutMs, every),
      ).catch(() => undefined); // a lost lease shows at Complete
    }, every);
    let response: Response;
    try {
      response = await operation({ downstreamKey: lease.downstream_key, attempt: lease.attempt });
    } catch (error) {
      if (error instanceof Final) {
        response = error.response;
      } else if (error instanceof Retryable) {
        clearInterval(heartbeat);
        await this.call(
          "Abort",
          { namespace: this.namespace, key, lease_token: lease.lease_token, reason: "retryable failure" },
          this.options.rpcTimeoutMs,
        ).catch(() => undefined); // LEASE_LOST or unreachable: the lease ends by itself
        throw new RetryableFailure(error.message);
      } else {
        clearInterval(heartbeat);
        throw error;
      }
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
    return { response, replayed: false, attempt: lease.attempt };
  }
}

function replay(completed: any): Done {
  return {
    response: { body: Buffer.from(completed.response), code: completed.response_code, contentType: completed.content_type },
    replayed: true,
    attempt: completed.attempt,
  };
}
