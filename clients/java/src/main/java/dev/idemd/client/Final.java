package dev.idemd.client;

import java.util.Objects;
import org.jspecify.annotations.Nullable;

/**
 * Thrown by an operation for a deterministic failure (a declined card): its response is stored with
 * Complete and replayed to every later run, and {@link IdemdClient#runOnce} returns it as a
 * {@link Done} (see {@link Done#responseOrThrow}).
 */
public class Final extends RuntimeException {
  private static final long serialVersionUID = 1L;
  private final Response response;

  public Final(Response response) {
    this(response, null);
  }

  public Final(Response response, @Nullable Throwable cause) {
    super("final failure " + Objects.requireNonNull(response, "response").getCode(), cause);
    this.response = response;
  }

  public Response getResponse() {
    return response;
  }
}
