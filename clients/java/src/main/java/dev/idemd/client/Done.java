package dev.idemd.client;

import java.util.function.Function;
import java.util.function.IntPredicate;

/** The result of a successful {@link IdemdClient#runOnce}: the same response for every run of a key. */
public final class Done {
  private final Response response;
  private final boolean replayed;
  private final boolean reconciled;
  private final int attempt;

  Done(Response response, boolean replayed, boolean reconciled, int attempt) {
    this.response = response;
    this.replayed = replayed;
    this.reconciled = reconciled;
    this.attempt = attempt;
  }

  /** What the operation answered (a success or a {@link Final} failure), or its stored copy. */
  public Response getResponse() {
    return response;
  }

  /** True when the operation did not run here: an earlier attempt's stored response was replayed. */
  public boolean isReplayed() {
    return replayed;
  }

  /**
   * True when the operation did not run here because the reconcile hook found the provider's result
   * of an earlier attempt (now stored).
   */
  public boolean isReconciled() {
    return reconciled;
  }

  /** The attempt that stored the response. */
  public int getAttempt() {
    return attempt;
  }

  /**
   * The response, or the exception a failure response stands for: a stored {@link Final} failure
   * comes back as a {@code Done} both the first time and on every replay, so mapping it here gives
   * every run the same exception type (as Stripe's SDKs re-raise a replayed decline as a card
   * error). For example {@code done.responseOrThrow(code -> code == 402, r -> new
   * CardDeclined(r.getBodyText()))}.
   */
  public <X extends Throwable> Response responseOrThrow(
      IntPredicate isFailure, Function<? super Response, ? extends X> toException) throws X {
    if (isFailure.test(response.getCode())) {
      throw toException.apply(response);
    }
    return response;
  }

  @Override
  public String toString() {
    return "Done{response=" + response + ", replayed=" + replayed + ", reconciled=" + reconciled
        + ", attempt=" + attempt + "}";
  }
}
