package dev.idemd.client;

import com.google.protobuf.ByteString;
import dev.idemd.v1.AbortRequest;
import dev.idemd.v1.AbortResponse;
import dev.idemd.v1.Acquired;
import dev.idemd.v1.BeginRequest;
import dev.idemd.v1.BeginResponse;
import dev.idemd.v1.CompleteRequest;
import dev.idemd.v1.CompleteResponse;
import dev.idemd.v1.Completed;
import dev.idemd.v1.HeartbeatRequest;
import dev.idemd.v1.HeartbeatResponse;
import dev.idemd.v1.IdempotencyGrpc;
import io.grpc.CallOptions;
import io.grpc.Channel;
import io.grpc.ChannelCredentials;
import io.grpc.ClientCall;
import io.grpc.ClientInterceptor;
import io.grpc.ClientInterceptors;
import io.grpc.Context;
import io.grpc.ForwardingClientCall;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.MethodDescriptor;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.TlsChannelCredentials;
import io.grpc.stub.StreamObserver;
import java.security.SecureRandom;
import java.time.Duration;
import java.util.HexFormat;
import java.util.Objects;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.Executor;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.RejectedExecutionException;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledFuture;
import java.util.concurrent.ScheduledThreadPoolExecutor;
import java.util.concurrent.ThreadFactory;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicReference;
import java.util.function.BiConsumer;
import org.jspecify.annotations.Nullable;

/**
 * A connection to idemd for one namespace. {@link #runOnce} runs an operation at most once per
 * idempotency key and returns its response, or the stored response of the attempt that ran it:
 *
 * <ul>
 *   <li>Begin answers <b>completed</b>: the stored response is returned; nothing runs.
 *   <li><b>acquired</b>: the operation runs with {@link Attempt#getDownstreamKey()} (the provider's
 *       idempotency key) while a scheduled executor heartbeats the lease every third of its TTL;
 *       its {@link Response}, or a thrown {@link Final}, is stored with Complete and replayed to
 *       every retry; a thrown {@link Retryable} aborts the attempt; a thrown {@link OutcomeUnknown},
 *       or any other exception, aborts it as outcome-unknown. The lease always ends here, with
 *       Complete or Abort, whatever the operation throws: it is never left to expire.
 *   <li><b>in_progress</b>: Begin waits server-side ({@code waitTimeout}) for the concurrent
 *       duplicate, then again with backoff and jitter until {@code inProgressBudget} runs out.
 * </ul>
 *
 * <p>Each RPC is retried only on UNAVAILABLE and DEADLINE_EXCEEDED, a bounded number of times; Begin
 * with the same attempt nonce, so a lost Begin reply hands back the same lease instead of orphaning
 * it. When Complete answers LEASE_LOST (another attempt took over), Begin runs again: it replays the
 * winner's stored response, or hands this call the record again, and the response already obtained
 * is stored under the new attempt (the operation does not run twice in one call).
 *
 * <p>Thread-safe; build one per namespace and share it. {@link #close()} shuts down the channel it
 * opened and its threads.
 */
public final class IdemdClient implements AutoCloseable {
  static final Duration MIN_LEASE_TTL = Duration.ofSeconds(1);
  static final Duration MAX_LEASE_TTL = Duration.ofHours(1);
  static final Duration MAX_WAIT = Duration.ofSeconds(60);
  /** A lease lost this often in one call means something else keeps taking the key over. */
  private static final int MAX_LEASE_LOSSES = 3;
  private static final Metadata.Key<String> AUTHORIZATION =
      Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);
  private static final SecureRandom NONCES = new SecureRandom();

  private final String namespace;
  private final @Nullable ManagedChannel ownChannel;
  private final Channel channel;
  private final IdempotencyGrpc.IdempotencyStub stub;
  private final ScheduledThreadPoolExecutor heartbeats;
  private final Executor executor;
  private final @Nullable ExecutorService ownExecutor;
  private final Settings defaults;
  private final int rpcRetries;
  private final Duration rpcTimeout;

  private IdemdClient(Builder builder) {
    this.namespace = builder.namespace;
    this.ownChannel = builder.channel == null ? open(Objects.requireNonNull(builder.target)) : null;
    Channel base = builder.channel != null ? builder.channel : Objects.requireNonNull(ownChannel);
    this.channel = builder.token == null ? base : ClientInterceptors.intercept(base, bearer(builder.token));
    this.stub = IdempotencyGrpc.newStub(channel);
    this.heartbeats = new ScheduledThreadPoolExecutor(1, daemons("idemd-heartbeat-"));
    this.heartbeats.setRemoveOnCancelPolicy(true);
    this.ownExecutor = builder.executor == null ? Executors.newCachedThreadPool(daemons("idemd-run-")) : null;
    this.executor = builder.executor != null ? builder.executor : Objects.requireNonNull(ownExecutor);
    this.defaults = new Settings(builder.leaseTtl, builder.waitTimeout, builder.inProgressBudget, builder.retention, null);
    this.rpcRetries = builder.rpcRetries;
    this.rpcTimeout = builder.rpcTimeout;
  }

  /**
   * A client that opens its own channel to {@code target}: {@code host:port} or {@code
   * http://host:port} (plaintext), or {@code https://host:port} (TLS with the JVM's trust store).
   *
   * @throws InvalidArgumentException if the namespace is not 1-64 characters of [a-z0-9._-]
   */
  public static Builder builder(String target, String namespace) {
    return new Builder(Objects.requireNonNull(target, "target"), null, namespace);
  }

  /**
   * A client on a channel the caller built (mTLS, interceptors, …) and keeps owning: {@link #close()}
   * leaves it open.
   */
  public static Builder builder(Channel channel, String namespace) {
    return new Builder(null, Objects.requireNonNull(channel, "channel"), namespace);
  }

  /** The namespace every call of this client uses. */
  public String getNamespace() {
    return namespace;
  }

  /** The channel (with the bearer token, if any), for calls {@link #runOnce} does not cover. */
  public Channel getChannel() {
    return channel;
  }

  /** Runs {@code operation} at most once per {@code key} with the client's settings. */
  public Done runOnce(String key, byte[] fingerprint, Operation operation) {
    return runOnce(key, fingerprint, RunOptions.defaults(), operation);
  }

  /**
   * Runs {@code operation} at most once per {@code key} (in this client's namespace) and returns its
   * response, or the stored response of the attempt that ran it. Blocks the calling thread; the
   * operation runs on it.
   *
   * @param key 1-255 bytes of UTF-8 without control characters, e.g. {@link Keys#entityKey}
   * @param fingerprint 0-64 bytes identifying the request, e.g. {@link Keys#fingerprint}
   * @throws FingerprintMismatchException the key was first used with another fingerprint
   * @throws RetryableFailureException the operation threw {@link Retryable}; aborted
   * @throws OutcomeUnknownFailureException aborted with its outcome unknown (see there)
   * @throws InProgressException another attempt still holds the key after the budget
   * @throws LeaseLostException the result could not be stored because the lease kept being lost
   * @throws UnavailableException idemd unreachable; nothing ran
   * @throws InvalidArgumentException a key, fingerprint or option idemd would refuse; nothing ran
   * @throws IdemdException any other error idemd answered
   */
  public Done runOnce(String key, byte[] fingerprint, RunOptions options, Operation operation) {
    Validate.key(key);
    Validate.fingerprint(fingerprint);
    Objects.requireNonNull(operation, "operation");
    Settings settings = defaults.with(Objects.requireNonNull(options, "options"));
    @Nullable Response known = null;
    String knownDownstreamKey = "";
    boolean reconciled = false;
    for (int leaseLosses = 0; ; leaseLosses++) {
      BeginResponse begun = acquire(key, fingerprint, settings);
      if (begun.hasCompleted()) {
        return replay(begun.getCompleted());
      }
      Acquired lease = begun.getAcquired();
      Response response;
      if (known == null) {
        Ran ran = attempt(key, lease, settings, operation);
        response = ran.response;
        reconciled = ran.reconciled;
      } else if (lease.getDownstreamKey().equals(knownDownstreamKey)) {
        // The same record again after LEASE_LOST: this call already knows what happened under this
        // downstream key, so it stores that instead of running the operation a second time.
        response = known;
      } else {
        // An operator invalidated the record (or it expired) meanwhile: the new record is not the
        // one this call's operation ran for.
        abort(key, lease, "the record was replaced after this call lost its lease", false);
        throw new LeaseLostException("the lease on key '" + key + "' in namespace '" + namespace
            + "' was lost after the operation ran, and the key now names a new record; its result was not stored",
            key, null);
      }
      try {
        complete(key, lease, response);
        return new Done(response, false, reconciled, lease.getAttempt());
      } catch (StatusRuntimeException e) {
        if ("LEASE_LOST".equals(IdemdException.reasonOf(e))) {
          if (leaseLosses + 1 >= MAX_LEASE_LOSSES) {
            throw new LeaseLostException("the lease on key '" + key + "' in namespace '" + namespace
                + "' was lost " + MAX_LEASE_LOSSES + " times before the result could be stored", key, e);
          }
          known = response;
          knownDownstreamKey = lease.getDownstreamKey();
          continue;
        }
        abort(key, lease, "Complete failed: " + e.getStatus().getCode(), true);
        throw new OutcomeUnknownFailureException("the operation on key '" + key + "' in namespace '" + namespace
            + "' ran but its result could not be stored; aborted as outcome-unknown",
            key, mapped(e, key, "Complete"));
      }
    }
  }

  /** {@link #runOnceAsync(String, byte[], RunOptions, Operation)} with the client's settings. */
  public CompletableFuture<Done> runOnceAsync(String key, byte[] fingerprint, Operation operation) {
    return runOnceAsync(key, fingerprint, RunOptions.defaults(), operation);
  }

  /**
   * {@link #runOnce} on the client's executor (a pool of daemon threads it owns, or the one given to
   * {@link Builder#executor}); the operation runs on that thread. Every failure completes the future
   * exceptionally with the exception {@link #runOnce} would throw. {@code cancel(true)} interrupts
   * the run: Begin is cancelled, an operation sees the interrupt, and the lease still ends (an
   * interrupted operation counts as outcome-unknown unless it throws {@link Retryable}).
   */
  public CompletableFuture<Done> runOnceAsync(String key, byte[] fingerprint, RunOptions options, Operation operation) {
    Interruptible<Done> future = new Interruptible<>();
    executor.execute(() -> {
      if (!future.start()) {
        return;
      }
      try {
        future.complete(runOnce(key, fingerprint, options, operation));
      } catch (Throwable error) {
        future.completeExceptionally(error);
      } finally {
        future.finish();
      }
    });
    return future;
  }

  /** Shuts down the channel this client opened (not one given to it) and its threads. */
  @Override
  public void close() {
    heartbeats.shutdownNow();
    if (ownExecutor != null) {
      ownExecutor.shutdown();
    }
    if (ownChannel != null) {
      ownChannel.shutdown();
      try {
        if (!ownChannel.awaitTermination(5, TimeUnit.SECONDS)) {
          ownChannel.shutdownNow();
        }
      } catch (InterruptedException e) {
        ownChannel.shutdownNow();
        Thread.currentThread().interrupt();
      }
    }
  }

  /** Begin until the key is acquired or completed, waiting on a concurrent attempt within the budget. */
  private BeginResponse acquire(String key, byte[] fingerprint, Settings settings) {
    String nonce = HexFormat.of().formatHex(randomBytes(16));
    long giveUp = System.nanoTime() + settings.inProgressBudget.toNanos();
    while (true) {
      Duration left = Duration.ofNanos(Math.max(0, giveUp - System.nanoTime()));
      Duration wait = settings.waitTimeout.compareTo(left) < 0 ? settings.waitTimeout : left;
      BeginRequest.Builder request = BeginRequest.newBuilder()
          .setNamespace(namespace)
          .setKey(key)
          .setFingerprint(ByteString.copyFrom(fingerprint))
          .setLeaseTtl(proto(settings.leaseTtl))
          .setWaitTimeout(proto(wait))
          .setAttemptNonce(nonce);
      if (settings.retention != null) {
        request.setRetention(proto(settings.retention));
      }
      BeginResponse response;
      try {
        response = call(rpcTimeout.plus(wait), true, (rpc, observer) -> rpc.begin(request.build(), observer));
      } catch (StatusRuntimeException e) {
        throw mapped(e, key, "Begin");
      }
      switch (response.getOutcomeCase()) {
        case COMPLETED:
        case ACQUIRED:
          return response;
        case IN_PROGRESS:
          long now = System.nanoTime();
          if (now - giveUp >= 0) {
            throw new InProgressException("another attempt (" + response.getInProgress().getAttempt()
                + ") still holds key '" + key + "' in namespace '" + namespace + "' after waiting "
                + settings.inProgressBudget, key, null);
          }
          com.google.protobuf.Duration hint = response.getInProgress().getRetryAfter();
          long hintMillis = hint.getSeconds() * 1000 + hint.getNanos() / 1_000_000;
          long pause = Math.min(jitter(hintMillis > 0 ? hintMillis : 200), TimeUnit.NANOSECONDS.toMillis(giveUp - now));
          try {
            sleep(pause, true);
          } catch (StatusRuntimeException e) {
            throw mapped(e, key, "Begin");
          }
          break;
        default:
          throw new IdemdException("Begin of key '" + key + "' answered without an outcome", key, null);
      }
    }
  }

  /** How an acquired attempt's work ended when it ended with something to store. */
  private static final class Ran {
    final Response response;
    final boolean reconciled;

    Ran(Response response, boolean reconciled) {
      this.response = response;
      this.reconciled = reconciled;
    }
  }

  /**
   * Runs the reconcile hook (when due) and the operation under the lease, with heartbeats. Returns
   * what to store; every other ending aborts the lease before it throws.
   */
  private Ran attempt(String key, Acquired lease, Settings settings, Operation operation) {
    PreviousAttempt previous = lease.hasPrevious() ? PreviousAttempt.of(lease.getPrevious()) : null;
    Attempt attempt = new Attempt(lease.getDownstreamKey(), lease.getAttempt(), previous);
    // Whether attempt - 1 may have done it and nobody has checked.
    boolean unresolved = previous != null && previous.isOutcomeUnknown();
    ScheduledFuture<?> beating;
    try {
      beating = heartbeat(key, lease.getLeaseToken(), settings.leaseTtl);
    } catch (RejectedExecutionException closed) {
      abort(key, lease, "the client was closed", false);
      throw new IdemdException(describe(key, "did not run: the client is closed"), key, closed);
    }
    String stage = "reconcile hook";
    try {
      if (unresolved && settings.reconcile != null) {
        Response found;
        try {
          found = settings.reconcile.reconcile(attempt);
        } catch (Final existing) {
          found = existing.getResponse();
        }
        if (found != null) {
          return new Ran(found, true);
        }
        unresolved = false;
      }
      stage = "operation";
      Response response = operation.run(attempt);
      if (response == null) {
        throw new NullPointerException("the operation returned null instead of a Response");
      }
      return new Ran(response, false);
    } catch (Final failure) {
      return new Ran(failure.getResponse(), false);
    } catch (Retryable failure) {
      if (unresolved) {
        // Nothing happened here, but an unreconciled earlier attempt may still have: keep the record
        // saying so, or the attempt after this one would skip its reconcile hook.
        abort(key, lease, "retryable failure; the previous outcome is unknown", true);
        throw new OutcomeUnknownFailureException(describe(key, "threw Retryable after an attempt whose outcome is "
            + "unknown and was not reconciled; aborted as outcome-unknown"), key, failure);
      }
      abort(key, lease, "retryable failure", false);
      throw new RetryableFailureException(describe(key, "failed and was aborted; a retry runs it again: "
          + failure.getMessage()), key, failure);
    } catch (OutcomeUnknown failure) {
      abort(key, lease, "outcome unknown", true);
      throw new OutcomeUnknownFailureException(describe(key, "may or may not have taken effect; aborted as "
          + "outcome-unknown: " + failure.getMessage()), key, failure);
    } catch (Throwable unexpected) {
      // The helper cannot tell whether an unexpected exception came before or after the provider was
      // called, and for a payment "maybe charged" is the safe answer: the next attempt reconciles
      // (or the provider deduplicates on the downstream key) instead of charging blindly.
      abort(key, lease, truncate("the " + stage + " threw " + unexpected), true);
      if (unexpected instanceof InterruptedException) {
        Thread.currentThread().interrupt();
      }
      if (unexpected instanceof Error error) {
        throw error;
      }
      throw new OutcomeUnknownFailureException(describe(key, "the " + stage + " threw " + unexpected.getClass().getName()
          + "; aborted as outcome-unknown"), key, unexpected);
    } finally {
      beating.cancel(false);
    }
  }

  /**
   * Heartbeats on the client's scheduler every third of the lease, without waiting for answers, so
   * one slow idemd call never delays another lease's heartbeat. A failed heartbeat is not retried:
   * the next one is the retry, and two more fit before the lease expires.
   */
  private ScheduledFuture<?> heartbeat(String key, String token, Duration ttl) {
    long every = Math.max(1, ttl.toMillis() / 3);
    HeartbeatRequest request = HeartbeatRequest.newBuilder()
        .setNamespace(namespace)
        .setKey(key)
        .setLeaseToken(token)
        .setLeaseTtl(proto(ttl))
        .build();
    AtomicReference<ScheduledFuture<?>> self = new AtomicReference<>();
    ScheduledFuture<?> beating = heartbeats.scheduleWithFixedDelay(() ->
        stub.withDeadlineAfter(Math.min(rpcTimeout.toMillis(), every), TimeUnit.MILLISECONDS)
            .heartbeat(request, new StreamObserver<HeartbeatResponse>() {
              @Override
              public void onNext(HeartbeatResponse response) {}

              @Override
              public void onError(Throwable error) {
                // Lost for good (LEASE_LOST): Complete will say so; the operation keeps running.
                ScheduledFuture<?> scheduled = self.get();
                if (Status.fromThrowable(error).getCode() == Status.Code.FAILED_PRECONDITION && scheduled != null) {
                  scheduled.cancel(false);
                }
              }

              @Override
              public void onCompleted() {}
            }),
        every, every, TimeUnit.MILLISECONDS);
    self.set(beating);
    return beating;
  }

  private void complete(String key, Acquired lease, Response response) {
    CompleteRequest request = CompleteRequest.newBuilder()
        .setNamespace(namespace)
        .setKey(key)
        .setLeaseToken(lease.getLeaseToken())
        .setResponse(ByteString.copyFrom(response.getBody()))
        .setResponseCode(response.getCode())
        .setContentType(response.getContentType())
        .build();
    // Not interruptible: the operation has run, and its result is worth storing even for a caller
    // who stopped waiting for it.
    this.<CompleteResponse>call(rpcTimeout, false, (rpc, observer) -> rpc.complete(request, observer));
  }

  private void abort(String key, Acquired lease, String reason, boolean outcomeUnknown) {
    AbortRequest request = AbortRequest.newBuilder()
        .setNamespace(namespace)
        .setKey(key)
        .setLeaseToken(lease.getLeaseToken())
        .setReason(reason)
        .setOutcomeUnknown(outcomeUnknown)
        .build();
    try {
      this.<AbortResponse>call(rpcTimeout, false, (rpc, observer) -> rpc.abort(request, observer));
    } catch (StatusRuntimeException e) {
      // LEASE_LOST or idemd unreachable: the lease ends by itself, and an expired lease always counts
      // as outcome-unknown.
    }
  }

  /**
   * One RPC, retried on UNAVAILABLE and DEADLINE_EXCEEDED with jittered backoff. An interruptible call
   * is cancelled when the thread is interrupted; the others (Complete, Abort: the lease must end)
   * run to their end and the interrupt is kept for the caller.
   */
  private <T> T call(Duration timeout, boolean interruptible,
      BiConsumer<IdempotencyGrpc.IdempotencyStub, StreamObserver<T>> rpc) {
    long backoff = 50;
    for (int tries = 0; ; tries++) {
      try {
        return once(timeout, interruptible, rpc);
      } catch (StatusRuntimeException e) {
        Status.Code code = e.getStatus().getCode();
        if ((code != Status.Code.UNAVAILABLE && code != Status.Code.DEADLINE_EXCEEDED) || tries >= rpcRetries) {
          throw e;
        }
        sleep(jitter(backoff), interruptible);
        backoff = Math.min(backoff * 2, 2000);
      }
    }
  }

  private <T> T once(Duration timeout, boolean interruptible,
      BiConsumer<IdempotencyGrpc.IdempotencyStub, StreamObserver<T>> rpc) {
    CompletableFuture<T> result = new CompletableFuture<>();
    Context.CancellableContext context = Context.current().withCancellation();
    boolean interrupted = false;
    try {
      context.run(() -> rpc.accept(stub.withDeadlineAfter(timeout.toNanos(), TimeUnit.NANOSECONDS), new StreamObserver<T>() {
        @Override
        public void onNext(T value) {
          result.complete(value);
        }

        @Override
        public void onError(Throwable error) {
          result.completeExceptionally(error);
        }

        @Override
        public void onCompleted() {
          result.completeExceptionally(Status.INTERNAL.withDescription("no response").asRuntimeException());
        }
      }));
      while (true) {
        try {
          return result.get();
        } catch (InterruptedException e) {
          interrupted = true;
          if (interruptible) {
            context.cancel(e);
          }
        } catch (ExecutionException e) {
          Throwable cause = e.getCause();
          throw cause instanceof StatusRuntimeException status ? status : Status.fromThrowable(cause).asRuntimeException();
        }
      }
    } finally {
      context.cancel(null);
      if (interrupted) {
        Thread.currentThread().interrupt();
      }
    }
  }

  private static void sleep(long millis, boolean interruptible) {
    long until = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(millis);
    boolean interrupted = false;
    try {
      for (long left = millis; left > 0; left = TimeUnit.NANOSECONDS.toMillis(until - System.nanoTime())) {
        try {
          Thread.sleep(left);
        } catch (InterruptedException e) {
          interrupted = true;
          if (interruptible) {
            throw Status.CANCELLED.withDescription("interrupted").withCause(e).asRuntimeException();
          }
        }
      }
    } finally {
      if (interrupted) {
        Thread.currentThread().interrupt();
      }
    }
  }

  private IdemdException mapped(StatusRuntimeException e, String key, String rpc) {
    String reason = IdemdException.reasonOf(e);
    String message = rpc + " of key '" + key + "' in namespace '" + namespace + "' failed: "
        + e.getStatus().getCode() + (e.getStatus().getDescription() == null ? "" : " " + e.getStatus().getDescription());
    if ("FINGERPRINT_MISMATCH".equals(reason)) {
      return new FingerprintMismatchException("key '" + key + "' in namespace '" + namespace
          + "' was first used with a different request (fingerprint mismatch)", key, e);
    }
    if ("LEASE_LOST".equals(reason)) {
      return new LeaseLostException(message, key, e);
    }
    switch (e.getStatus().getCode()) {
      case INVALID_ARGUMENT:
        return new InvalidArgumentException(message, key, e);
      case UNAVAILABLE:
      case DEADLINE_EXCEEDED:
        return new UnavailableException(message + " (after " + rpcRetries + " retries)", key, e);
      default:
        return new IdemdException(message, key, e);
    }
  }

  private String describe(String key, String what) {
    return "the operation on key '" + key + "' in namespace '" + namespace + "' " + what;
  }

  private static Done replay(Completed done) {
    Response response = new Response(done.getResponse().toByteArray(), done.getResponseCode(), done.getContentType());
    return new Done(response, true, false, done.getAttempt());
  }

  private static com.google.protobuf.Duration proto(Duration value) {
    return com.google.protobuf.Duration.newBuilder().setSeconds(value.getSeconds()).setNanos(value.getNano()).build();
  }

  /** ±50 % so that retrying callers do not move in lockstep. */
  private static long jitter(long millis) {
    return (long) (millis * ThreadLocalRandom.current().nextDouble(0.5, 1.5));
  }

  private static byte[] randomBytes(int count) {
    byte[] bytes = new byte[count];
    NONCES.nextBytes(bytes);
    return bytes;
  }

  /** idemd keeps at most 1024 bytes of an abort reason; an exception's text can be longer. */
  private static String truncate(String reason) {
    String text = reason.replace('\0', ' ');
    while (text.getBytes(java.nio.charset.StandardCharsets.UTF_8).length > 1000) {
      text = text.substring(0, text.length() - 50);
    }
    return text;
  }

  private static ManagedChannel open(String target) {
    String address = target.strip();
    boolean tls = false;
    if (address.startsWith("http://")) {
      address = address.substring("http://".length());
    } else if (address.startsWith("https://")) {
      address = address.substring("https://".length());
      tls = true;
    }
    if (address.endsWith("/")) {
      address = address.substring(0, address.length() - 1);
    }
    int colon = address.lastIndexOf(':');
    String host = colon > 0 ? address.substring(0, colon) : "";
    if (host.startsWith("[") && host.endsWith("]")) {
      host = host.substring(1, host.length() - 1);
    } else if (host.contains(":")) {
      host = "";
    }
    int port = -1;
    try {
      port = Integer.parseInt(address.substring(colon + 1));
    } catch (NumberFormatException e) {
      // reported below
    }
    if (host.isEmpty() || port < 1 || port > 65535 || !host.chars().allMatch(c -> c > ' ' && c != '/' && c != '@')) {
      throw new InvalidArgumentException("the address of idemd must be host:port, http://host:port or "
          + "https://host:port, got " + Validate.quote(target), null, null);
    }
    ChannelCredentials credentials = tls ? TlsChannelCredentials.create() : InsecureChannelCredentials.create();
    return Grpc.newChannelBuilderForAddress(host, port, credentials).build();
  }

  private static ClientInterceptor bearer(String token) {
    String value = "Bearer " + token;
    return new ClientInterceptor() {
      @Override
      public <ReqT, RespT> ClientCall<ReqT, RespT> interceptCall(
          MethodDescriptor<ReqT, RespT> method, CallOptions options, Channel next) {
        return new ForwardingClientCall.SimpleForwardingClientCall<>(next.newCall(method, options)) {
          @Override
          public void start(Listener<RespT> listener, Metadata headers) {
            headers.put(AUTHORIZATION, value);
            super.start(listener, headers);
          }
        };
      }
    };
  }

  private static ThreadFactory daemons(String prefix) {
    AtomicInteger count = new AtomicInteger();
    return runnable -> {
      Thread thread = new Thread(runnable, prefix + count.incrementAndGet());
      thread.setDaemon(true);
      return thread;
    };
  }

  /** The client's settings with one call's overrides. */
  private static final class Settings {
    final Duration leaseTtl;
    final Duration waitTimeout;
    final Duration inProgressBudget;
    final @Nullable Duration retention;
    final @Nullable Reconcile reconcile;

    Settings(Duration leaseTtl, Duration waitTimeout, Duration inProgressBudget, @Nullable Duration retention,
        @Nullable Reconcile reconcile) {
      this.leaseTtl = leaseTtl;
      this.waitTimeout = waitTimeout;
      this.inProgressBudget = inProgressBudget;
      this.retention = retention;
      this.reconcile = reconcile;
    }

    Settings with(RunOptions options) {
      return new Settings(
          options.leaseTtl != null ? options.leaseTtl : leaseTtl,
          options.waitTimeout != null ? options.waitTimeout : waitTimeout,
          options.inProgressBudget != null ? options.inProgressBudget : inProgressBudget,
          options.retention != null ? options.retention : retention,
          options.reconcile);
    }
  }

  /** A future whose {@code cancel(true)} interrupts the thread running it, and only while it does. */
  private static final class Interruptible<T> extends CompletableFuture<T> {
    private @Nullable Thread runner;

    synchronized boolean start() {
      if (isDone()) {
        return false;
      }
      runner = Thread.currentThread();
      return true;
    }

    synchronized void finish() {
      runner = null;
      // The pool thread goes back clean even if a cancel raced with the end of the run.
      Thread.interrupted();
    }

    @Override
    public boolean cancel(boolean mayInterruptIfRunning) {
      boolean cancelled = super.cancel(mayInterruptIfRunning);
      synchronized (this) {
        if (cancelled && mayInterruptIfRunning && runner != null) {
          runner.interrupt();
        }
      }
      return cancelled;
    }
  }

  /** Settings of an {@link IdemdClient}; the defaults suit a payment call. */
  public static final class Builder {
    private final @Nullable String target;
    private final @Nullable Channel channel;
    private final String namespace;
    private Duration leaseTtl = Duration.ofSeconds(30);
    private Duration waitTimeout = Duration.ofSeconds(5);
    private Duration inProgressBudget = Duration.ofSeconds(60);
    private @Nullable Duration retention;
    private int rpcRetries = 5;
    private Duration rpcTimeout = Duration.ofSeconds(5);
    private @Nullable String token;
    private @Nullable Executor executor;

    private Builder(@Nullable String target, @Nullable Channel channel, String namespace) {
      this.target = target;
      this.channel = channel;
      this.namespace = Validate.namespace(namespace);
    }

    /** The lease of each attempt (1 s to 1 h, default 30 s); heartbeats renew it every third of it. */
    public Builder leaseTtl(Duration leaseTtl) {
      this.leaseTtl = Validate.between("leaseTtl", leaseTtl, MIN_LEASE_TTL, MAX_LEASE_TTL);
      return this;
    }

    /** How long one Begin waits server-side for a concurrent attempt (0 to 60 s, default 5 s). */
    public Builder waitTimeout(Duration waitTimeout) {
      this.waitTimeout = Validate.between("waitTimeout", waitTimeout, Duration.ZERO, MAX_WAIT);
      return this;
    }

    /**
     * How long one call keeps waiting while another attempt holds the key (default 60 s), then
     * {@link InProgressException}.
     */
    public Builder inProgressBudget(Duration inProgressBudget) {
      this.inProgressBudget = Validate.notNegative("inProgressBudget", inProgressBudget);
      return this;
    }

    /**
     * How long a record and its stored response are kept (Begin's {@code retention}); unset, idemd's
     * default (24 h). Must lie within the server's bounds (by default 24 h to 30 d).
     */
    public Builder retention(Duration retention) {
      this.retention = Validate.positive("retention", retention);
      return this;
    }

    /** Retries of one RPC on UNAVAILABLE or DEADLINE_EXCEEDED (default 5), then the error. */
    public Builder rpcRetries(int rpcRetries) {
      if (rpcRetries < 0) {
        throw new InvalidArgumentException("rpcRetries must not be negative, got " + rpcRetries, null, null);
      }
      this.rpcRetries = rpcRetries;
      return this;
    }

    /** The deadline of one RPC (default 5 s); Begin adds its wait to it. */
    public Builder rpcTimeout(Duration rpcTimeout) {
      this.rpcTimeout = Validate.positive("rpcTimeout", rpcTimeout);
      return this;
    }

    /** Sent as {@code authorization: Bearer <token>} when idemd runs with auth. */
    public Builder token(String token) {
      if (token.isEmpty() || !token.chars().allMatch(c -> c > ' ' && c < 0x7f)) {
        throw new InvalidArgumentException("token must be non-empty printable ASCII", null, null);
      }
      this.token = token;
      return this;
    }

    /** Where {@link IdemdClient#runOnceAsync} runs calls (default: daemon threads the client owns). */
    public Builder executor(Executor executor) {
      this.executor = Objects.requireNonNull(executor, "executor");
      return this;
    }

    /**
     * @throws InvalidArgumentException if the address is not host:port, http://host:port or
     *     https://host:port
     */
    public IdemdClient build() {
      return new IdemdClient(this);
    }
  }
}
