package dev.idemd.client;

import org.jspecify.annotations.Nullable;

/** Another attempt still held the key when the in-progress budget ran out; retry later. */
public class InProgressException extends IdemdException {
  private static final long serialVersionUID = 1L;

  public InProgressException(String message, @Nullable String key, @Nullable Throwable cause) {
    super(message, key, cause);
  }
}
