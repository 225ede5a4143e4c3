package dev.idemd.client;

import org.jspecify.annotations.Nullable;

/**
 * The operation threw {@link Retryable} and the attempt was aborted: nothing happened, and a retry
 * runs the operation again. The cause is what the operation threw.
 */
public class RetryableFailureException extends IdemdException {
  private static final long serialVersionUID = 1L;

  public RetryableFailureException(String message, @Nullable String key, @Nullable Throwable cause) {
    super(message, key, cause);
  }
}
