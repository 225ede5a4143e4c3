/**
 * The TypeScript worker of the payment demo (its protocol:
 * examples/payments/polyglot.rs). Charges its share of the payments through
 * the HTTP provider with runOnce, and exits between charging and completing
 * when the provider says so.
 */
import { Client, Final, OutcomeUnknown, Retryable, entityKey, fingerprint } from "@idemd/client";
import type { Attempt, Response } from "@idemd/client";

const env = (name: string): string => {
  const value = process.env[name];
  if (value === undefined) throw new Error(`${name} is not set (the worker runs under examples/payments/run)`);
  return value;
};

const provider = env("PROVIDER_URL");
const worker = env("WORKER");
const reconcile = env("RECONCILE") === "on";

const stored = (code: number, body: Buffer): Response => ({ body, code, contentType: "application/json" });

async function charge(payment: number, attempt: Attempt): Promise<Response> {
  const body = `{"payment":"pay-${payment}","amount":"${1000 + 7 * payment}","currency":"EUR"}`;
  let answer: globalThis.Response;
  try {
    answer = await fetch(`${provider}/v1/charges`, {
      method: "POST",
      headers: { "content-type": "application/json", "idempotency-key": attempt.downstreamKey, "demo-worker": worker },
      body,
    });
  } catch (error) {
    // The request may have left: whether it charged is unknown.
    throw new OutcomeUnknown(String(error));
  }
  const text = Buffer.from(await answer.arrayBuffer());
  if (answer.status === 201) {
    if (answer.headers.get("demo-crash") === "now") process.exit(3); // charged; dies before telling idemd
    return stored(201, text);
  }
  if (answer.status === 402) throw new Final(stored(402, text));
  if (answer.status === 504) throw new OutcomeUnknown("the provider's answer was lost");
  throw new Retryable(`the provider answered ${answer.status}`);
}

async function find(attempt: Attempt): Promise<Response | null> {
  const answer = await fetch(`${provider}/v1/charges?idempotency_key=${encodeURIComponent(attempt.downstreamKey)}`);
  const text = Buffer.from(await answer.arrayBuffer());
  if (answer.status === 200) return stored(201, text);
  if (answer.status === 402) return stored(402, text);
  if (answer.status === 404) return null;
  throw new Error(`the lookup answered ${answer.status}`);
}

async function main(): Promise<void> {
  const payments = env("PAYMENTS").split(",").filter((p) => p !== "").map(Number);
  const client = new Client(env("IDEMD_ADDR"), env("NAMESPACE"), { leaseTtlMs: 1000, waitMs: 500, inProgressBudgetMs: 2000 });
  // The first call opens the connection: done before the race; its failure is no matter.
  const warmUp = `warm-up-${Math.floor(Math.random() * 2 ** 52)}`;
  await client.runOnce(warmUp, Buffer.alloc(0), async () => stored(200, Buffer.alloc(0))).catch(() => undefined);
  console.log("ready");
  await new Promise((go) => process.stdin.once("data", go));
  process.stdin.pause();
  const counts = { completed: 0, replayed: 0, reconciled: 0, unfinished: 0 };

  const pay = async (payment: number): Promise<void> => {
    const key = entityKey(`pay-${payment}`, "charge");
    const fp = fingerprint({ payment: `pay-${payment}`, amount: String(1000 + 7 * payment), currency: "EUR" });
    for (let tries = 0; tries < 60; tries++) {
      try {
        const operation = (attempt: Attempt) => charge(payment, attempt);
        const done = reconcile
          ? await client.runOnce(key, fp, operation, { reconcile: find })
          : await client.runOnce(key, fp, operation);
        const how = done.replayed ? "replayed" : done.reconciled ? "reconciled" : "completed";
        counts[how] += 1;
        console.log(`result pay-${payment} ${how} ${done.response.code} ${Buffer.from(done.response.body).toString()}`);
        return;
      } catch {
        // Every failure of a call is retried here; idemd says when it ran.
        await new Promise((pause) => setTimeout(pause, 20 + Math.random() * 180));
      }
    }
    counts.unfinished += 1;
  };

  const queue = [...payments];
  const lanes = Array.from({ length: Number(env("CONCURRENCY")) }, async () => {
    for (let payment = queue.shift(); payment !== undefined; payment = queue.shift()) await pay(payment);
  });
  await Promise.all(lanes);
  console.log(`summary completed=${counts.completed} replayed=${counts.replayed} reconciled=${counts.reconciled} unfinished=${counts.unfinished}`);
  client.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
