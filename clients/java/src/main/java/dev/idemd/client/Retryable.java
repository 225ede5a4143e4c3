package dev.idemd.client;

import org.jspecify.annotations.Nullable;

/**
 * Thrown by an operation when nothing happened (a 503, a refused connection, the provider's
 * "idempotency key in use"): the attempt is aborted, so the caller's retry runs the operation
 * again, and {@link IdemdClient#runOnce} throws {@link RetryableFailureException} with this as its
 * cause.
 */
public class Retryable extends RuntimeException {
  private static final long serialVersionUID = 1L;

  public Retryable(String message) {
    super(message);
  }

  public Retryable(String message, @Nullable Throwable cause) {
    super(message, cause);
  }

  public Retryable(Throwable cause) {
    super(cause);
  }
}
