package dev.idemd.client;

import dev.idemd.v1.AbortedBy;
import java.time.Instant;
import org.jspecify.annotations.Nullable;

/** How the attempt before this one ended (idemd's {@code Acquired.previous}). */
public final class PreviousAttempt {
  private final int attempt;
  private final AbortedBy abortedBy;
  private final String abortReason;
  private final boolean outcomeUnknown;
  private final @Nullable Instant endedAt;

  PreviousAttempt(int attempt, AbortedBy abortedBy, String abortReason, boolean outcomeUnknown, @Nullable Instant endedAt) {
    this.attempt = attempt;
    this.abortedBy = abortedBy;
    this.abortReason = abortReason;
    this.outcomeUnknown = outcomeUnknown;
    this.endedAt = endedAt;
  }

  static PreviousAttempt of(dev.idemd.v1.PreviousAttempt previous) {
    Instant endedAt = previous.hasEndedAt()
        ? Instant.ofEpochSecond(previous.getEndedAt().getSeconds(), previous.getEndedAt().getNanos())
        : null;
    return new PreviousAttempt(previous.getAttempt(), previous.getAbortedBy(), previous.getAbortReason(),
        previous.getOutcomeUnknown(), endedAt);
  }

  /** Always the current attempt − 1. */
  public int getAttempt() {
    return attempt;
  }

  /** Its caller (Abort), the reaper (its lease expired) or an operator (Release). */
  public AbortedBy getAbortedBy() {
    return abortedBy;
  }

  /** {@code "lease expired"} for an expired lease, else the reason given. */
  public String getAbortReason() {
    return abortReason;
  }

  /**
   * The side effect may have happened: its caller aborted it as {@link OutcomeUnknown} (or with an
   * unexpected exception), an operator released it so, or its lease expired.
   */
  public boolean isOutcomeUnknown() {
    return outcomeUnknown;
  }

  /** When it ended, by idemd's clock. */
  public @Nullable Instant getEndedAt() {
    return endedAt;
  }

  @Override
  public String toString() {
    return "PreviousAttempt{attempt=" + attempt + ", abortedBy=" + abortedBy + ", abortReason=" + abortReason
        + ", outcomeUnknown=" + outcomeUnknown + ", endedAt=" + endedAt + "}";
  }
}
