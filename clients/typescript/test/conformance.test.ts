// One test per scenario of clients/testdata/conformance.json, titled with its
// id, against a real idemd; the last test keeps the list and the tests in step.
import { after, before, test } from "node:test";
import * as assert from "node:assert/strict";
import { createHash } from "crypto";
import { readFileSync } from "fs";
import { createServer } from "net";
import * as grpc from "@grpc/grpc-js";
import {
  Attempt, Client, Final, FingerprintMismatchError, IdemdError, InProgressError, InvalidArgumentError, LeaseLostError,
  OutcomeUnknown, OutcomeUnknownFailure, Retryable, RetryableFailure, UnavailableError, entityKey, fingerprint,
} from "@idemd/client";
import { Idemd, NAMESPACE, client, delay, gate, key, lookup, ok, release, rpcCounter, startIdemd, testdata } from "./helpers";

let server: Idemd;
before(async () => {
  server = await startIdemd();
});
after(() => server.stop());

const fp = (amount: string) => fingerprint({ amount, currency: "EUR" });

const KINDS = [
  FingerprintMismatchError, InProgressError, LeaseLostError, RetryableFailure, OutcomeUnknownFailure, InvalidArgumentError,
  UnavailableError,
];

/** `error` is an IdemdError of class `kind` and of no other kind. */
function assertOnlyKind(error: unknown, kind: (typeof KINDS)[number]): asserts error is IdemdError {
  assert.ok(error instanceof IdemdError, `want an IdemdError, got ${error}`);
  for (const other of KINDS) assert.equal(error instanceof other, other === kind, `${error.name}: ${error.message} (checking ${other.name})`);
  assert.equal(error.name, kind.name);
}

/** The rejection of `promise` (which must reject). */
async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  assert.fail("resolved; want a rejection");
}

test("first_run_stores_and_replays", async () => {
  const c = client(server);
  const k = key();
  const runs: Attempt[] = [];
  const charge = async (attempt: Attempt) => {
    runs.push(attempt);
    return ok('{"charge":"ch_1"}');
  };
  const first = await c.runOnce(k, fp("1000"), charge);
  assert.deepEqual([first.replayed, first.reconciled, first.attempt, first.response.body.toString()], [false, false, 1, '{"charge":"ch_1"}']);
  assert.equal(runs[0].attempt, 1);
  assert.equal(runs[0].previous, undefined);
  assert.match(runs[0].downstreamKey, /^idk_[0-9a-f]{32}$/);
  const second = await c.runOnce(k, fp("1000"), charge);
  assert.deepEqual([second.replayed, second.attempt], [true, 1]);
  assert.deepEqual(second.response, first.response);
  assert.equal(second.response.contentType, "application/json");
  assert.equal(second.response.code, 201);
  assert.equal(runs.length, 1);
  const record = await lookup(server, k);
  assert.equal(record.state, "STATE_COMPLETED");
  assert.equal(record.downstream_key, runs[0].downstreamKey);
  c.close();
});

test("concurrent_duplicate_waits_for_the_stored_response", async () => {
  const k = key();
  let runs = 0;
  const started = gate();
  const finish = gate();
  const charge = async () => {
    runs++;
    started.open();
    await finish.wait;
    return ok('{"charge":"ch_dup"}');
  };
  const first = client(server);
  const holder = first.runOnce(k, fp("1000"), charge);
  await started.wait;
  // A wait longer than the holder takes: one Begin waits server-side and is
  // woken by the holder's Complete.
  const { counts, interceptor } = rpcCounter();
  const second = client(server, { waitMs: 10_000, interceptors: [interceptor] });
  const waiter = second.runOnce(k, fp("1000"), charge);
  await delay(300);
  finish.open();
  const [held, waited] = await Promise.all([holder, waiter]);
  assert.equal(held.replayed, false);
  assert.equal(waited.replayed, true);
  assert.equal(waited.response.body.toString(), '{"charge":"ch_dup"}');
  assert.equal(runs, 1);
  assert.equal(counts.get("Begin"), 1, "the duplicate waited in one Begin");
  first.close();
  second.close();
});

/** The caller's own error type for a decline, as a payment SDK would have it. */
class CardDeclined extends Error {
  constructor(readonly body: string) {
    super(`card declined: ${body}`);
  }
}

test("final_failure_is_stored_and_replayed", async () => {
  const c = client(server);
  const k = key();
  let runs = 0;
  const declined = { body: '{"error":"card_declined"}', code: 402, contentType: "application/json" };
  const decline = async () => {
    runs++;
    throw new Final(declined);
  };
  const first = await c.runOnce(k, fp("1000"), decline);
  assert.deepEqual([first.replayed, first.response.code, first.response.body.toString()], [false, 402, declined.body]);
  const record = await lookup(server, k);
  assert.deepEqual([record.state, record.response_code], ["STATE_COMPLETED", 402]);
  // Every later run gets the same final failure, as the caller's own error
  // type when asked for it.
  const finalError = (response: { code: number; body: Buffer }) => (response.code === 402 ? new CardDeclined(response.body.toString()) : undefined);
  for (let i = 0; i < 2; i++) {
    const error = await rejection(c.runOnce(k, fp("1000"), decline, { finalError }));
    assert.ok(error instanceof CardDeclined, String(error));
    assert.equal(error.body, declined.body);
    const again = await c.runOnce(k, fp("1000"), decline);
    assert.deepEqual([again.replayed, again.response.code, again.attempt, again.response.body.toString()], [true, 402, 1, declined.body]);
  }
  assert.equal(runs, 1);
  c.close();
});

test("retryable_failure_is_aborted_and_rerun", async () => {
  const c = client(server);
  const k = key();
  const runs: Attempt[] = [];
  const unavailable = new Error("provider answered 503");
  const error = await rejection(
    c.runOnce(k, fp("1000"), async (attempt) => {
      runs.push(attempt);
      throw new Retryable(unavailable);
    }),
  );
  assertOnlyKind(error, RetryableFailure);
  assert.ok(error.cause instanceof Retryable && error.cause.cause === unavailable, "the cause is kept");
  assert.deepEqual([error.key, error.attempt, error.namespace], [k, 1, NAMESPACE]);
  assert.match(error.message, /provider answered 503/);
  const record = await lookup(server, k);
  assert.deepEqual([record.state, record.outcome_unknown, record.aborted_by], ["STATE_ABORTED", false, "ABORTED_BY_CALLER"]);
  const done = await c.runOnce(k, fp("1000"), async (attempt) => {
    runs.push(attempt);
    return ok('{"charge":"ch_2"}');
  });
  assert.deepEqual([done.attempt, done.replayed], [2, false]);
  assert.equal(runs[1].attempt, 2);
  assert.deepEqual([runs[1].previous?.attempt, runs[1].previous?.outcomeUnknown], [1, false]);
  assert.equal(runs[1].downstreamKey, runs[0].downstreamKey);
  c.close();
});

test("unknown_outcome_is_aborted_as_unknown", async () => {
  const c = client(server);
  const k = key();
  const runs: Attempt[] = [];
  const timeout = new Error("provider did not answer within 10 s");
  const error = await rejection(
    c.runOnce(k, fp("1000"), async (attempt) => {
      runs.push(attempt);
      throw new OutcomeUnknown(timeout);
    }),
  );
  assertOnlyKind(error, OutcomeUnknownFailure);
  assert.ok(error.cause instanceof OutcomeUnknown && error.cause.cause === timeout, "the cause is kept");
  const record = await lookup(server, k);
  assert.deepEqual([record.state, record.outcome_unknown], ["STATE_ABORTED", true]);
  await c.runOnce(k, fp("1000"), async (attempt) => {
    runs.push(attempt);
    return ok("{}");
  });
  const previous = runs[1].previous!;
  assert.deepEqual([previous.outcomeUnknown, previous.attempt, previous.abortedBy], [true, 1, "ABORTED_BY_CALLER"]);
  assert.ok(previous.endedAt instanceof Date && previous.endedAt.getTime() > 0);
  c.close();
});

test("reconcile_hook_completes_without_running", async (t) => {
  const c = client(server);
  /** Attempt 1 of a key times out at the provider (which charged). */
  const unknownFirst = async (k: string, reconcile: (attempt: Attempt) => Promise<any>) => {
    assertOnlyKind(
      await rejection(c.runOnce(k, fp("1000"), async () => {
        throw new OutcomeUnknown("timeout after sending");
      }, { reconcile })),
      OutcomeUnknownFailure,
    );
  };

  await t.test("found", async () => {
    const k = key();
    const asked: Attempt[] = [];
    let runs = 0;
    const reconcile = async (attempt: Attempt) => {
      asked.push(attempt);
      return ok('{"charge":"ch_found"}');
    };
    await unknownFirst(k, reconcile);
    assert.equal(asked.length, 0, "the hook ran on attempt 1");
    const charge = async () => {
      runs++;
      return ok('{"charge":"ch_second"}');
    };
    const done = await c.runOnce(k, fp("1000"), charge, { reconcile });
    assert.deepEqual([done.reconciled, done.replayed, done.attempt, done.response.body.toString()], [true, false, 2, '{"charge":"ch_found"}']);
    assert.deepEqual([runs, asked.length, asked[0].previous?.outcomeUnknown], [0, 1, true]);
    const replayed = await c.runOnce(k, fp("1000"), charge, { reconcile });
    assert.deepEqual([replayed.replayed, replayed.response.body.toString(), runs], [true, '{"charge":"ch_found"}', 0]);
  });

  await t.test("none", async () => {
    const k = key();
    let asked = 0;
    let runs = 0;
    const reconcile = async () => {
      asked++;
      return null;
    };
    await unknownFirst(k, reconcile);
    const done = await c.runOnce(k, fp("1000"), async () => {
      runs++;
      return ok('{"charge":"ch_ran"}');
    }, { reconcile });
    assert.deepEqual([done.reconciled, done.attempt, runs, asked], [false, 2, 1, 1]);
  });

  await t.test("hook fails", async () => {
    const k = key();
    let runs = 0;
    const providerDown = new Error("provider search unavailable");
    const reconcile = async () => {
      throw providerDown;
    };
    await unknownFirst(k, reconcile);
    const error = await rejection(c.runOnce(k, fp("1000"), async () => {
      runs++;
      return ok("{}");
    }, { reconcile }));
    assertOnlyKind(error, OutcomeUnknownFailure);
    assert.equal(error.cause, providerDown);
    assert.equal(runs, 0);
    // The question is still open for the next attempt.
    const record = await lookup(server, k);
    assert.deepEqual([record.state, record.outcome_unknown, record.attempt], ["STATE_ABORTED", true, 2]);
  });
  c.close();
});

test("lost_begin_reply_retried_with_the_same_nonce_gets_the_same_lease", async () => {
  const begins: { nonce: string; token: string; attempt: number }[] = [];
  // The first Begin reaches idemd, which acquires; its reply is then
  // dropped, as a broken connection would.
  const loseFirstReply: grpc.Interceptor = (options, next) => {
    if (!options.method_definition.path.endsWith("/Begin")) return new grpc.InterceptingCall(next(options));
    let request: any;
    let dropped = false;
    return new grpc.InterceptingCall(next(options), {
      sendMessage(message, nextMessage) {
        request = message;
        nextMessage(message);
      },
      start(metadata, _listener, nextStart) {
        nextStart(metadata, {
          onReceiveMessage(reply: any, nextReply) {
            begins.push({ nonce: request.attempt_nonce, token: reply.acquired?.lease_token, attempt: reply.acquired?.attempt });
            dropped = begins.length === 1;
            // Passed on (grpc-js holds the status back until it is), then
            // failed by the status below: the caller never sees it.
            nextReply(reply);
          },
          onReceiveStatus(status, nextStatus) {
            nextStatus(dropped ? { code: grpc.status.UNAVAILABLE, details: "reply lost on the way back", metadata: new grpc.Metadata() } : status);
          },
        });
      },
    });
  };
  const c = client(server, { interceptors: [loseFirstReply] });
  const k = key();
  let runs = 0;
  const done = await c.runOnce(k, fp("1000"), async () => {
    runs++;
    return ok('{"charge":"ch_nonce"}');
  });
  assert.equal(begins.length, 2, "the lost Begin and its retry");
  const [lost, retried] = begins;
  assert.match(lost.nonce, /^[0-9a-f]{32}$/);
  assert.equal(retried.nonce, lost.nonce);
  assert.ok(lost.token);
  assert.equal(retried.token, lost.token);
  assert.deepEqual([lost.attempt, retried.attempt, done.attempt, runs], [1, 1, 1, 1]);
  // The retried Begin's lease completed: no orphan lease, no attempt 2.
  const record = await lookup(server, k);
  assert.deepEqual([record.state, record.attempt], ["STATE_COMPLETED", 1]);
  c.close();
});

test("heartbeats_keep_a_long_operation_alive", async () => {
  const { counts, interceptor } = rpcCounter();
  const c = client(server, { leaseTtlMs: 1_000, interceptors: [interceptor] });
  const k = key();
  let midway: any;
  let midwayAt = 0;
  let busy: unknown;
  const done = await c.runOnce(k, fp("1000"), async () => {
    await delay(1_800);
    // Past the 1 s TTL (and the 100 ms reaper) the lease is still ours.
    midwayAt = Date.now();
    midway = await lookup(server, k);
    const intruder = client(server, { waitMs: 0, inProgressBudgetMs: 0 });
    busy = await rejection(intruder.runOnce(k, fp("1000"), async () => ok('{"charge":"ch_intruder"}')));
    intruder.close();
    await delay(700);
    return ok('{"charge":"ch_long"}');
  });
  const beats = counts.get("Heartbeat") ?? 0;
  assert.deepEqual([midway.state, midway.attempt], ["STATE_IN_PROGRESS", 1]);
  assert.ok(Number(midway.lease_expires_at.seconds) * 1000 + midway.lease_expires_at.nanos / 1e6 > midwayAt, "the lease was live midway");
  assertOnlyKind(busy, InProgressError);
  assert.deepEqual([done.attempt, done.replayed, done.response.body.toString()], [1, false, '{"charge":"ch_long"}']);
  const record = await lookup(server, k);
  assert.deepEqual([record.state, record.attempt], ["STATE_COMPLETED", 1]);
  // The heartbeats ended with the call.
  await delay(1_000);
  assert.ok(beats >= 2, `${beats} heartbeats`);
  assert.equal(counts.get("Heartbeat") ?? 0, beats, "a heartbeat after runOnce returned");
  c.close();
});

test("lease_lost_begins_again", async (t) => {
  await t.test("replays the winner's result", async () => {
    const k = key();
    let runs = 0;
    const taken = gate();
    const finish = gate();
    const loser = client(server);
    const losing = loser.runOnce(k, fp("1000"), async () => {
      runs++;
      taken.open();
      await finish.wait;
      return ok('{"charge":"ch_loser"}');
    });
    await taken.wait;
    await release(server, k, 1);
    const winner = client(server);
    const won = await winner.runOnce(k, fp("1000"), async () => ok('{"charge":"ch_winner"}'));
    assert.equal(won.attempt, 2);
    finish.open();
    const done = await losing;
    assert.deepEqual([done.replayed, done.response.body.toString(), done.attempt, runs], [true, '{"charge":"ch_winner"}', 2, 1]);
    loser.close();
    winner.close();
  });

  await t.test("stores the response it has under a new attempt", async () => {
    // Nobody else stored a result: Begin hands this call the record again
    // (attempt 2), and the response it already has is stored there without
    // running the operation again.
    const k = key();
    let runs = 0;
    const c = client(server);
    const done = await c.runOnce(k, fp("1000"), async (attempt) => {
      runs++;
      await release(server, k, attempt.attempt);
      return ok('{"charge":"ch_mine"}');
    });
    assert.deepEqual([done.attempt, done.replayed, done.response.body.toString(), runs], [2, false, '{"charge":"ch_mine"}', 1]);
    const record = await lookup(server, k);
    assert.deepEqual([record.state, record.attempt, Buffer.from(record.response).toString()], ["STATE_COMPLETED", 2, '{"charge":"ch_mine"}']);
    c.close();
  });

  await t.test("gives up when it keeps losing", async () => {
    // Every Complete finds its lease released just before it arrives.
    const k = key();
    let runs = 0;
    const releaseFirst: grpc.Interceptor = (options, next) => {
      if (!options.method_definition.path.endsWith("/Complete")) return new grpc.InterceptingCall(next(options));
      return new grpc.InterceptingCall(next(options), {
        start(metadata, listener, start) {
          lookup(server, k)
            .then((record) => release(server, k, record.attempt))
            .then(() => start(metadata, listener), (problem) => listener.onReceiveStatus?.({ code: grpc.status.INTERNAL, details: String(problem), metadata }));
        },
      });
    };
    const { counts, interceptor } = rpcCounter();
    const c = client(server, { interceptors: [interceptor, releaseFirst] });
    const error = await rejection(
      c.runOnce(k, fp("1000"), async () => {
        runs++;
        return ok("{}");
      }),
    );
    assertOnlyKind(error, LeaseLostError);
    assert.deepEqual(
      [error.reason, error.code, error.attempt, runs, counts.get("Begin")],
      ["LEASE_LOST", grpc.status.FAILED_PRECONDITION, 3, 1, 3],
    );
    c.close();
  });
});

test("fingerprint_mismatch_is_its_own_error", async () => {
  const c = client(server);
  const k = key();
  let runs = 0;
  const charge = async () => {
    runs++;
    return ok("{}");
  };
  await c.runOnce(k, fp("1000"), charge);
  const error = await rejection(c.runOnce(k, fp("9999"), charge));
  assertOnlyKind(error, FingerprintMismatchError);
  assert.deepEqual([error.reason, error.code, error.key, (error.cause as grpc.ServiceError).code], [
    "FINGERPRINT_MISMATCH", grpc.status.FAILED_PRECONDITION, k, grpc.status.FAILED_PRECONDITION,
  ]);
  assert.ok(error.message.includes(k), error.message);
  assert.equal(runs, 1);
  c.close();
});

/** A loopback address nothing listens on. */
const freeAddress = () =>
  new Promise<string>((resolve) => {
    const probe = createServer().listen(0, "127.0.0.1", () => {
      const { port } = probe.address() as { port: number };
      probe.close(() => resolve(`127.0.0.1:${port}`));
    });
  });

test("unavailable_is_retried_then_surfaced", async (t) => {
  const expectUnavailable = async (address: string) => {
    const { counts, interceptor } = rpcCounter();
    const c = new Client(address, NAMESPACE, { rpcRetries: 3, rpcTimeoutMs: 2_000, interceptors: [interceptor] });
    let runs = 0;
    const error = await rejection(c.runOnce(key(), fp("1000"), async () => {
      runs++;
      return ok("{}");
    }));
    c.close();
    assertOnlyKind(error, UnavailableError);
    assert.equal(error.code, grpc.status.UNAVAILABLE);
    assert.equal(error.attempt, undefined);
    assert.deepEqual([counts.get("Begin"), runs], [4, 0], "1 Begin + 3 retries, and nothing ran");
  };

  await t.test("unreachable address", async () => {
    await expectUnavailable(`http://${await freeAddress()}`);
  });

  await t.test("stopped server", async () => {
    const own = await startIdemd();
    const c = new Client(own.address, NAMESPACE);
    await c.runOnce(key(), fp("1000"), async () => ok("{}"));
    c.close();
    await own.stop();
    await expectUnavailable(own.address);
  });
});

test("keys_and_fingerprints_match_the_shared_vectors", () => {
  const vectors = testdata("vectors.json");
  assert.ok(vectors.entity_keys.length > 0 && vectors.fingerprints.length > 0);
  for (const c of vectors.entity_keys) {
    assert.equal(entityKey(c.entity, c.operation), c.key, JSON.stringify(c));
  }
  for (const c of vectors.fingerprints) {
    assert.equal(fingerprint(c.fields).toString("hex"), c.sha256_hex, JSON.stringify(c));
  }
  assert.notDeepEqual(fingerprint({ a: "bc" }), fingerprint({ ab: "c" }), "concatenation collides");
  // Bytes and their text give the same fingerprint.
  assert.deepEqual(fingerprint({ amount: Buffer.from("1000") }), fingerprint({ amount: "1000" }));
  // Names sort by their UTF-8 bytes, as in the other languages: U+FF61 before
  // U+1F600, whose UTF-16 form (a surrogate pair) would sort first.
  const expected = createHash("sha256");
  for (const part of ["\uFF61", "b", "\u{1F600}", "a"]) {
    const bytes = Buffer.from(part, "utf8");
    const length = Buffer.alloc(4);
    length.writeUInt32BE(bytes.length);
    expected.update(length).update(bytes);
  }
  assert.equal(fingerprint({ "\u{1F600}": "a", "\uFF61": "b" }).toString("hex"), expected.digest("hex"));
});

test("every conformance scenario has a test here", () => {
  const scenarios: { id: string }[] = testdata("conformance.json").scenarios;
  assert.ok(scenarios.length > 0);
  const titles = new Set([...readFileSync(__filename, "utf8").matchAll(/\btest\)?\("([a-z0-9_]+)"/g)].map((match) => match[1]));
  for (const { id } of scenarios) assert.ok(titles.has(id), `scenario ${id} has no test titled with its id`);
});
