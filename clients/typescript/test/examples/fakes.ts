// A stand-in for the payment SDK the README examples call, in the shape of
// stripe-node (`stripe.charges.create(params, { idempotencyKey })`,
// `Stripe.errors.*`): it deduplicates by idempotency key as Stripe does
// (unless told not to), declines amounts over 5000, and fails on request:
// rate-limited before charging, or a lost answer after charging.

export namespace Stripe {
  export interface Charge {
    id: string;
    object: "charge";
    amount: number;
    currency: string;
    metadata: Record<string, string>;
  }

  export interface RawError {
    type: string;
    message: string;
    code?: string;
    decline_code?: string;
  }

  export namespace errors {
    export class StripeError extends Error {
      constructor(readonly raw: RawError) {
        super(raw.message);
      }
    }
    export class StripeCardError extends StripeError {}
    export class StripeConnectionError extends StripeError {}
    export class StripeRateLimitError extends StripeError {}
  }
}

export interface Order {
  id: string;
  amount: number;
  currency: string;
}

export class FakeStripe {
  /** Every charge made, in order; a second charge for the same order is a double charge. */
  readonly made: Stripe.Charge[] = [];
  /** create() calls, including those that failed. */
  calls = 0;
  /** The next this many calls charge, then lose the answer (StripeConnectionError). */
  loseAnswers = 0;
  /** The next this many calls are refused before charging (StripeRateLimitError). */
  rateLimited = 0;

  /** Charges by the idempotency key they were made with. */
  private readonly byKey = new Map<string, Stripe.Charge>();

  constructor(private readonly deduplicates = true) {}

  readonly charges = {
    create: async (
      params: { amount: number; currency: string; metadata?: Record<string, string> },
      options: { idempotencyKey?: string } = {},
    ): Promise<Stripe.Charge> => {
      this.calls++;
      if (this.rateLimited > 0) {
        this.rateLimited--;
        throw new Stripe.errors.StripeRateLimitError({ type: "rate_limit_error", message: "Too many requests" });
      }
      if (params.amount > 5000) {
        throw new Stripe.errors.StripeCardError({
          type: "card_error", message: "Your card has insufficient funds.", code: "card_declined", decline_code: "insufficient_funds",
        });
      }
      let charge = this.deduplicates && options.idempotencyKey ? this.byKey.get(options.idempotencyKey) : undefined;
      if (!charge) {
        charge = {
          id: `ch_${this.made.length + 1}`, object: "charge", amount: params.amount, currency: params.currency,
          metadata: { ...params.metadata },
        };
        this.made.push(charge);
        if (options.idempotencyKey) this.byKey.set(options.idempotencyKey, charge);
      }
      if (this.loseAnswers > 0) {
        this.loseAnswers--;
        throw new Stripe.errors.StripeConnectionError({ type: "api_connection_error", message: "Request timed out" });
      }
      return charge;
    },

    /** Stripe's search, for `metadata["name"]:"value"` queries only. */
    search: async ({ query }: { query: string }): Promise<{ data: Stripe.Charge[] }> => {
      const [, name, value] = /^metadata\["([^"]+)"\]:"([^"]*)"$/.exec(query) ?? [];
      return { data: this.made.filter((charge) => name !== undefined && charge.metadata[name] === value) };
    },
  };
}

/** The provider of the examples: deduplicates on the idempotency key. */
export const stripe = new FakeStripe();
