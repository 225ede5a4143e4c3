// idemd's field rules (API.md), checked before any RPC so that a bad
// namespace, key or option fails where it is written rather than as a raw gRPC
// error at the first call, and a response that cannot be stored is found
// before Complete.
import { InvalidArgumentError } from "./errors";
import type { Response, Settings, StoredResponse } from "./types";

/** The knobs with their defaults filled in. */
export type Resolved = Required<Omit<Settings, "retentionMs" | "finalError">> & Pick<Settings, "retentionMs" | "finalError">;

export const DEFAULTS: Resolved = {
  leaseTtlMs: 30_000,
  waitMs: 5_000,
  inProgressBudgetMs: 60_000,
  rpcRetries: 5,
  rpcTimeoutMs: 5_000,
};

const SETTINGS = ["leaseTtlMs", "retentionMs", "waitMs", "inProgressBudgetMs", "rpcRetries", "rpcTimeoutMs", "finalError"];
export const CLIENT_OPTIONS = [...SETTINGS, "token", "credentials", "interceptors", "channelOptions"];
export const RUN_OPTIONS = [...SETTINGS, "reconcile"];

const quote = (value: unknown) => (typeof value === "string" ? JSON.stringify(value) : String(value));

/** A short description of a value of the wrong type, for error messages. */
export function describe(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  if (typeof value === "object") return `an instance of ${(value as object).constructor?.name ?? "Object"}`;
  return `${typeof value === "undefined" ? "" : "a "}${typeof value}`;
}

function invalid(message: string, key?: string): InvalidArgumentError {
  return new InvalidArgumentError(`idemd: ${message}`, key === undefined ? {} : { key });
}

export function checkNamespace(namespace: unknown): string {
  if (typeof namespace !== "string" || !/^[a-z0-9._-]{1,64}$/.test(namespace)) {
    throw invalid(`namespace ${quote(namespace)}: must be 1-64 characters of [a-z0-9._-]`);
  }
  return namespace;
}

const isControl = (c: number) => c <= 0x1f || (c >= 0x7f && c <= 0x9f);

/** Text idemd stores as UTF-8: at most `max` bytes, no control characters, no lone surrogate (it would be sent as U+FFFD, another value). */
function textProblem(value: string, max: number): string | undefined {
  if (!value.isWellFormed()) return "contains a lone surrogate (not UTF-8 text)";
  const bytes = Buffer.byteLength(value, "utf8");
  if (bytes > max) return `${bytes} bytes, at most ${max}`;
  for (const char of value) {
    const c = char.codePointAt(0)!;
    if (isControl(c)) return `contains the control character U+${c.toString(16).toUpperCase().padStart(4, "0")}`;
  }
  return undefined;
}

export function checkKey(key: unknown): string {
  if (typeof key !== "string" || key === "") throw invalid(`key ${quote(key)}: must be a non-empty string`);
  const problem = textProblem(key, 255);
  if (problem) throw invalid(`key ${quote(key)}: ${problem}`, key);
  return key;
}

export function checkFingerprint(fingerprint: unknown, key: string): Uint8Array {
  if (!(fingerprint instanceof Uint8Array)) {
    throw invalid(`fingerprint: must be a Uint8Array or Buffer (e.g. fingerprint({...})), got ${describe(fingerprint)}`, key);
  }
  if (fingerprint.byteLength > 64) {
    throw invalid(`fingerprint: ${fingerprint.byteLength} bytes, at most 64 (use fingerprint({...}), a SHA-256)`, key);
  }
  return fingerprint;
}

export function checkFunction(name: string, value: unknown, key?: string): void {
  if (typeof value !== "function") throw invalid(`${name} must be a function, got ${describe(value)}`, key);
}

/** An options object: no names it does not know (a misspelt option would otherwise be ignored). */
export function checkOptions(what: string, options: unknown, known: string[]): Record<string, unknown> {
  if (options === undefined) return {};
  if (options === null || typeof options !== "object") throw invalid(`${what} must be an object, got ${describe(options)}`);
  const unknown = Object.keys(options).filter((name) => !known.includes(name));
  if (unknown.length > 0) throw invalid(`${what}: unknown option ${unknown.join(", ")} (known: ${known.join(", ")})`);
  return options as Record<string, unknown>;
}

/** `base` with the settings of `options` that are not undefined, checked. */
export function resolve(base: Resolved, options: Settings, key?: string): Resolved {
  const merged: Resolved = { ...base };
  for (const name of SETTINGS) {
    const value = (options as Record<string, unknown>)[name];
    if (value !== undefined) (merged as Record<string, unknown>)[name] = value;
  }
  const number = (name: string, value: number, ok: boolean, rule: string) => {
    if (typeof value !== "number" || !Number.isFinite(value) || !ok) throw invalid(`${name} ${quote(value)}: ${rule}`, key);
  };
  number("leaseTtlMs", merged.leaseTtlMs, merged.leaseTtlMs >= 1_000 && merged.leaseTtlMs <= 3_600_000, "must be 1000 to 3600000 (1 s to 1 h)");
  if (merged.retentionMs !== undefined) {
    number("retentionMs", merged.retentionMs, merged.retentionMs > 0, "must be positive (unset: the server's default)");
  }
  number("waitMs", merged.waitMs, merged.waitMs >= 0 && merged.waitMs <= 60_000, "must be 0 to 60000 (60 s)");
  number("inProgressBudgetMs", merged.inProgressBudgetMs, merged.inProgressBudgetMs >= 0, "must not be negative");
  number("rpcRetries", merged.rpcRetries, Number.isInteger(merged.rpcRetries) && merged.rpcRetries >= 0, "must be an integer, 0 or more");
  number("rpcTimeoutMs", merged.rpcTimeoutMs, merged.rpcTimeoutMs > 0, "must be positive");
  if (merged.finalError !== undefined) checkFunction("finalError", merged.finalError, key);
  return merged;
}

/** `host:port`, `http://host:port` (plain text) or `https://host:port` (TLS): the gRPC target and whether to use TLS. */
export function parseAddress(address: unknown): { target: string; tls: boolean } {
  const wanted = `address ${quote(address)}: want host:port, http://host:port or https://host:port`;
  if (typeof address !== "string") throw invalid(wanted);
  let target = address.trim();
  let tls = false;
  if (target.startsWith("http://")) {
    target = target.slice("http://".length);
  } else if (target.startsWith("https://")) {
    target = target.slice("https://".length);
    tls = true;
  }
  if (target.endsWith("/")) target = target.slice(0, -1);
  const match = /^(\[[0-9A-Fa-f:.]+\]|[^\s/:@[\]]+):([0-9]{1,5})$/.exec(target);
  if (!match || Number(match[2]) < 1 || Number(match[2]) > 65_535) throw invalid(wanted);
  return { target, tls };
}

export function checkToken(token: unknown): string | undefined {
  if (token === undefined) return undefined;
  if (typeof token !== "string" || !/^[\x21-\x7e]+$/.test(token)) throw invalid("token must be non-empty printable ASCII");
  return token;
}

/**
 * The response as idemd will store it, or a TypeError saying why it cannot
 * be stored. `what` names where it came from ("the operation's response").
 */
export function storable(response: unknown, what: string): StoredResponse {
  if (response === null || typeof response !== "object") {
    throw new TypeError(`${what} must be an object { body, code, contentType? }, got ${describe(response)}`);
  }
  const { body, code, contentType = "" } = response as Response;
  let bytes: Buffer;
  if (typeof body === "string") {
    bytes = Buffer.from(body, "utf8");
  } else if (body instanceof Uint8Array) {
    // A copy: what was stored does not change when the caller reuses its buffer.
    bytes = Buffer.from(body);
  } else {
    throw new TypeError(`${what}: body must be a string (stored as UTF-8) or a Uint8Array/Buffer, got ${describe(body)}`);
  }
  if (typeof code !== "number" || !Number.isInteger(code) || code < -(2 ** 31) || code >= 2 ** 31) {
    throw new TypeError(`${what}: code must be a 32-bit integer (e.g. an HTTP status), got ${quote(code)}`);
  }
  if (typeof contentType !== "string") {
    throw new TypeError(`${what}: contentType must be a string, got ${describe(contentType)}`);
  }
  const problem = textProblem(contentType, 255);
  if (problem) throw new TypeError(`${what}: contentType ${quote(contentType)}: ${problem}`);
  return { body: bytes, code, contentType };
}
