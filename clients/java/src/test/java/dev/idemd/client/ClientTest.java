package dev.idemd.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertSame;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import dev.idemd.v1.Record;
import dev.idemd.v1.State;
import io.grpc.Status;
import java.time.Duration;
import java.util.Map;
import java.util.concurrent.CancellationException;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicInteger;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.condition.EnabledIf;

/** What the helper promises beyond the shared scenarios, against a real idemd. */
@EnabledIf(value = "dev.idemd.client.IdemdServer#available", disabledReason = "IDEMD_BIN is not set")
class ClientTest {
  private static final String NAMESPACE = "payments";
  private static final byte[] FINGERPRINT = Keys.fingerprint(Map.of("amount", "1000"));
  private static IdemdServer server;
  private static IdemdClient client;

  @BeforeAll
  static void start() throws Exception {
    server = IdemdServer.start();
    client = server.client(NAMESPACE).build();
  }

  @AfterAll
  static void stop() throws Exception {
    if (client != null) {
      client.close();
    }
    if (server != null) {
      server.close();
    }
  }

  /** The next run must acquire at once: a lease left held would make it wait for its 30 s TTL. */
  private static PreviousAttempt nextAttemptSeesPrevious(String key) {
    long started = System.nanoTime();
    PreviousAttempt[] previous = new PreviousAttempt[1];
    Done done = client.runOnce(key, FINGERPRINT, RunOptions.builder().inProgressBudget(Duration.ZERO).build(), attempt -> {
      previous[0] = attempt.getPrevious();
      return Response.ofText("ok", 200, "text/plain");
    });
    assertEquals(2, done.getAttempt());
    assertTrue(System.nanoTime() - started < TimeUnit.SECONDS.toNanos(5));
    return previous[0];
  }

  @Test
  void anUnexpectedExceptionEndsTheLeaseAsOutcomeUnknown() {
    String key = IdemdServer.freshKey("unexpected");
    IllegalStateException bug = new IllegalStateException("a bug after the provider was called");
    OutcomeUnknownFailureException error = assertThrows(OutcomeUnknownFailureException.class,
        () -> client.runOnce(key, FINGERPRINT, attempt -> {
          throw bug;
        }));
    assertSame(bug, error.getCause());
    Record record = server.lookup(NAMESPACE, key);
    assertEquals(State.STATE_ABORTED, record.getState());
    assertTrue(record.getOutcomeUnknown());
    assertTrue(record.getAbortReason().contains("IllegalStateException"), record.getAbortReason());
    assertTrue(nextAttemptSeesPrevious(key).isOutcomeUnknown());
  }

  @Test
  void aCheckedExceptionOrANullResponseEndsTheLeaseToo() {
    String checked = IdemdServer.freshKey("checked");
    OutcomeUnknownFailureException error = assertThrows(OutcomeUnknownFailureException.class,
        () -> client.runOnce(checked, FINGERPRINT, attempt -> {
          throw new java.io.IOException("connection reset");
        }));
    assertInstanceOf(java.io.IOException.class, error.getCause());
    assertTrue(nextAttemptSeesPrevious(checked).isOutcomeUnknown());

    String nothing = IdemdServer.freshKey("null");
    error = assertThrows(OutcomeUnknownFailureException.class, () -> client.runOnce(nothing, FINGERPRINT, attempt -> null));
    assertInstanceOf(NullPointerException.class, error.getCause());
    assertTrue(nextAttemptSeesPrevious(nothing).isOutcomeUnknown());
  }

  @Test
  void anErrorFromTheOperationIsRethrownAfterEndingTheLease() {
    String key = IdemdServer.freshKey("error");
    StackOverflowError overflow = new StackOverflowError("deep");
    StackOverflowError thrown = assertThrows(StackOverflowError.class, () -> client.runOnce(key, FINGERPRINT, attempt -> {
      throw overflow;
    }));
    assertSame(overflow, thrown);
    assertEquals(State.STATE_ABORTED, server.lookup(NAMESPACE, key).getState());
    assertTrue(nextAttemptSeesPrevious(key).isOutcomeUnknown());
  }

  @Test
  void aFailingReconcileHookKeepsTheOutcomeUnknown() {
    String key = IdemdServer.freshKey("hook-fails");
    assertThrows(OutcomeUnknownFailureException.class, () -> client.runOnce(key, FINGERPRINT, attempt -> {
      throw new OutcomeUnknown("timed out");
    }));
    AtomicBoolean ran = new AtomicBoolean();
    RuntimeException down = new RuntimeException("provider lookup failed");
    RunOptions failing = RunOptions.builder().reconcile(attempt -> {
      throw down;
    }).build();
    OutcomeUnknownFailureException error = assertThrows(OutcomeUnknownFailureException.class,
        () -> client.runOnce(key, FINGERPRINT, failing, attempt -> {
          ran.set(true);
          return Response.ofText("charged", 201, "text/plain");
        }));
    assertSame(down, error.getCause());
    assertFalse(ran.get());
    Record record = server.lookup(NAMESPACE, key);
    assertEquals(State.STATE_ABORTED, record.getState());
    assertTrue(record.getOutcomeUnknown());
    assertEquals(2, record.getAttempt());
  }

  @Test
  void aRetryableAfterAnUnreconciledUnknownOutcomeStaysUnknown() {
    String key = IdemdServer.freshKey("retryable-after-unknown");
    assertThrows(OutcomeUnknownFailureException.class, () -> client.runOnce(key, FINGERPRINT, attempt -> {
      throw new OutcomeUnknown("timed out");
    }));
    assertThrows(OutcomeUnknownFailureException.class, () -> client.runOnce(key, FINGERPRINT, attempt -> {
      throw new Retryable("503");
    }));
    assertTrue(server.lookup(NAMESPACE, key).getOutcomeUnknown());
  }

  @Test
  void cancellingAnAsyncRunInterruptsTheOperationAndEndsTheLease() throws Exception {
    String key = IdemdServer.freshKey("cancel");
    CountDownLatch running = new CountDownLatch(1);
    AtomicBoolean interrupted = new AtomicBoolean();
    CompletableFuture<Done> run = client.runOnceAsync(key, FINGERPRINT, attempt -> {
      running.countDown();
      try {
        Thread.sleep(30_000);
      } catch (InterruptedException e) {
        interrupted.set(true);
        throw e;
      }
      return Response.ofText("too late", 201, "text/plain");
    });
    assertTrue(running.await(10, TimeUnit.SECONDS));
    assertTrue(run.cancel(true));
    assertThrows(CancellationException.class, run::join);

    long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(5);
    while (server.lookup(NAMESPACE, key).getState() != State.STATE_ABORTED && System.nanoTime() < deadline) {
      Thread.sleep(20);
    }
    assertTrue(interrupted.get());
    Record record = server.lookup(NAMESPACE, key);
    assertEquals(State.STATE_ABORTED, record.getState());
    assertTrue(record.getOutcomeUnknown());
  }

  @Test
  void anAsyncFailureCompletesTheFutureWithTheSameException() {
    String key = IdemdServer.freshKey("async-failure");
    CompletableFuture<Done> run = client.runOnceAsync(key, FINGERPRINT, attempt -> {
      throw new Retryable("503");
    });
    ExecutionException error = assertThrows(ExecutionException.class, () -> run.get(10, TimeUnit.SECONDS));
    assertInstanceOf(RetryableFailureException.class, error.getCause());
  }

  @Test
  void anotherHolderPastTheBudgetIsInProgress() throws Exception {
    String key = IdemdServer.freshKey("budget");
    CountDownLatch holding = new CountDownLatch(1);
    CountDownLatch finish = new CountDownLatch(1);
    CompletableFuture<Done> holder = client.runOnceAsync(key, FINGERPRINT, attempt -> {
      holding.countDown();
      assertTrue(finish.await(20, TimeUnit.SECONDS));
      return Response.ofText("holder", 201, "text/plain");
    });
    assertTrue(holding.await(10, TimeUnit.SECONDS));
    RunOptions impatient = RunOptions.builder().waitTimeout(Duration.ofMillis(100)).inProgressBudget(Duration.ofMillis(400)).build();
    AtomicInteger runs = new AtomicInteger();
    InProgressException error = assertThrows(InProgressException.class, () -> client.runOnce(key, FINGERPRINT, impatient, attempt -> {
      runs.incrementAndGet();
      return Response.ofText("duplicate", 201, "text/plain");
    }));
    assertEquals(key, error.getKey());
    assertEquals(0, runs.get());
    finish.countDown();
    assertEquals("holder", holder.get(10, TimeUnit.SECONDS).getResponse().getBodyText());
  }

  @Test
  void retentionIsSetPerCallAndPerClient() {
    String perCall = IdemdServer.freshKey("retention-call");
    client.runOnce(perCall, FINGERPRINT, RunOptions.builder().retention(Duration.ofDays(3)).build(),
        attempt -> Response.ofText("ok", 200, "text/plain"));
    Record record = server.lookup(NAMESPACE, perCall);
    long kept = record.getExpiresAt().getSeconds() - record.getCompletedAt().getSeconds();
    assertEquals(Duration.ofDays(3).getSeconds(), kept, 2);

    String perClient = IdemdServer.freshKey("retention-client");
    try (IdemdClient keeping = server.client(NAMESPACE).retention(Duration.ofDays(7)).build()) {
      keeping.runOnce(perClient, FINGERPRINT, attempt -> Response.ofText("ok", 200, "text/plain"));
    }
    record = server.lookup(NAMESPACE, perClient);
    kept = record.getExpiresAt().getSeconds() - record.getCompletedAt().getSeconds();
    assertEquals(Duration.ofDays(7).getSeconds(), kept, 2);
  }

  @Test
  void whatIdemdRefusesIsAnInvalidArgumentAndNothingRuns() {
    AtomicBoolean ran = new AtomicBoolean();
    // Below the server's minimum retention (24 h by default): only idemd knows its bounds.
    RunOptions tooShort = RunOptions.builder().retention(Duration.ofHours(1)).build();
    InvalidArgumentException error = assertThrows(InvalidArgumentException.class,
        () -> client.runOnce(IdemdServer.freshKey("short"), FINGERPRINT, tooShort, attempt -> {
          ran.set(true);
          return Response.ofText("ok", 200, "text/plain");
        }));
    assertEquals(Status.Code.INVALID_ARGUMENT, error.getStatus().getCode());
    assertEquals("INVALID_FIELD", error.getReason());
    assertFalse(ran.get());
  }

  @Test
  void aResponseIdemdRefusesToStoreEndsTheLeaseAsOutcomeUnknown() {
    String key = IdemdServer.freshKey("too-large");
    // Above idemd's default max_response_bytes (1 MiB): the operation ran, its result cannot be stored.
    byte[] huge = new byte[2 * 1024 * 1024];
    OutcomeUnknownFailureException error = assertThrows(OutcomeUnknownFailureException.class,
        () -> client.runOnce(key, FINGERPRINT, attempt -> new Response(huge, 200, "application/octet-stream")));
    assertInstanceOf(InvalidArgumentException.class, error.getCause());
    assertEquals(Status.Code.INVALID_ARGUMENT, error.getStatus().getCode());
    Record record = server.lookup(NAMESPACE, key);
    assertEquals(State.STATE_ABORTED, record.getState());
    assertTrue(record.getOutcomeUnknown());
  }
}
