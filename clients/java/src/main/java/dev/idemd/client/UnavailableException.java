package dev.idemd.client;

import org.jspecify.annotations.Nullable;

/**
 * idemd could not be reached or did not answer in time (UNAVAILABLE or DEADLINE_EXCEEDED), also
 * after the bounded retries. Nothing ran: a call never reports success without idemd.
 */
public class UnavailableException extends IdemdException {
  private static final long serialVersionUID = 1L;

  public UnavailableException(String message, @Nullable String key, @Nullable Throwable cause) {
    super(message, key, cause);
  }
}
