package dev.idemd.client;

import org.jspecify.annotations.Nullable;

/**
 * The attempt was aborted with its outcome unknown: the provider may have done it. Thrown when the
 * operation threw {@link OutcomeUnknown} or any exception other than {@link Final} and
 * {@link Retryable}, when it returned null, when the reconcile hook threw, when its result could not
 * be stored, and for a {@link Retryable} that followed an outcome-unknown attempt nobody reconciled
 * (the record keeps saying outcome-unknown, and this exception always says what the record says).
 * Retrying is safe when the provider deduplicates on the downstream key or a reconcile hook looks it
 * up first. The cause is what was thrown.
 */
public class OutcomeUnknownFailureException extends IdemdException {
  private static final long serialVersionUID = 1L;

  public OutcomeUnknownFailureException(String message, @Nullable String key, @Nullable Throwable cause) {
    super(message, key, cause);
  }
}
