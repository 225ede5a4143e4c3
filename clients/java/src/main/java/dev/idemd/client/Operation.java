package dev.idemd.client;

/**
 * The work {@link IdemdClient#runOnce} runs at most once per key.
 *
 * <p>Return the {@link Response} of a success. Throw {@link Final} for a deterministic failure
 * (stored and replayed), {@link Retryable} when nothing happened (aborted; a retry runs it again),
 * {@link OutcomeUnknown} when it may have happened (aborted as outcome-unknown). Any other
 * exception counts as {@link OutcomeUnknown}: the helper cannot tell whether it came before or after
 * the provider was called.
 */
@FunctionalInterface
public interface Operation {
  Response run(Attempt attempt) throws Exception;
}
