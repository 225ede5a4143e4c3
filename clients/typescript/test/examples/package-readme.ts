// The TypeScript examples of clients/typescript/README.md: test/readme.test.ts
// checks that the README shows the lines between the markers verbatim (less
// their common indentation), and runs them against idemd with a fake Stripe.
import { FakeStripe, Order, Stripe, stripe } from "./fakes";

// README:begin clients/typescript/README.md
import {
  Client, Final, FingerprintMismatchError, InProgressError, OutcomeUnknown, OutcomeUnknownFailure, Retryable,
  RetryableFailure, entityKey, fingerprint,
} from "@idemd/client";

// One client per process and namespace: "idemd:50051" or "http://idemd:50051".
const idemd = new Client(process.env.IDEMD_ADDR ?? "idemd:50051", "payments");

/** Charges an order at most once, however often it is called. */
export async function chargeOrder(order: Order): Promise<Stripe.Charge> {
  const key = entityKey(order.id, "charge");
  const fp = fingerprint({ amount: String(order.amount), currency: order.currency });
  const done = await idemd.runOnce(key, fp, async (attempt) => {
    try {
      // The provider's idempotency key: a retry after a crash charges once.
      const charge = await stripe.charges.create(
        { amount: order.amount, currency: order.currency },
        { idempotencyKey: attempt.downstreamKey },
      );
      return { body: JSON.stringify(charge), code: 201, contentType: "application/json" };
    } catch (error) {
      if (error instanceof Stripe.errors.StripeCardError) {
        // An answer: stored, and replayed to every retry.
        throw new Final({ body: JSON.stringify(error.raw), code: 402, contentType: "application/json" }, error);
      }
      if (error instanceof Stripe.errors.StripeConnectionError) throw new OutcomeUnknown(error); // sent, no answer: it may have charged
      if (error instanceof Stripe.errors.StripeRateLimitError) throw new Retryable(error); // refused: nothing happened
      throw error; // anything else: aborted as outcome-unknown, then rethrown
    }
  }, {
    // A stored decline is thrown as the provider's error, the first time and on every replay.
    finalError: (stored) => (stored.code === 402 ? new Stripe.errors.StripeCardError(JSON.parse(stored.body.toString())) : undefined),
  });
  return JSON.parse(done.response.body.toString());
}

/** POST /orders/:id/charge: an answer for every outcome. */
export async function postCharge(order: Order): Promise<{ status: number; body: unknown }> {
  try {
    return { status: 201, body: await chargeOrder(order) }; // the same charge for every retry
  } catch (error) {
    if (error instanceof Stripe.errors.StripeCardError) return { status: 402, body: error.raw }; // the same decline every time
    if (error instanceof FingerprintMismatchError) return { status: 422, body: error.message }; // the key was used for another request
    if (error instanceof InProgressError || error instanceof RetryableFailure || error instanceof OutcomeUnknownFailure) {
      return { status: 503, body: "try again" }; // nothing happened, or a retry is safe: it has the same downstream key
    }
    throw error;
  }
}
// README:end

/** A charge against a provider that does not deduplicate, made safe by the reconcile hook. */
export async function chargeWithReconcile(idemd: Client, key: string, fp: Uint8Array, order: Order, provider: FakeStripe) {
  // README:begin clients/typescript/README.md
  const done = await idemd.runOnce(key, fp, async (attempt) => {
    const charge = await provider.charges.create({
      amount: order.amount, currency: order.currency, metadata: { idempotency_key: attempt.downstreamKey },
    });
    return { body: JSON.stringify(charge), code: 201, contentType: "application/json" };
  }, {
    // Runs first when the previous attempt's outcome is unknown: did it charge?
    reconcile: async (attempt) => {
      const found = await provider.charges.search({ query: `metadata["idempotency_key"]:"${attempt.downstreamKey}"` });
      return found.data[0] && { body: JSON.stringify(found.data[0]), code: 201, contentType: "application/json" };
    },
  });
  // README:end
  return done;
}

export const close = () => idemd.close();
