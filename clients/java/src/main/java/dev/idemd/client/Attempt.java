package dev.idemd.client;

import org.jspecify.annotations.Nullable;

/** What the operation (and the reconcile hook) is told about the attempt it runs in. */
public final class Attempt {
  private final String downstreamKey;
  private final int attempt;
  private final @Nullable PreviousAttempt previous;

  Attempt(String downstreamKey, int attempt, @Nullable PreviousAttempt previous) {
    this.downstreamKey = downstreamKey;
    this.attempt = attempt;
    this.previous = previous;
  }

  /**
   * Pass it to the payment provider as its idempotency key: the same for every attempt of the
   * record, so a provider that deduplicates on it sees one operation.
   */
  public String getDownstreamKey() {
    return downstreamKey;
  }

  /** 1, 2, …: a fencing number to forward downstream. */
  public int getAttempt() {
    return attempt;
  }

  /**
   * How attempt − 1 ended; null on attempt 1. When its {@link PreviousAttempt#isOutcomeUnknown()}
   * is set, the earlier attempt may already have charged under this same downstream key.
   */
  public @Nullable PreviousAttempt getPrevious() {
    return previous;
  }

  @Override
  public String toString() {
    return "Attempt{attempt=" + attempt + ", downstreamKey=" + downstreamKey + ", previous=" + previous + "}";
  }
}
