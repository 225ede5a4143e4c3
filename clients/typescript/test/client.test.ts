// The TypeScript helper against a real idemd (the binary scripts/test built).
import { test, before, after } from "node:test";
import * as assert from "node:assert/strict";
import { spawn } from "child_process";
import { randomUUID } from "crypto";
import {
  Attempt, Client, ClientOptions, Final, FingerprintMismatchError, InProgressError, OutcomeUnknown, OutcomeUnknownFailure,
  Response, Retryable, RetryableFailure,
} from "@idemd/client";
import { Idemd, NAMESPACE, startIdemd } from "./helpers";
import * as helpers from "./helpers";

let server: Idemd;
let target = "";

before(async () => {
  server = await startIdemd();
  target = server.address;
});

after(() => server.stop());

function client(options: ClientOptions = {}) {
  return new Client(target, NAMESPACE, { leaseTtlMs: 2000, waitMs: 2000, inProgressBudgetMs: 15_000, rpcRetries: 1, ...options });
}

const ok = (body: string): Response => ({ body: Buffer.from(body), code: 201, contentType: "text/plain" });
const key = () => `order-${randomUUID()}`;
/** The client module as this test process loaded it, for the crashing callers it spawns. */
const CLIENT_MODULE = require.resolve("@idemd/client");

test("first call runs and a repeat replays", async () => {
  const c = client();
  const k = key();
  let runs = 0;
  const charge = async (attempt: { downstreamKey: string }) => {
    runs++;
    return ok(attempt.downstreamKey);
  };
  const first = await c.runOnce(k, Buffer.from("fp"), charge);
  const again = await c.runOnce(k, Buffer.from("fp"), charge);
  assert.equal(first.replayed, false);
  assert.equal(again.replayed, true);
  assert.deepEqual(again.response.body, first.response.body);
  assert.ok(first.response.body.toString().startsWith("idk_"));
  assert.equal(runs, 1);
  await assert.rejects(c.runOnce(k, Buffer.from("other"), charge), FingerprintMismatchError);
  c.close();
});

test("concurrent duplicates run it once", async () => {
  const c = client();
  const k = key();
  let runs = 0;
  const results = await Promise.all(
    Array.from({ length: 8 }, () =>
      c.runOnce(k, Buffer.from("fp"), async () => {
        runs++;
        await new Promise((r) => setTimeout(r, 200));
        return ok("charged");
      }),
    ),
  );
  assert.equal(runs, 1);
  for (const result of results) assert.equal(result.response.body.toString(), "charged");
  c.close();
});

test("a retryable failure aborts and the retry runs again", async () => {
  const c = client();
  const k = key();
  const keys: string[] = [];
  await assert.rejects(
    c.runOnce(k, Buffer.from("fp"), async (attempt) => {
      keys.push(attempt.downstreamKey);
      throw new Retryable("provider 503");
    }),
    RetryableFailure,
  );
  const done = await c.runOnce(k, Buffer.from("fp"), async (attempt) => {
    keys.push(attempt.downstreamKey);
    return ok("charged");
  });
  assert.equal(done.replayed, false);
  assert.equal(done.attempt, 2);
  assert.equal(keys[0], keys[1]);
  c.close();
});

test("a final failure is stored and replayed", async () => {
  const c = client();
  const k = key();
  let runs = 0;
  const declined: Response = { body: Buffer.from('{"error":"card_declined"}'), code: 402, contentType: "application/json" };
  const decline = async (): Promise<Response> => {
    runs++;
    throw new Final(declined);
  };
  const first = await c.runOnce(k, Buffer.from("fp"), decline);
  const replay = await c.runOnce(k, Buffer.from("fp"), decline);
  assert.equal(first.replayed, false);
  assert.equal(replay.replayed, true);
  assert.equal(replay.response.code, 402);
  assert.equal(runs, 1);
  c.close();
});

test("a long operation keeps its lease through heartbeats", async () => {
  const c = client({ leaseTtlMs: 1000, inProgressBudgetMs: 300 });
  const k = key();
  let runs = 0;
  const holder = c.runOnce(k, Buffer.from("fp"), async () => {
    runs++;
    await new Promise((r) => setTimeout(r, 3000));
    return ok("slow charge");
  });
  for (let i = 0; i < 5; i++) {
    await new Promise((r) => setTimeout(r, 500));
    try {
      const duplicate = await c.runOnce(k, Buffer.from("fp"), async () => {
        runs++;
        return ok("duplicate");
      });
      assert.equal(duplicate.response.body.toString(), "slow charge");
    } catch (error) {
      assert.ok(error instanceof InProgressError, String(error));
    }
  }
  const done = await holder;
  assert.equal(done.response.body.toString(), "slow charge");
  assert.equal(runs, 1);
  c.close();
});

test("a crashed caller is recovered after its lease expires", async () => {
  const k = key();
  const script = `
    const { Client } = require(${JSON.stringify(CLIENT_MODULE)});
    const c = new Client(${JSON.stringify(target)}, ${JSON.stringify(NAMESPACE)}, { leaseTtlMs: 1000 });
    c.runOnce(${JSON.stringify(k)}, Buffer.from("fp"), async (attempt) => {
      console.log(attempt.downstreamKey);
      await new Promise(() => {});
    });`;
  const caller = spawn(process.execPath, ["-e", script], { stdio: ["ignore", "pipe", "inherit"] });
  const firstKey = await new Promise<string>((resolve) => caller.stdout!.once("data", (d) => resolve(String(d).trim())));
  assert.ok(firstKey.startsWith("idk_"));
  caller.kill("SIGKILL"); // no Complete, no Abort, no more heartbeats
  const c = client({ leaseTtlMs: 1000 });
  const seen: string[] = [];
  const done = await c.runOnce(k, Buffer.from("fp"), async (attempt) => {
    seen.push(attempt.downstreamKey);
    return ok("recovered");
  });
  assert.equal(done.replayed, false);
  assert.equal(done.attempt, 2);
  assert.deepEqual(seen, [firstKey]);
  c.close();
});

/** The raw Lookup RPC: what idemd stored for a key. */
const lookup = (k: string) => helpers.lookup(server, k);

/** Attempt 1 charges and its answer is lost; resolves to its Attempt. */
async function chargeThenTimeOut(c: Client, k: string): Promise<Attempt> {
  const seen: Attempt[] = [];
  await assert.rejects(
    c.runOnce(k, Buffer.from("fp"), async (attempt) => {
      seen.push(attempt);
      throw new OutcomeUnknown("provider timeout");
    }),
    (error: unknown) => error instanceof OutcomeUnknownFailure && error.cause instanceof OutcomeUnknown,
  );
  return seen[0];
}

/** A reconcile hook that records its calls and answers (or throws) `answer`. */
function hook(answer: Response | null | Error) {
  const calls: Attempt[] = [];
  const reconcile = async (attempt: Attempt) => {
    calls.push(attempt);
    if (answer instanceof Error) throw answer;
    return answer;
  };
  return { calls, reconcile };
}

test("an unknown outcome is recorded and handed to the next attempt", async () => {
  const c = client();
  const k = key();
  const first = await chargeThenTimeOut(c, k);
  assert.equal(first.previous, undefined);
  const record = await lookup(k);
  assert.equal(record.state, "STATE_ABORTED");
  assert.equal(record.outcome_unknown, true);
  assert.equal(record.aborted_by, "ABORTED_BY_CALLER");
  const seen: Attempt[] = [];
  const done = await c.runOnce(k, Buffer.from("fp"), async (attempt) => {
    seen.push(attempt);
    return ok("ch_1");
  });
  assert.deepEqual([done.attempt, done.replayed, done.reconciled], [2, false, false]);
  assert.equal(seen[0].downstreamKey, first.downstreamKey);
  const previous = seen[0].previous!;
  assert.deepEqual([previous.attempt, previous.abortedBy, previous.outcomeUnknown], [1, "ABORTED_BY_CALLER", true]);
  assert.equal(previous.abortReason, "outcome unknown");
  assert.ok(previous.endedAt instanceof Date && previous.endedAt.getTime() > 0);
  c.close();
});

test("after a retryable failure nothing is reconciled", async () => {
  const c = client();
  const k = key();
  const { calls, reconcile } = hook(ok("wrong"));
  const seen: Attempt[] = [];
  await assert.rejects(
    c.runOnce(k, Buffer.from("fp"), async (attempt) => {
      seen.push(attempt);
      throw new Retryable("provider 503");
    }, { reconcile }),
    RetryableFailure,
  );
  assert.equal((await lookup(k)).outcome_unknown, false);
  const done = await c.runOnce(k, Buffer.from("fp"), async (attempt) => {
    seen.push(attempt);
    return ok("ch_2");
  }, { reconcile });
  assert.deepEqual([done.attempt, done.response.body.toString(), done.reconciled], [2, "ch_2", false]);
  assert.equal(seen[0].previous, undefined);
  assert.equal(seen[1].previous!.outcomeUnknown, false);
  assert.equal(calls.length, 0, "the hook runs only after an unknown outcome");
  c.close();
});

test("a reconciled result is stored without running the operation", async () => {
  const c = client();
  const k = key();
  const first = await chargeThenTimeOut(c, k);
  const { calls, reconcile } = hook(ok("ch_3"));
  let runs = 0;
  const done = await c.runOnce(k, Buffer.from("fp"), async () => {
    runs++;
    return ok("second charge");
  }, { reconcile });
  assert.deepEqual([done.response.body.toString(), done.replayed, done.reconciled, done.attempt], ["ch_3", false, true, 2]);
  assert.equal(runs, 0);
  assert.equal(calls.length, 1);
  assert.equal(calls[0].downstreamKey, first.downstreamKey);
  assert.deepEqual([calls[0].previous!.attempt, calls[0].previous!.outcomeUnknown], [1, true]);
  const record = await lookup(k);
  assert.equal(record.state, "STATE_COMPLETED");
  assert.equal(Buffer.from(record.response).toString(), "ch_3");
  const replay = await c.runOnce(k, Buffer.from("fp"), async () => ok("again"));
  assert.equal(replay.replayed, true);
  assert.equal(replay.response.body.toString(), "ch_3");
  c.close();
});

test("a declined card found by the hook is stored", async () => {
  const c = client();
  const k = key();
  await chargeThenTimeOut(c, k);
  const declined: Response = { body: Buffer.from("card_declined"), code: 402, contentType: "text/plain" };
  const done = await c.runOnce(k, Buffer.from("fp"), async () => ok("second charge"), {
    reconcile: async () => {
      throw new Final(declined);
    },
  });
  assert.deepEqual([done.response.code, done.reconciled], [402, true]);
  c.close();
});

test("when the hook finds nothing the operation runs", async () => {
  const c = client();
  const k = key();
  await chargeThenTimeOut(c, k);
  const { calls, reconcile } = hook(null);
  const seen: Attempt[] = [];
  const done = await c.runOnce(k, Buffer.from("fp"), async (attempt) => {
    seen.push(attempt);
    return ok("ch_4");
  }, { reconcile });
  assert.deepEqual([done.response.body.toString(), done.reconciled, done.attempt], ["ch_4", false, 2]);
  assert.equal(calls.length, 1);
  assert.equal(seen[0].previous!.outcomeUnknown, true, "the operation sees it too");
  c.close();
});

test("a failed hook leaves the outcome unknown", async () => {
  const c = client();
  const k = key();
  await chargeThenTimeOut(c, k);
  const lookupDown = new Error("lookup 503");
  let runs = 0;
  await assert.rejects(
    c.runOnce(k, Buffer.from("fp"), async () => {
      runs++;
      return ok("second charge");
    }, { reconcile: hook(lookupDown).reconcile }),
    (error: unknown) => error instanceof OutcomeUnknownFailure && error.cause === lookupDown,
  );
  assert.equal(runs, 0, "no charge while the first one may exist");
  const record = await lookup(k);
  assert.deepEqual([record.state, record.attempt, record.outcome_unknown], ["STATE_ABORTED", 2, true]);
  const { calls, reconcile } = hook(ok("ch_5"));
  const done = await c.runOnce(k, Buffer.from("fp"), async () => ok("second charge"), { reconcile });
  assert.deepEqual([done.response.body.toString(), done.reconciled, done.attempt], ["ch_5", true, 3]);
  assert.deepEqual([calls[0].previous!.attempt, calls[0].previous!.outcomeUnknown], [2, true]);
  c.close();
});

test("a retryable failure keeps an unreconciled unknown outcome", async () => {
  const c = client();
  const k = key();
  await chargeThenTimeOut(c, k);
  const flaky = async (): Promise<Response> => {
    throw new Retryable("503");
  };
  // Without a hook nobody checked attempt 1: the record must keep saying so.
  await assert.rejects(c.runOnce(k, Buffer.from("fp"), flaky), OutcomeUnknownFailure);
  let record = await lookup(k);
  assert.deepEqual([record.attempt, record.outcome_unknown], [2, true]);
  // With a hook that found nothing, the retryable failure is just that.
  const { calls, reconcile } = hook(null);
  await assert.rejects(c.runOnce(k, Buffer.from("fp"), flaky, { reconcile }), RetryableFailure);
  record = await lookup(k);
  assert.deepEqual([calls.length, record.attempt, record.outcome_unknown], [1, 3, false]);
  c.close();
});

test("an expired lease is reconciled", async () => {
  const k = key();
  const script = `
    const { Client } = require(${JSON.stringify(CLIENT_MODULE)});
    const c = new Client(${JSON.stringify(target)}, ${JSON.stringify(NAMESPACE)}, { leaseTtlMs: 1000 });
    c.runOnce(${JSON.stringify(k)}, Buffer.from("fp"), async (attempt) => {
      console.log(attempt.downstreamKey);
      await new Promise(() => {});
    });`;
  const caller = spawn(process.execPath, ["-e", script], { stdio: ["ignore", "pipe", "inherit"] });
  await new Promise((resolve) => caller.stdout!.once("data", resolve));
  caller.kill("SIGKILL");
  const c = client({ leaseTtlMs: 1000 });
  const { calls, reconcile } = hook(ok("ch_7"));
  const done = await c.runOnce(k, Buffer.from("fp"), async () => ok("second charge"), { reconcile });
  assert.deepEqual([done.response.body.toString(), done.reconciled, done.attempt], ["ch_7", true, 2]);
  const previous = calls[0].previous!;
  assert.deepEqual([previous.abortedBy, previous.abortReason, previous.outcomeUnknown], ["ABORTED_BY_REAPER", "lease expired", true]);
  c.close();
});
