// Every TypeScript example of the READMEs runs here against idemd with a fake
// Stripe (test/examples), and the READMEs show exactly those lines.
import { after, before, test } from "node:test";
import * as assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync } from "fs";
import * as path from "path";
import { Client, OutcomeUnknownFailure, RetryableFailure, entityKey, fingerprint } from "@idemd/client";
import { FakeStripe, Order, stripe } from "./examples/fakes";
import { Idemd, PACKAGE, key, lookup, startIdemd } from "./helpers";

let server: Idemd;
let top: typeof import("./examples/top-readme");
let pkg: typeof import("./examples/package-readme");

before(async () => {
  server = await startIdemd();
  // The examples make their client when loaded, from IDEMD_ADDR.
  process.env.IDEMD_ADDR = server.address;
  top = require("./examples/top-readme");
  pkg = require("./examples/package-readme");
});

after(async () => {
  top.close();
  pkg.close();
  await server.stop();
});

const order = (amount: number): Order => ({ id: key("order"), amount, currency: "eur" });

async function rejection(promise: Promise<unknown>): Promise<any> {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  assert.fail("resolved; want a rejection");
}

test("the README's example charges once, whatever happens", async () => {
  // The first answer is lost after the charge; the retry gets the same charge.
  const lost = order(1000);
  stripe.loseAnswers = 1;
  assert.ok((await rejection(top.charge(lost))) instanceof OutcomeUnknownFailure);
  const first = await top.charge(lost);
  const again = await top.charge(lost);
  assert.deepEqual([first.replayed, first.attempt, again.replayed], [false, 2, true]);
  assert.deepEqual(again.response, first.response);
  const charges = stripe.made.filter((charge) => charge.id === JSON.parse(first.response.body.toString()).id);
  assert.equal(charges.length, 1);

  // A decline is stored and replayed; it ran once.
  const declined = order(9999);
  const calls = stripe.calls;
  for (const replayed of [false, true]) {
    const done = await top.charge(declined);
    assert.deepEqual([done.response.code, done.replayed], [402, replayed]);
    assert.equal(JSON.parse(done.response.body.toString()).decline_code, "insufficient_funds");
  }
  assert.equal(stripe.calls, calls + 1);

  // Refused: aborted, and the retry runs it.
  const refused = order(1000);
  stripe.rateLimited = 1;
  assert.ok((await rejection(top.charge(refused))) instanceof RetryableFailure);
  assert.equal((await top.charge(refused)).attempt, 2);
});

test("the package README's example charges once and answers every outcome", async () => {
  const lost = order(1000);
  stripe.loseAnswers = 1;
  assert.equal((await pkg.postCharge(lost)).status, 503);
  const first = await pkg.postCharge(lost);
  const again = await pkg.postCharge(lost);
  assert.equal(first.status, 201);
  assert.deepEqual(again, first);
  const id = (first.body as { id: string }).id;
  assert.equal(stripe.made.filter((charge) => charge.id === id).length, 1, "charged once");

  const declined = order(9999);
  const calls = stripe.calls;
  const decline = await pkg.postCharge(declined);
  assert.deepEqual(decline, { status: 402, body: { type: "card_error", message: "Your card has insufficient funds.", code: "card_declined", decline_code: "insufficient_funds" } });
  assert.deepEqual(await pkg.postCharge(declined), decline, "the same decline, replayed");
  assert.equal(stripe.calls, calls + 1);

  const refused = order(1000);
  stripe.rateLimited = 1;
  assert.equal((await pkg.postCharge(refused)).status, 503);
  assert.equal((await pkg.postCharge(refused)).status, 201);

  // The same order id with another amount is another request.
  assert.equal((await pkg.postCharge({ ...lost, amount: 2000 })).status, 422);

  // Anything the example did not classify is rethrown, its attempt aborted as outcome-unknown.
  const broken = order(1000);
  const bug = new Error("the SDK broke");
  const create = stripe.charges.create;
  stripe.charges.create = async () => {
    throw bug;
  };
  try {
    assert.equal(await rejection(pkg.postCharge(broken)), bug);
  } finally {
    stripe.charges.create = create;
  }
  const record = await lookup(server, entityKey(broken.id, "charge"), "payments");
  assert.deepEqual([record.state, record.outcome_unknown], ["STATE_ABORTED", true]);
});

test("the package README's reconcile example finds a lost charge instead of charging again", async () => {
  const provider = new FakeStripe(false);
  const idemd = new Client(server.address, "payments");
  const charged = order(1000);
  const k = entityKey(charged.id, "charge");
  const fp = fingerprint({ amount: String(charged.amount), currency: charged.currency });
  provider.loseAnswers = 1;
  await rejection(pkg.chargeWithReconcile(idemd, k, fp, charged, provider));
  const done = await pkg.chargeWithReconcile(idemd, k, fp, charged, provider);
  assert.deepEqual([done.reconciled, done.attempt, provider.made.length, provider.calls], [true, 2, 1, 1]);
  assert.equal(JSON.parse(done.response.body.toString()).id, provider.made[0].id);
  // Without a lost answer there is nothing to reconcile: it charges.
  const fresh = order(1000);
  const plain = await pkg.chargeWithReconcile(idemd, entityKey(fresh.id, "charge"), fp, fresh, provider);
  assert.deepEqual([plain.reconciled, provider.made.length], [false, 2]);
  idemd.close();
});

/** The examples between `// README:begin <readme>` and `// README:end` in test/examples, less their common indentation. */
function examples(): { readme: string; text: string }[] {
  const folder = path.join(PACKAGE, "test", "examples");
  const found: { readme: string; text: string }[] = [];
  for (const file of readdirSync(folder).filter((name) => name.endsWith(".ts"))) {
    const lines = readFileSync(path.join(folder, file), "utf8").split("\n");
    for (let begin = 0; begin < lines.length; begin++) {
      const marker = /^\s*\/\/ README:begin (\S+)$/.exec(lines[begin]);
      if (!marker) continue;
      const end = lines.findIndex((line, at) => at > begin && /^\s*\/\/ README:end$/.test(line));
      assert.ok(end > begin, `${file}: README:begin without README:end`);
      const block = lines.slice(begin + 1, end);
      const indent = Math.min(...block.filter((line) => line.trim()).map((line) => line.length - line.trimStart().length));
      found.push({ readme: marker[1], text: block.map((line) => line.slice(indent)).join("\n") });
    }
  }
  return found;
}

/** The ```ts blocks of a README. */
const tsBlocks = (readme: string) => [...readme.matchAll(/^```ts\n([\s\S]*?)\n```$/gm)].map((match) => match[1]);

test("the READMEs show these examples verbatim, and no other TypeScript", (t) => {
  const all = examples();
  // This package's README as it ships (here the package itself, elsewhere the installed copy).
  const readmes: Record<string, string | undefined> = {
    "clients/typescript/README.md": path.join(path.dirname(require.resolve("@idemd/client/package.json")), "README.md"),
    // The repository's README, when the tests run in (or are pointed at) the repository.
    "README.md": process.env.IDEMD_REPO_ROOT ? path.join(process.env.IDEMD_REPO_ROOT, "README.md") : path.join(PACKAGE, "..", "..", "README.md"),
  };
  for (const [name, file] of Object.entries(readmes)) {
    const wanted = all.filter((example) => example.readme === name).map((example) => example.text);
    assert.ok(wanted.length > 0, `no example for ${name}`);
    if (!existsSync(file!)) {
      assert.ok(!process.env.IDEMD_REPO_ROOT, `${file} is missing`);
      t.diagnostic(`${name}: not in a repository checkout, not compared`);
      continue;
    }
    const shown = tsBlocks(readFileSync(file!, "utf8"));
    for (const text of wanted) assert.ok(shown.includes(text), `${name} must show this verbatim:\n${text}`);
    for (const text of shown) assert.ok(wanted.includes(text), `${name} shows TypeScript that no test runs:\n${text}`);
  }
});
