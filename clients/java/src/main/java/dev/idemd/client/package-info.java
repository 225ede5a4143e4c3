/**
 * The Java client of idemd: {@link dev.idemd.client.IdemdClient#runOnce} runs an operation at
 * most once per idempotency key and does the protocol's hard parts in one place (Begin, heartbeats,
 * Complete or Abort, waiting on a concurrent duplicate, retrying Begin with the same attempt nonce).
 *
 * <p>Everything here is non-null unless annotated {@code @Nullable}, so Kotlin sees exact types.
 * The generated messages and stubs of the contract are in {@code dev.idemd.v1}.
 */
@NullMarked
package dev.idemd.client;

import org.jspecify.annotations.NullMarked;
