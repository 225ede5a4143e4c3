package dev.idemd.client;

import org.jspecify.annotations.Nullable;

/**
 * Thrown by an operation when it may or may not have happened (the request left and its answer was
 * lost: a timeout or a dropped connection after sending). The attempt is aborted with
 * {@code outcome_unknown}, the next attempt sees it in {@link Attempt#getPrevious()} (and runs the
 * reconcile hook first), and {@link IdemdClient#runOnce} throws
 * {@link OutcomeUnknownFailureException} with this as its cause.
 */
public class OutcomeUnknown extends RuntimeException {
  private static final long serialVersionUID = 1L;

  public OutcomeUnknown(String message) {
    super(message);
  }

  public OutcomeUnknown(String message, @Nullable Throwable cause) {
    super(message, cause);
  }

  public OutcomeUnknown(Throwable cause) {
    super(cause);
  }
}
