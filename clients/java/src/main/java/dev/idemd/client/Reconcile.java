package dev.idemd.client;

import org.jspecify.annotations.Nullable;

/**
 * Asks a provider that does not deduplicate on the downstream key what it holds for
 * {@link Attempt#getDownstreamKey()}. Called before the operation, under the lease, only when the
 * previous attempt's outcome is unknown ({@code attempt.getPrevious().isOutcomeUnknown()}).
 *
 * <p>Return the provider's result (or throw {@link Final} with it) to store it with Complete
 * without running the operation; return null when the provider holds nothing, and the operation
 * runs. Any exception leaves the question open: the attempt is aborted as outcome-unknown again and
 * {@link OutcomeUnknownFailureException} is thrown.
 */
@FunctionalInterface
public interface Reconcile {
  @Nullable Response reconcile(Attempt attempt) throws Exception;
}
