// Behaviours beyond the shared scenarios: the lease always ends, bodies are
// stored byte for byte, what cannot be stored is found before Complete, the
// errors say what happened, bad input fails before any call, and the knobs
// reach idemd.
import { after, before, test } from "node:test";
import * as assert from "node:assert/strict";
import { execFile } from "child_process";
import { existsSync } from "fs";
import * as path from "path";
import { promisify } from "util";
import * as grpc from "@grpc/grpc-js";
import {
  Client, ClientOptions, Final, FingerprintMismatchError, IdemdError, InProgressError, InvalidArgumentError, LeaseLostError,
  OutcomeUnknown, OutcomeUnknownFailure, Response, Retryable, RetryableFailure, RunOptions, UnavailableError, fingerprint,
  protoDir,
} from "@idemd/client";
import { Idemd, NAMESPACE, PACKAGE, client, gate, key, lookup, ok, rpcCounter, startIdemd } from "./helpers";

let server: Idemd;
before(async () => {
  server = await startIdemd();
});
after(() => server.stop());

const fp = fingerprint({ amount: "1000", currency: "EUR" });
const HOUR = 3_600_000;

async function rejection(promise: Promise<unknown>): Promise<any> {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  assert.fail("resolved; want a rejection");
}

/** The attempt ended at once (not left to the lease's expiry) and says its outcome is unknown. */
async function assertAbortedAsUnknown(k: string, attempt = 1): Promise<any> {
  const record = await lookup(server, k);
  assert.deepEqual([record.state, record.outcome_unknown, record.aborted_by, record.attempt], [
    "STATE_ABORTED", true, "ABORTED_BY_CALLER", attempt,
  ]);
  return record;
}

test("an unexpected throw never leaves the lease held and is rethrown as it was", async (t) => {
  const c = client(server, { leaseTtlMs: HOUR });
  const thrown: [string, () => never][] = [
    ["a bug", () => { throw new TypeError("Cannot read properties of undefined (reading 'amount')"); }],
    ["a value that is not an Error", () => { throw "card service said no"; }],
    ["a provider's own gRPC error", () => { throw Object.assign(new Error("14 UNAVAILABLE: provider"), { code: grpc.status.UNAVAILABLE, details: "provider" }); }],
  ];
  for (const [what, raise] of thrown) {
    await t.test(what, async () => {
      const k = key();
      let original: unknown;
      const error = await rejection(c.runOnce(k, fp, (): Response => {
        try {
          return raise();
        } catch (e) {
          original = e;
          throw e;
        }
      }));
      assert.equal(error, original, "the very value thrown");
      assert.ok(!(error instanceof IdemdError), "not wrapped, nor given idemd's code");
      const record = await assertAbortedAsUnknown(k);
      assert.match(record.abort_reason, /^the operation threw /);
      // The next call is not blocked by the hour-long lease, and knows.
      const seen: any[] = [];
      const done = await c.runOnce(k, fp, async (attempt) => {
        seen.push(attempt);
        return ok("{}");
      });
      assert.deepEqual([done.attempt, seen[0].previous.outcomeUnknown], [2, true]);
    });
  }
  c.close();
});

test("string and byte bodies are stored and replayed byte for byte", async () => {
  const c = client(server);
  const pooled = Buffer.from("xx-in-a-larger-buffer-xx");
  const bodies: [string | Uint8Array, Buffer][] = [
    // Valid base64: a string body must not be decoded as such.
    ["aGVsbG8=", Buffer.from("aGVsbG8=", "utf8")],
    ['{"charge":"ch_1","name":"Zoë 💳"}', Buffer.from('{"charge":"ch_1","name":"Zoë 💳"}', "utf8")],
    ["", Buffer.alloc(0)],
    [new Uint8Array([0, 255, 1, 128]), Buffer.from([0, 255, 1, 128])],
    [Buffer.from([7, 8, 9]), Buffer.from([7, 8, 9])],
    // A view into a larger buffer: only its own bytes.
    [pooled.subarray(3, 21), Buffer.from("in-a-larger-buffer")],
  ];
  for (const [body, bytes] of bodies) {
    for (const how of ["returned", "Final"] as const) {
      const k = key();
      const response: Response = { body, code: how === "Final" ? 402 : 201, contentType: "application/json" };
      const first = await c.runOnce(k, fp, async () => {
        if (how === "Final") throw new Final(response);
        return response;
      });
      const again = await c.runOnce(k, fp, async () => assert.fail("ran twice"));
      assert.ok(Buffer.isBuffer(first.response.body));
      assert.deepEqual(first.response.body, bytes, `${how} ${JSON.stringify(body)}`);
      assert.deepEqual(again.response, first.response);
      assert.deepEqual(Buffer.from((await lookup(server, k)).response), bytes);
    }
  }
  // The buffer given may be reused afterwards: what was stored stays.
  const reused = Buffer.from("first");
  const done = await c.runOnce(key(), fp, () => ({ body: reused, code: 201 }));
  reused.write("XXXXX");
  assert.equal(done.response.body.toString(), "first");
  assert.equal(done.response.contentType, "", "contentType defaults to empty");
  c.close();
});

test("a response that cannot be stored is aborted as outcome-unknown before Complete", async (t) => {
  const { counts, interceptor } = rpcCounter();
  const c = client(server, { leaseTtlMs: HOUR, interceptors: [interceptor] });
  const cases: [string, unknown, RegExp][] = [
    ["a number body", { body: 402, code: 402 }, /body must be a string \(stored as UTF-8\) or a Uint8Array\/Buffer, got a number/],
    ["an object body", { body: { error: "card_declined" }, code: 402 }, /body must be .*got an instance of Object/],
    ["a null body", { body: null, code: 201 }, /body must be .*got null/],
    ["an ArrayBuffer body", { body: new ArrayBuffer(4), code: 201 }, /got an instance of ArrayBuffer/],
    ["no response", undefined, /the operation's response must be an object \{ body, code, contentType\? \}, got undefined/],
    ["a string code", { body: "{}", code: "201" }, /code must be a 32-bit integer .*got "201"/],
    ["a fractional code", { body: "{}", code: 201.5 }, /code must be a 32-bit integer/],
    ["a code past 32 bits", { body: "{}", code: 2 ** 31 }, /code must be a 32-bit integer/],
    ["a control character in the content type", { body: "{}", code: 201, contentType: "application/json\n" }, /contentType "application\/json\\n": contains the control character U\+000A/],
    ["a content type that is not a string", { body: "{}", code: 201, contentType: 5 }, /contentType must be a string, got a number/],
  ];
  for (const [what, response, problem] of cases) {
    await t.test(what, async () => {
      const k = key();
      const before = counts.get("Complete") ?? 0;
      const error = await rejection(c.runOnce(k, fp, async () => response as Response));
      assert.ok(error instanceof TypeError, String(error));
      assert.match(error.message, problem);
      assert.match(error.message, /attempt 1 of key .* was aborted as outcome-unknown$/);
      assert.equal(counts.get("Complete") ?? 0, before, "no Complete was sent");
      await assertAbortedAsUnknown(k);
    });
  }
  await t.test("a Final whose body is not storable", async () => {
    const k = key();
    const error = await rejection(c.runOnce(k, fp, async () => {
      throw new Final({ body: { error: "card_declined" } as any, code: 402 });
    }));
    assert.ok(error instanceof TypeError);
    assert.match(error.message, /^new Final\(response\): body must be a string/);
    await assertAbortedAsUnknown(k);
  });
  await t.test("a reconcile hook's unstorable response", async () => {
    const k = key();
    await rejection(c.runOnce(k, fp, async () => {
      throw new OutcomeUnknown("timeout");
    }));
    const error = await rejection(c.runOnce(k, fp, async () => ok("{}"), { reconcile: async () => ({ body: 1, code: 201 }) as any }));
    assert.ok(error instanceof TypeError);
    assert.match(error.message, /^the reconcile hook's response: body must be/);
    await assertAbortedAsUnknown(k, 2);
  });
  c.close();
});

test("a response idemd refuses to store is an unknown outcome", async () => {
  const c = client(server, { leaseTtlMs: HOUR });
  const k = key();
  // Over idemd's default max_response_bytes (1 MiB).
  const error = await rejection(c.runOnce(k, fp, async () => ({ body: Buffer.alloc(1_100_000), code: 201 })));
  assert.ok(error instanceof OutcomeUnknownFailure, String(error));
  assert.deepEqual([error.code, error.reason, error.attempt], [grpc.status.INVALID_ARGUMENT, "INVALID_FIELD", 1]);
  assert.equal((error.cause as grpc.ServiceError).code, grpc.status.INVALID_ARGUMENT);
  await assertAbortedAsUnknown(k);
  c.close();
});

test("an operation may return synchronously", async () => {
  const c = client(server);
  const done = await c.runOnce(key(), fp, () => ok('{"charge":"sync"}'));
  assert.equal(done.response.body.toString(), '{"charge":"sync"}');
  c.close();
});

test("errors have their own names, messages and causes", async () => {
  const classes = [
    [IdemdError, "IdemdError"], [FingerprintMismatchError, "FingerprintMismatchError"], [InProgressError, "InProgressError"],
    [LeaseLostError, "LeaseLostError"], [RetryableFailure, "RetryableFailure"], [OutcomeUnknownFailure, "OutcomeUnknownFailure"],
    [InvalidArgumentError, "InvalidArgumentError"], [UnavailableError, "UnavailableError"],
  ] as const;
  const cause = new Error("the provider's error");
  for (const [ErrorClass, name] of classes) {
    const error = new ErrorClass("what happened", { cause, key: "order-1", attempt: 2, code: grpc.status.ABORTED, reason: "R" });
    assert.ok(error instanceof Error && error instanceof IdemdError);
    assert.equal(error.name, name);
    assert.equal(String(error), `${name}: what happened`);
    assert.ok(error.stack!.startsWith(`${name}: what happened\n`));
    assert.deepEqual([error.cause, error.key, error.attempt, error.code, error.reason], [cause, "order-1", 2, grpc.status.ABORTED, "R"]);
    assert.ok(!Object.keys(error).includes("name"), "name is the class's, not a field of each error");
  }
  assert.deepEqual(Object.keys(new IdemdError("x")), [], "no fields that were not given");
  for (const [Signal, name] of [[Retryable, "Retryable"], [OutcomeUnknown, "OutcomeUnknown"]] as const) {
    assert.equal(new Signal("provider 503").name, name);
    assert.deepEqual([new Signal("provider 503").message, new Signal("provider 503").cause], ["provider 503", undefined]);
    assert.deepEqual([new Signal(cause).message, new Signal(cause).cause], ["the provider's error", cause]);
    assert.deepEqual([new Signal("503", { cause }).message, new Signal("503", { cause }).cause], ["503", cause]);
  }
  const final = new Final({ body: "declined", code: 402 }, cause);
  assert.deepEqual([final.name, final.message, final.cause, final.response.body.toString()], ["Final", "final failure (response code 402)", cause, "declined"]);

  // Messages say what happened to which key, not just the key.
  const c = client(server);
  const k = key();
  await c.runOnce(k, fp, async () => ok("{}"));
  const mismatch = await rejection(c.runOnce(k, fingerprint({ amount: "9999" }), async () => ok("{}")));
  assert.equal(mismatch.message, `idemd: key "${k}" in namespace "${NAMESPACE}" was first used with a different request (fingerprint mismatch); nothing ran`);
  const retryable = await rejection(c.runOnce(key(), fp, async () => {
    throw new Retryable("provider answered 503");
  }));
  assert.match(retryable.message, /^idemd: the operation on key ".*" \(attempt 1\) failed and was aborted; a retry runs it again: provider answered 503$/);
  c.close();
});

test("invalid arguments are refused before any call", async () => {
  const bad: [string, string, ClientOptions?][] = [
    [server.address, ""],
    [server.address, "Payments"],
    [server.address, "a".repeat(65)],
    [server.address, "pay ments"],
    [server.address, 42 as any],
    [server.address, "payments", { leaseTtlMs: 0 }],
    [server.address, "payments", { leaseTtlMs: 2 * HOUR }],
    [server.address, "payments", { waitMs: 61_000 }],
    [server.address, "payments", { retentionMs: -HOUR }],
    [server.address, "payments", { rpcTimeoutMs: 0 }],
    [server.address, "payments", { rpcRetries: 1.5 }],
    [server.address, "payments", { inProgressBudgetMs: Number.NaN }],
    [server.address, "payments", { leaseTTL: 1000 } as any],
    [server.address, "payments", { token: "not a token" }],
    [server.address, "payments", { finalError: "402" as any }],
    ["", "payments"],
    ["idemd", "payments"],
    ["ftp://idemd:50051", "payments"],
    ["idemd:0", "payments"],
    ["idemd:65536", "payments"],
    ["http://idemd/x:50051", "payments"],
  ];
  for (const [address, namespace, options] of bad) {
    assert.throws(() => new Client(address, namespace, options), (error: unknown) => {
      assert.ok(error instanceof InvalidArgumentError, String(error));
      assert.match(error.message, /^idemd: /);
      assert.equal(error.key, undefined);
      return true;
    }, JSON.stringify([address, namespace, options]));
  }

  const { counts, interceptor } = rpcCounter();
  const c = client(server, { interceptors: [interceptor] });
  let runs = 0;
  const never = async () => {
    runs++;
    return ok("{}");
  };
  const calls: [unknown, unknown, unknown, RunOptions?][] = [
    ["", fp, never],
    ["k".repeat(256), fp, never],
    ["€".repeat(86), fp, never],
    ["order\0", fp, never],
    ["order\u0085", fp, never],
    ["order\uD800", fp, never],
    [42, fp, never],
    ["order", new Uint8Array(65), never],
    ["order", "a fingerprint", never],
    ["order", undefined, never],
    ["order", fp, "charge"],
    ["order", fp, never, { leaseTtlMs: 500 }],
    ["order", fp, never, { reconcile: "lookup" as any }],
    ["order", fp, never, { reconcle: async () => null } as any],
  ];
  for (const [k, fingerprint, operation, options] of calls) {
    const error = await rejection(c.runOnce(k as string, fingerprint as Uint8Array, operation as any, options));
    assert.ok(error instanceof InvalidArgumentError, `${JSON.stringify(k)}: ${error}`);
  }
  assert.equal(runs, 0);
  assert.equal([...counts.values()].reduce((a, b) => a + b, 0), 0, "no RPC for invalid arguments");
  // 255 bytes of key (85 three-byte characters) and 64 of fingerprint are allowed.
  await c.runOnce("€".repeat(85), new Uint8Array(64), async () => ok("{}"));
  c.close();
});

test("addresses with and without a scheme", async () => {
  for (const address of [server.address, `http://${server.address}`, `http://${server.address}/`, ` ${server.address} `]) {
    const c = new Client(address, NAMESPACE);
    const done = await c.runOnce(key(), fp, async () => ok("{}"));
    assert.equal(done.attempt, 1, address);
    c.close();
  }
  // https:// speaks TLS, which this idemd does not: unavailable, nothing ran.
  const tls = new Client(`https://${server.address.replace("127.0.0.1", "localhost")}`, NAMESPACE, { rpcRetries: 0 });
  assert.ok((await rejection(tls.runOnce(key(), fp, async () => assert.fail("ran")))) instanceof UnavailableError);
  tls.close();
});

test("retention and lease TTL reach idemd, a call's over the client's", async () => {
  const c = client(server, { retentionMs: 72 * HOUR });
  const k = key();
  let during: any;
  await c.runOnce(k, fp, async () => {
    during = await lookup(server, k);
    return ok("{}");
  }, { leaseTtlMs: 20_000 });
  const seconds = (t: any) => Number(t.seconds) + t.nanos / 1e9;
  // This call's 20 s overrides the client's 2 s.
  const lease = seconds(during.lease_expires_at) - seconds(during.created_at);
  assert.ok(lease > 19 && lease < 21, `lease of ${lease} s`);
  const record = await lookup(server, k);
  assert.equal(seconds(record.expires_at) - seconds(record.completed_at), 72 * 3600);

  // A retention outside the server's range is idemd's INVALID_ARGUMENT.
  const error = await rejection(c.runOnce(key(), fp, async () => assert.fail("ran with a refused retention"), { retentionMs: HOUR }));
  assert.ok(error instanceof InvalidArgumentError, String(error));
  assert.deepEqual([error.code, error.reason], [grpc.status.INVALID_ARGUMENT, "INVALID_FIELD"]);
  c.close();
});

test("the in-progress budget and the wait, per call", async () => {
  const k = key();
  const holding = gate();
  const finish = gate();
  const holder = client(server);
  const held = holder.runOnce(k, fp, async () => {
    holding.open();
    await finish.wait;
    return ok("{}");
  });
  await holding.wait;
  const { counts, interceptor } = rpcCounter();
  const waiter = client(server, { interceptors: [interceptor] });
  const start = Date.now();
  const error = await rejection(waiter.runOnce(k, fp, async () => assert.fail("ran while another attempt held the key"), {
    waitMs: 200,
    inProgressBudgetMs: 600,
  }));
  const elapsed = Date.now() - start;
  finish.open();
  await held;
  assert.ok(error instanceof InProgressError, String(error));
  assert.match(error.message, /^idemd: another attempt \(1\) still holds key .* after waiting 600 ms; nothing ran here$/);
  assert.ok(elapsed >= 600 && elapsed < 3_000, `gave up after ${elapsed} ms with a 600 ms budget`);
  assert.ok((counts.get("Begin") ?? 0) >= 2, "Begin waited 200 ms at a time, more than once");
  holder.close();
  waiter.close();
});

test("the package loads as an ES module and as CommonJS, with the same classes", async () => {
  const script = `
    import * as esm from "@idemd/client";
    import { createRequire } from "node:module";
    const cjs = createRequire(import.meta.url)("@idemd/client");
    const names = Object.keys(cjs).filter((name) => name !== "__esModule");
    const differ = names.filter((name) => esm[name] !== cjs[name]);
    if (names.length < 10 || differ.length > 0) throw new Error("not the same exports: " + differ);
    const client = new esm.Client(${JSON.stringify(server.address)}, ${JSON.stringify(NAMESPACE)});
    const done = await client.runOnce(${JSON.stringify(key("esm"))}, esm.fingerprint({ via: "esm" }), async () => ({ body: "esm", code: 200 }));
    client.close();
    console.log(done.response.body.toString());`;
  const { stdout } = await promisify(execFile)(process.execPath, ["--input-type=module", "-e", script], { cwd: PACKAGE });
  assert.equal(stdout.trim(), "esm");
  for (const file of ["idempotency.proto", "admin.proto"]) assert.ok(existsSync(path.join(protoDir, "idemd", "v1", file)), file);
});
