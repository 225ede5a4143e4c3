package dev.idemd.client;

import org.jspecify.annotations.Nullable;

/** The key was first used with a different request (idemd answered FINGERPRINT_MISMATCH). */
public class FingerprintMismatchException extends IdemdException {
  private static final long serialVersionUID = 1L;

  public FingerprintMismatchException(String message, @Nullable String key, @Nullable Throwable cause) {
    super(message, key, cause);
  }
}
