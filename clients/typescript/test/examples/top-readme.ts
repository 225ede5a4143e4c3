// The TypeScript example of the repository's README.md: test/readme.test.ts
// checks that the README shows the lines between the markers verbatim, and
// runs them against idemd with a fake Stripe.
import { Order, Stripe, stripe } from "./fakes";

// README:begin README.md
import { Client, Final, OutcomeUnknown, Retryable, entityKey, fingerprint } from "@idemd/client";

const client = new Client(process.env.IDEMD_ADDR ?? "idemd:50051", "payments");
export const charge = (order: Order) => // replayed on every retry, run once
  client.runOnce(entityKey(order.id, "charge"), fingerprint({ amount: String(order.amount), currency: "EUR" }), async (attempt) => {
    try {
      const charge = await stripe.charges.create({ amount: order.amount, currency: "eur" }, { idempotencyKey: attempt.downstreamKey });
      return { body: JSON.stringify(charge), code: 201, contentType: "application/json" };
    } catch (e) {
      if (e instanceof Stripe.errors.StripeCardError) throw new Final({ body: JSON.stringify(e.raw), code: 402, contentType: "application/json" });
      if (e instanceof Stripe.errors.StripeRateLimitError) throw new Retryable(e); // refused: nothing happened
      throw e instanceof Stripe.errors.StripeConnectionError ? new OutcomeUnknown(e) : e; // it may have charged (so may anything else)
    }
  });
// README:end

export const close = () => client.close();
