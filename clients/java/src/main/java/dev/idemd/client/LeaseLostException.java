package dev.idemd.client;

import org.jspecify.annotations.Nullable;

/**
 * The operation ran but its lease was lost before its result was stored, and Begin neither replayed
 * a stored result nor handed this call the same record again. Retrying is safe: the next attempt
 * reuses the downstream key (its previous attempt shows the outcome as unknown).
 */
public class LeaseLostException extends IdemdException {
  private static final long serialVersionUID = 1L;

  public LeaseLostException(String message, @Nullable String key, @Nullable Throwable cause) {
    super(message, key, cause);
  }
}
