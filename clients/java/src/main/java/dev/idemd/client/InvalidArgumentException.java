package dev.idemd.client;

import org.jspecify.annotations.Nullable;

/**
 * A namespace, key, fingerprint, duration, address or response that idemd would refuse, found
 * before any call when the client is built or called, or INVALID_ARGUMENT from idemd itself.
 */
public class InvalidArgumentException extends IdemdException {
  private static final long serialVersionUID = 1L;

  public InvalidArgumentException(String message, @Nullable String key, @Nullable Throwable cause) {
    super(message, key, cause);
  }
}
