// The TypeScript helper against a real idemd (the binary scripts/test built).
import { test, before, after } from "node:test";
import * as assert from "node:assert/strict";
import { spawn, ChildProcess } from "child_process";
import { mkdtempSync, readFileSync } from "fs";
import { createServer } from "net";
import * as os from "os";
import * as path from "path";
import { randomUUID } from "crypto";
import {
  Client, Final, FingerprintMismatchError, InProgressError, Options, Response, Retryable, RetryableFailure,
  entityKey, fingerprint,
} from "../src/index";

const ROOT = path.join(__dirname, "..", "..", "..", "..");
let server: ChildProcess;
let target = "";

const freePort = () =>
  new Promise<number>((resolve) => {
    const probe = createServer().listen(0, "127.0.0.1", () => {
      const port = (probe.address() as { port: number }).port;
      probe.close(() => resolve(port));
    });
  });

before(async () => {
  const binary = process.env.IDEMD_BIN ?? path.join(ROOT, "target", "debug", "idemd");
  const folder = mkdtempSync(path.join(os.tmpdir(), "idemd-ts-"));
  const port = await freePort();
  target = `127.0.0.1:${port}`;
  server = spawn(binary, ["serve", "--listen", target, "--metrics-listen", "127.0.0.1:0",
    "--database-url", `sqlite://${folder}/idemd.db`, "--reaper-interval", "100ms"], { stdio: "ignore" });
  const probe = client();
  const deadline = Date.now() + 30_000;
  for (;;) {
    try {
      await probe.runOnce(`startup-${randomUUID()}`, Buffer.from("x"), async () => ok("up"));
      break;
    } catch {
      assert.ok(Date.now() < deadline, "idemd did not start");
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  probe.close();
});

after(() => {
  server.kill("SIGTERM");
});

function client(options: Options = {}) {
  return new Client(target, "ts-payments", { leaseTtlMs: 2000, waitMs: 2000, inProgressBudgetMs: 15_000, rpcRetries: 1, ...options });
}

const ok = (body: string): Response => ({ body: Buffer.from(body), code: 201, contentType: "text/plain" });
const key = () => `order-${randomUUID()}`;

test("vectors match the other languages", () => {
  // clients/testdata/vectors.json: the same cases every client's tests read.
  const vectors = JSON.parse(readFileSync(path.join(__dirname, "..", "..", "..", "testdata", "vectors.json"), "utf8"));
  assert.ok(vectors.entity_keys.length > 0 && vectors.fingerprints.length > 0);
  for (const c of vectors.entity_keys) {
    assert.equal(entityKey(c.entity, c.operation), c.key, JSON.stringify(c));
  }
  for (const c of vectors.fingerprints) {
    assert.equal(fingerprint(c.fields).toString("hex"), c.sha256_hex, JSON.stringify(c));
  }
});

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
    const { Client } = require(${JSON.stringify(path.join(__dirname, "..", "src", "index.js"))});
    const c = new Client(${JSON.stringify(target)}, "ts-payments", { leaseTtlMs: 1000 });
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
