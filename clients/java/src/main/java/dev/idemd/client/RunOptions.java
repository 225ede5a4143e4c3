package dev.idemd.client;

import java.time.Duration;
import org.jspecify.annotations.Nullable;

/**
 * Per-call settings of {@link IdemdClient#runOnce}: each one left unset takes the client's value.
 *
 * <pre>{@code
 * RunOptions.builder().retention(Duration.ofDays(7)).reconcile(attempt -> provider.find(attempt.getDownstreamKey())).build()
 * }</pre>
 */
public final class RunOptions {
  private static final RunOptions DEFAULTS = builder().build();

  final @Nullable Duration retention;
  final @Nullable Duration leaseTtl;
  final @Nullable Duration waitTimeout;
  final @Nullable Duration inProgressBudget;
  final @Nullable Reconcile reconcile;

  private RunOptions(Builder builder) {
    this.retention = builder.retention;
    this.leaseTtl = builder.leaseTtl;
    this.waitTimeout = builder.waitTimeout;
    this.inProgressBudget = builder.inProgressBudget;
    this.reconcile = builder.reconcile;
  }

  /** The client's settings and no reconcile hook. */
  public static RunOptions defaults() {
    return DEFAULTS;
  }

  public static Builder builder() {
    return new Builder();
  }

  public static final class Builder {
    private @Nullable Duration retention;
    private @Nullable Duration leaseTtl;
    private @Nullable Duration waitTimeout;
    private @Nullable Duration inProgressBudget;
    private @Nullable Reconcile reconcile;

    private Builder() {}

    /** How long the record (and its stored response) is kept; see {@link IdemdClient.Builder#retention}. */
    public Builder retention(Duration retention) {
      this.retention = Validate.positive("retention", retention);
      return this;
    }

    /** See {@link IdemdClient.Builder#leaseTtl}. */
    public Builder leaseTtl(Duration leaseTtl) {
      this.leaseTtl = Validate.between("leaseTtl", leaseTtl, IdemdClient.MIN_LEASE_TTL, IdemdClient.MAX_LEASE_TTL);
      return this;
    }

    /** See {@link IdemdClient.Builder#waitTimeout}. */
    public Builder waitTimeout(Duration waitTimeout) {
      this.waitTimeout = Validate.between("waitTimeout", waitTimeout, Duration.ZERO, IdemdClient.MAX_WAIT);
      return this;
    }

    /** See {@link IdemdClient.Builder#inProgressBudget}. */
    public Builder inProgressBudget(Duration inProgressBudget) {
      this.inProgressBudget = Validate.notNegative("inProgressBudget", inProgressBudget);
      return this;
    }

    /** For a provider that does not deduplicate on the downstream key; see {@link Reconcile}. */
    public Builder reconcile(Reconcile reconcile) {
      this.reconcile = reconcile;
      return this;
    }

    public RunOptions build() {
      return new RunOptions(this);
    }
  }
}
